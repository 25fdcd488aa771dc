"""`tasks.procs.exit_now`: the workers' and the command line's exit without the interpreter's
teardown still does what a normal exit does that anyone can observe."""
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
