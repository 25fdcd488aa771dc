"""Process start-up and exit: imports no process of ours uses, exits without the interpreter's
teardown, and where the processes' shared cache lives.

A Python process that has imported torch, transformers, DeepSpeed or vLLM spends seconds after its
last line in the interpreter's finalisation: every module's objects freed one by one, then the C++
extensions' static destructors (measured here: 3.6 s for the vLLM worker, 2 s for a training rank,
3 s for the command line; 0.5 s for a bare `import torch`). Nothing of ours depends on that work: the
workers' outputs are written atomically and marked done before they return. `exit_now` does what the
interpreter does at exit that matters (threads' exit hooks, `atexit` handlers, flushed streams),
then ends the process.

At start, transformers imports scikit-learn (and with it scipy and pandas) as soon as its auto classes
load, for assisted generation's candidate generator, which none of our processes runs; vLLM imports
it through transformers. That is ~1 s of every stage process (vLLM worker, scoring worker, training
rank) and of the command line. `skip_unused_imports` makes those packages look absent to the
libraries imported after it; `allow_unused_imports` undoes it before code that may use them (user
hooks, MLflow's model flavours).

`cache_dir` names the per-machine cache folders the processes share (the reference log-prob cache,
remembered tokenizer classes, the Prefect database template); this module imports nothing heavy, so
the command line can ask before its own imports."""
from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn


UNUSED_IMPORTS = ("sklearn",)


def cache_dir(name: str) -> Path:
    """The user cache's folder `name`: $SELFALIGN_CACHE_DIR/name, else $XDG_CACHE_HOME (or ~/.cache)/
    selfalign/name. Not created here."""
    if os.environ.get("SELFALIGN_CACHE_DIR"):
        return Path(os.environ["SELFALIGN_CACHE_DIR"]) / name
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfalign" / name


def skip_unused_imports() -> None:
    """Makes the packages of `UNUSED_IMPORTS` look absent to what is imported after this call: a
    None entry in sys.modules, so `importlib.util.find_spec` answers None (transformers then takes
    them for not installed) and importing them raises ModuleNotFoundError until
    `allow_unused_imports`. Call it first in a process; one already imported is left alone."""
    for name in UNUSED_IMPORTS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def pause_gc() -> None:
    """Turns off the cyclic garbage collector for a process's start (call it first): importing vLLM or
    torch with transformers creates ~700k objects, and the collections they trigger on the way
    (each later one traversing everything imported so far) cost ~0.7 s of a vLLM worker's imports.
    `freeze_imports` turns it back on."""
    gc.disable()


def freeze_imports() -> None:
    """After `pause_gc`: moves every object alive now (the imported modules, classes and functions)
    into the collector's permanent generation and turns the collector back on. Later collections
    traverse only what is created after this call: vLLM calls `gc.collect()` three times while it
    loads a model, ~0.5-1 s each over an unfrozen heap. Call it once the heavy imports are done.
    Where the collector is on (nothing paused it: the command line's functions called from another
    program, say) it does nothing: that program's objects are not ours to freeze."""
    if gc.isenabled():
        return
    gc.freeze()
    gc.enable()


def allow_unused_imports() -> None:
    """Undoes `skip_unused_imports`: the packages import normally again (for user hooks and
    third-party code that may need them). Idempotent."""
    for name in UNUSED_IMPORTS:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


def exit_now(code: int = 0) -> NoReturn:
    """Ends the process with `code` after the exit hooks threads registered (Prefect's log and event
    workers drain there), waiting for the non-daemon threads, the `atexit` handlers and flushed
    stdout/stderr; the per-object teardown of the loaded modules is skipped."""
    try:
        shutdown = getattr(threading, "_shutdown", None)  # what the interpreter calls first at exit
        if shutdown is not None:
            shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or a broken pipe: nothing more can be written
                pass
        os._exit(code)


def die_with_parent(sig: int) -> None:
    """Linux sends this process `sig` when its parent ends (PR_SET_PDEATHSIG); elsewhere nothing.
    Usable as a Popen `preexec_fn`."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig)


def children_alive() -> bool:
    """Whether this process still has live child processes (vLLM's multi-GPU workers, say), which a
    skipped teardown would leave running."""
    try:
        import psutil
    except ImportError:  # cannot tell: assume there are
        return True
    return any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
               for c in psutil.Process().children(recursive=True))
