"""Stopping a run: SIGTERM or Ctrl-C (SIGINT to the terminal's process group, twice) through the real
CLI on the demo. The command exits with 143 / 130 within seconds, no process it started outlives it,
no traceback is printed, MLflow records the run as KILLED, and the same command resumes the run."""
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from test_e2e import CLI, SMALL

pytestmark = pytest.mark.slow


class Run:
    """`selfalign run` on the small demo round, in a session of its own (as a terminal would start it)."""

    def __init__(self, tmp_path: Path, *extra: str):
        env = dict(os.environ, SELFALIGN_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(CLI + SMALL + [f"--run.dir={tmp_path / 'run'}", *extra], cwd=tmp_path, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_for(self, text: str, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            assert time.time() < deadline, f"no {text!r} in:\n" + "".join(self.lines)[-3000:]
            time.sleep(0.2)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    @property
    def output(self) -> str:
        return "".join(self.lines)


def gone(procs: list[psutil.Process], timeout: float = 20) -> list[psutil.Process]:
    """Those of `procs` still running after `timeout` seconds."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def parent_status(run_dir: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("selfalign").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parent.info.status


def test_sigterm_during_training_stops_everything_and_the_rerun_resumes(tmp_path):
    run = Run(tmp_path)
    run.wait_for("train: launching")
    time.sleep(3)  # the ranks are up
    children = run.descendants()
    assert any("train_worker" in " ".join(p.cmdline()) for p in children)
    t0 = time.time()
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(60) == 143, run.output[-3000:]
    assert time.time() - t0 < 30
    assert gone(children) == []
    assert "Traceback" not in run.output
    assert "stopped by SIGTERM" in run.output
    assert parent_status(tmp_path / "run") == "KILLED"

    from test_e2e import run_cli

    again = run_cli(tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr
    for name in ("samples.parquet", "scores.parquet", "pairs.parquet"):
        assert f"{name}: up to date, skipped" in out, name
    assert (tmp_path / "run" / "round_1" / "model" / "model.safetensors").is_file()


def test_ctrl_c_twice_during_generation_stops_without_a_traceback(tmp_path):
    run = Run(tmp_path)
    run.wait_for("vLLM: engine ready")
    children = run.descendants()
    assert any("vllm_worker" in " ".join(p.cmdline()) for p in children)
    assert any("prefect" in " ".join(p.cmdline()) for p in children)  # the run's temporary server
    os.killpg(run.proc.pid, signal.SIGINT)  # what a Ctrl-C in the terminal does
    time.sleep(0.5)
    if run.proc.poll() is None:
        os.killpg(run.proc.pid, signal.SIGINT)
    assert run.proc.wait(60) == 130, run.output[-3000:]
    assert gone(children) == []
    assert "Traceback" not in run.output, run.output[-3000:]
    assert parent_status(tmp_path / "run") == "KILLED"
