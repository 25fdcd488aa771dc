"""Worker processes: how the stages start them (`run_worker_process`, `start_child`), share out
devices and cores among several (`worker_resources`), report progress to the stage's log (`PROGRESS`
lines), stop them all on SIGINT or SIGTERM (`stop_on_signals`), and where their shared per-machine
cache lives (`cache_dir`). Imports nothing heavy."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

PROGRESS = "selfalign-progress: "  # worker lines that start so go to the stage's log


def cache_dir(name: str) -> Path:
    """The user cache's folder `name`: $SELFALIGN_CACHE_DIR/name, else $XDG_CACHE_HOME (or ~/.cache)/
    selfalign/name. Not created here."""
    if os.environ.get("SELFALIGN_CACHE_DIR"):
        return Path(os.environ["SELFALIGN_CACHE_DIR"]) / name
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfalign" / name


def quiet() -> bool:
    """No progress lines in CI (CI=true, as GitHub Actions, GitLab and most runners set) nor where
    progress bars are switched off (TQDM_DISABLE, which the command line sets in CI)."""
    return any(os.environ.get(k, "").lower() in ("true", "1") for k in ("CI", "TQDM_DISABLE"))


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux sends this process `sig` when the thread that started it ends (PR_SET_PDEATHSIG), so a
    worker never outlives a killed parent; elsewhere nothing. Usable as a Popen `preexec_fn`."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig)


_children: set[subprocess.Popen] = set()  # the worker processes running now (`start_child`)
_groups: set[int] = set()  # pids of the children that lead a process group of their own
_children_lock = threading.Lock()


def start_child(cmd: list[str], group: bool = False, **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen(cmd, ...)` for a worker or launcher: it dies with this process (even with
    SIGKILL) and `stop_children` ends it. Call `forget_child` once it has been waited for.
    group=True: the child leads a process group of its own, and stopping it (`stop_child`,
    `stop_children`) signals the whole group: DeepSpeed's runner exits on SIGTERM without passing it
    on, which would leave its launcher and the ranks running."""
    proc = subprocess.Popen(cmd, preexec_fn=die_with_parent, start_new_session=group, **popen_kwargs)
    with _children_lock:
        _children.add(proc)
        if group:
            _groups.add(proc.pid)
    return proc


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        if proc.pid in _groups:
            os.killpg(proc.pid, sig)  # the group outlives its leader while members are left
        elif proc.poll() is None:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def stop_child(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the child (its group, for `group=True`), SIGKILL after `grace` seconds if it has not ended."""
    _signal(proc, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL)
        proc.wait()


def forget_child(proc: subprocess.Popen) -> None:
    with _children_lock:
        _children.discard(proc)
        _groups.discard(proc.pid)


def stop_children(grace: float = 10.0) -> None:
    """SIGTERM to every running child (the whole group of a `group=True` one), then SIGKILL to those
    still running after `grace` seconds."""
    with _children_lock:
        live = [p for p in _children if p.poll() is None or p.pid in _groups]
    for p in live:
        _signal(p, signal.SIGTERM)
    deadline = time.time() + grace
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            p.wait()


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the command line. A KeyboardInterrupt, so that Prefect marks the flow
    runs crashed ("aborted by an interrupt signal") as it does for a Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


_stopped_by: int | None = None  # the signal that `stop_on_signals` is stopping the run for


def stopped_by() -> int | None:
    """The signal (SIGINT, SIGTERM) this process is stopping for, or None: code that sees an
    exception while unwinding (Prefect may wrap the interrupt of a sub-flow) can tell a stop from a failure."""
    return _stopped_by


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within it, SIGINT and SIGTERM end every child (`stop_children`) and raise `Interrupted` in the
    main thread, once: a second signal while the run is stopping only says so. Main thread only."""
    global _stopped_by

    def handler(signum, frame):
        global _stopped_by
        if _stopped_by is not None:
            print(f"selfalign: {signal.Signals(signum).name} again: still stopping", file=sys.stderr, flush=True)
            return
        _stopped_by = signum
        print(f"\nselfalign: {signal.Signals(signum).name}: stopping the run", file=sys.stderr, flush=True)
        stop_children()
        raise Interrupted(signum)

    _stopped_by = None
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        stop_children()
        for s, h in old.items():
            signal.signal(s, h)
        _stopped_by = None


def run_worker_process(module: str, job_path: Path, env: dict[str, str], cpus, log) -> tuple[int, list[str]]:
    """Runs `python -m module job_path` and waits: pinned to `cpus` when given (before the worker's
    engine starts: vLLM binds within it), its PROGRESS lines passed to `log`. Returns the exit status
    and the last 40 lines of output."""
    proc = start_child([sys.executable, "-m", module, str(job_path)], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(proc.pid, cpus)
        except OSError:
            pass  # the worker already ended: its exit status says why
    tail: list[str] = []
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            if line.startswith(PROGRESS):
                log(line[len(PROGRESS):].rstrip())
        return proc.wait(), tail
    finally:
        if proc.poll() is None:  # interrupted while it runs: the worker goes too
            proc.kill()
            proc.wait()
        forget_child(proc)


def thread_map(fn, items: list) -> list:
    """`fn` over `items` concurrently, one thread each (the work is in subprocesses); results in
    order, the first exception raised once all have ended."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, len(items))) as ex:
        futures = [ex.submit(fn, item) for item in items]
    return [f.result() for f in futures]


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_resources(n: int, per_worker: int, key: str) -> list[dict[str, Any]]:
    """What each of `n` concurrent workers may use: on GPUs `per_worker` devices of its own
    (`devices`, an error naming `key` when there are too few); on CPU a share of this process's
    cores (`cpus`), so that engines binding their threads do not all pick the same core."""
    gpus = visible_gpus()
    if gpus:
        if n * per_worker > len(gpus):
            raise ValueError(f"{key}: {n} workers x {per_worker} GPU(s) each need {n * per_worker} GPUs, "
                             f"{len(gpus)} are visible")
        return [{"devices": ",".join(gpus[w * per_worker:(w + 1) * per_worker])} for w in range(n)]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < n:
        return [{} for _ in range(n)]
    return [{"cpus": cpus[w::n]} for w in range(n)]


def worker_threads(threads: int, cpus) -> int:
    """The CPU threads of a worker: `threads` when > 0, else the worker's cores: its share `cpus`
    when it has one, else every core this process may run on."""
    if threads > 0:
        return threads
    if cpus:
        return len(cpus)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
