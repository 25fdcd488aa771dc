"""`tasks.procs`: the workers' and the command line's exit without the interpreter's teardown still
does what a normal exit does that anyone can observe; imports they skip; the collector paused for
their imports and the imported objects frozen out of later collections."""
import subprocess
import sys
import textwrap


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def _exit_marks(tmp_path, how: str):
    marks = tmp_path / f"marks-{how.split('(')[0]}"
    proc = run(f"""
        import atexit, sys, threading, time
        from selfalign.tasks.procs import exit_now

        def mark(what):
            with open({str(marks)!r}, "a") as f:
                f.write(what + "\\n")

        atexit.register(mark, "atexit")
        threading._register_atexit(mark, "thread hook")   # where Prefect's log worker drains
        def late():
            time.sleep(0.5)
            mark("non-daemon thread")
        threading.Thread(target=late).start()
        print("buffered, never flushed", end="")           # a pipe: block-buffered
        sys.stderr.write("to stderr")
        {how}
        mark("after the exit")
    """)
    return proc, marks.read_text().splitlines()


def test_exit_now_does_what_a_normal_exit_does(tmp_path):
    normal, normal_marks = _exit_marks(tmp_path, "sys.exit(7)")
    fast, fast_marks = _exit_marks(tmp_path, "exit_now(7)")
    assert fast.returncode == normal.returncode == 7, fast.stderr
    assert fast.stdout == normal.stdout == "buffered, never flushed"
    assert fast.stderr == normal.stderr == "to stderr"
    # thread exit hooks, the non-daemon thread's end, atexit handlers: all of them, in the same order
    assert fast_marks == normal_marks
    assert sorted(fast_marks) == ["atexit", "non-daemon thread", "thread hook"]


def test_exit_now_status_zero_and_children_alive():
    proc = run("""
        import subprocess, sys
        from selfalign.tasks.procs import children_alive, exit_now

        assert not children_alive()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        assert children_alive()
        child.kill(); child.wait()
        assert not children_alive()
        exit_now(0)
    """)
    assert proc.returncode == 0, proc.stderr


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=300)


def test_skipped_imports_stay_out_of_transformers_and_come_back_for_user_hooks(tmp_path):
    """After skip_unused_imports, loading a model through transformers' auto classes imports no
    scikit-learn (it did before); a user hook that imports it still loads, through load_hook."""
    hook = tmp_path / "myhooks.py"
    hook.write_text("import sklearn\n\ndef preferred(prompt, response):\n    return sklearn.__name__ == 'sklearn'\n")
    code = """
        import sys
        from selfalign.tasks.procs import skip_unused_imports
        if sys.argv[1] == "skip":
            skip_unused_imports()
            skip_unused_imports()  # idempotent
        import importlib.util
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                             num_hidden_layers=1, num_attention_heads=2))
        loaded = "sklearn" in sys.modules and sys.modules["sklearn"] is not None
        print("loaded-by-transformers", loaded, importlib.util.find_spec("sklearn") is not None)
        sys.path.insert(0, sys.argv[2])
        from selfalign.tasks.data import load_hook
        print("hook", load_hook("myhooks:preferred", "evaluate.preferred")("p", "r"))
        """
    skip, plain = (_python(code, how, str(tmp_path)) for how in ("skip", "plain"))
    assert skip.returncode == 0 and plain.returncode == 0, skip.stderr[-2000:] + plain.stderr[-2000:]
    assert "loaded-by-transformers False False" in skip.stdout
    assert "loaded-by-transformers True True" in plain.stdout
    assert "hook True" in skip.stdout and "hook True" in plain.stdout


def test_skipped_import_raises_until_allowed():
    r = _python("""
        import sys
        from selfalign.tasks.procs import allow_unused_imports, skip_unused_imports
        skip_unused_imports()
        try:
            import sklearn
        except ModuleNotFoundError:
            print("absent")
        allow_unused_imports()
        allow_unused_imports()
        import sklearn.metrics
        print("back", sys.modules["sklearn"] is not None)
        """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["absent", "back", "True"]


def test_collector_paused_for_imports_then_frozen_out_of_collections():
    """After `pause_gc` nothing is collected however many cycles are made; `freeze_imports` turns the
    collector on and puts what was alive into the permanent generation, so that a full collection
    then traverses only newer objects and still frees new cyclic garbage."""
    proc = run("""
        import gc, weakref
        from selfalign.tasks.procs import freeze_imports, pause_gc

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.other, b.other = b, a
            return weakref.ref(a)

        freeze_imports()  # not paused: nothing to freeze
        assert gc.isenabled() and gc.get_freeze_count() == 0
        pause_gc()
        assert not gc.isenabled()
        before = cycle()
        for _ in range(20000):  # far past the automatic thresholds
            cycle()
        assert before() is not None  # not collected while paused
        freeze_imports()
        assert gc.isenabled() and gc.get_freeze_count() > 20000
        assert before() is not None  # frozen: left alone from now on
        gc.collect()
        assert before() is not None
        after = cycle()
        gc.collect()
        assert after() is None  # new garbage is collected
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_worker_modules_pause_the_collector_before_their_heavy_imports():
    """The scoring worker and the training rank, run as programs, import torch with the collector
    paused; the temporary Prefect server's process imports Prefect's server app with it paused."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for rel in ("tasks/score.py", "tasks/train_worker.py", "flows/prefect_server.py"):
        proc = run(f"""
            import gc, runpy, sys
            sys.argv = ["{rel}", "--help"]
            import builtins
            real_import = builtins.__import__
            def spy(name, *a, **k):
                if name == "torch" or name.startswith("prefect.server"):
                    print("enabled at", name, gc.isenabled())
                    builtins.__import__ = real_import
                return real_import(name, *a, **k)
            builtins.__import__ = spy
            try:
                runpy.run_path("{root / rel}", run_name="__main__")
            except SystemExit:
                pass
        """)
        assert "enabled at" in proc.stdout and "True" not in proc.stdout.split("enabled at")[1].split("\n")[0], (
            rel, proc.stdout, proc.stderr[-2000:])
