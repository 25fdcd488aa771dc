"""`tasks.procs`: a worker process never outlives the process that started it, and its progress
lines reach the stage's log."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil


def wait_gone(pid: int, seconds: float = 20.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_a_worker_dies_with_the_process_that_started_it(tmp_path):
    """The parent is killed with SIGKILL (no handler of ours runs): its worker goes too."""
    worker = tmp_path / "worker_mod.py"
    worker.write_text("import time\nprint('selfalign-progress: up', flush=True)\ntime.sleep(300)\n")
    job = tmp_path / "job.json"
    job.write_text("{}")
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, threading
        sys.path.insert(0, {str(tmp_path)!r})
        from selfalign.tasks.procs import run_worker_process
        def log(line):
            import psutil
            print(psutil.Process().children()[0].pid, flush=True)
        run_worker_process("worker_mod", __import__("pathlib").Path({str(job)!r}),
                           dict(os.environ, PYTHONPATH={str(tmp_path)!r}), None, log)
    """)], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert psutil.pid_exists(pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert wait_gone(pid), "the worker outlived its killed parent"


def test_progress_lines_reach_the_log_and_the_tail_keeps_the_rest(tmp_path):
    from selfalign.tasks.procs import PROGRESS, run_worker_process

    (tmp_path / "talker.py").write_text(
        f"import sys\nprint({PROGRESS!r} + 'half way')\nprint('plain line')\nsys.exit(4)\n")
    seen: list[str] = []
    rc, tail = run_worker_process("talker", tmp_path / "job.json", dict(os.environ, PYTHONPATH=str(tmp_path)),
                                  None, seen.append)
    assert rc == 4 and seen == ["half way"] and tail[-1] == "plain line"
