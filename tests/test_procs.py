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
