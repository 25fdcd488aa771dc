"""`selfalign server` as a user runs it: both servers come up with their stores under the home
folder, a flow run and an MLflow run (with an artifact) made against them are visible through
their APIs, and SIGTERM stops both."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def client_env(tmp_path: Path, prefect_port: int) -> dict:
    env = dict(os.environ, PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api",
               PREFECT_HOME=str(tmp_path / "client"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


class Server:
    """`selfalign server` in a subprocess, its output collected by a thread."""

    def __init__(self, home: Path, prefect_port: int, mlflow_port: int):
        self.lines: list[str] = []
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "selfalign.flows.cli", "server", "--home", str(home),
             "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=home.parent)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while needle not in self.text:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.text}"
            assert time.time() < deadline, f"no {needle!r} after {timeout}s:\n{self.text}"
            time.sleep(0.5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


@pytest.fixture
def server(tmp_path):
    ports = free_port(), free_port()
    srv = Server(tmp_path / "home", *ports)
    yield srv, ports
    srv.kill()


PROBE_FLOW = """
from prefect import flow

@flow(name="server-probe")
def probe(x: int) -> int:
    return x + 1

assert probe(41) == 42
"""


@pytest.mark.slow
def test_server_starts_records_and_stops(server, tmp_path):
    srv, (pport, mport) = server
    srv.wait_for("stops both servers", timeout=300)
    assert f"export PREFECT_API_URL=http://127.0.0.1:{pport}/api" in srv.text
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mport}" in srv.text
    with urllib.request.urlopen(f"http://127.0.0.1:{pport}/api/health", timeout=10) as r:
        assert json.load(r) is True
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/health", timeout=10) as r:
        assert r.status == 200
    # the Prefect UI talks to this server's API, not to the default port
    with urllib.request.urlopen(f"http://127.0.0.1:{pport}/ui-settings", timeout=10) as r:
        assert json.load(r)["api_url"] == f"http://127.0.0.1:{pport}/api"

    # a flow run against the Prefect server
    env = client_env(tmp_path, pport)
    proc = subprocess.run([sys.executable, "-c", PROBE_FLOW], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    req = urllib.request.Request(f"http://127.0.0.1:{pport}/api/flow_runs/filter", method="POST",
                                 data=json.dumps({"limit": 10}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        runs = json.load(r)
    assert [run["state_type"] for run in runs] == ["COMPLETED"] and runs[0]["parameters"] == {"x": 41}

    # an MLflow run, with an artifact uploaded through the server, via the project's logger
    from mlflow.tracking import MlflowClient

    from selfalign.tasks.tracking import MlflowLogger

    uri = f"http://127.0.0.1:{mport}"
    logger = MlflowLogger(uri, "probe", "probe-run")
    logger.log_metrics({"eval/accuracy": 0.5}, step=1)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    logger.log_artifact(note, "tables")
    logger.close()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("probe")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "probe-run" and run.data.metrics == {"eval/accuracy": 0.5}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "tables")] == ["tables/note.txt"]

    store = tmp_path / "home" / "server"
    assert (store / "prefect" / "prefect.db").is_file() and (store / "mlflow" / "mlflow.db").is_file()
    assert list((store / "mlflow" / "artifacts").rglob("note.txt"))

    pids = [int(p) for p in re.findall(r"started \(pid (\d+)\)", srv.text)]
    assert len(pids) == 2
    t0 = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(90) == 0, srv.text
    print(f"stopped in {time.time() - t0:.1f}s")
    assert "prefect: stopped" in srv.text and "mlflow: stopped" in srv.text
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not listening(pport) and not listening(mport)


def test_tracking_uri_config_then_environment_then_run_store(tmp_path, monkeypatch):
    from selfalign.tasks.tracking import local_uri, resolve_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri("", tmp_path) == local_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_uri("", tmp_path) == "http://127.0.0.1:5000"
    assert resolve_uri("none", tmp_path) == "none"


def test_server_layout_and_printed_urls_hide_passwords(tmp_path):
    from selfalign.flows.server import _safe, services

    prefect, mlflow = services(tmp_path, "127.0.0.1", 4201, 5001, "postgresql://me:secret@db:5432/mlflow",
                               "postgresql+asyncpg://me:pw@db/prefect")
    assert prefect.env["PREFECT_HOME"] == str(tmp_path.resolve() / "prefect")
    assert prefect.env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == "postgresql+asyncpg://me:pw@db/prefect"
    assert "PREFECT_API_URL" not in prefect.env and prefect.health == "http://127.0.0.1:4201/api/health"
    assert prefect.env["PREFECT_SERVER_UI_API_URL"] == "http://127.0.0.1:4201/api"
    assert mlflow.cmd[mlflow.cmd.index("--backend-store-uri") + 1] == "postgresql://me:secret@db:5432/mlflow"
    assert mlflow.health == "http://127.0.0.1:5001/health"
    assert _safe("postgresql://me:secret@db:5432/mlflow") == "postgresql://me:***@db:5432/mlflow"
    assert _safe("sqlite:////x/mlflow.db") == "sqlite:////x/mlflow.db"


def test_a_run_with_a_bad_dataset_leaves_no_server_running(tmp_path, monkeypatch, capsys):
    import psutil

    from selfalign.flows import cli

    monkeypatch.setenv("SELFALIGN_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "  "}\n')
    assert cli.main(["run", str(ROOT / "deploy" / "presets" / "demo.yaml"), f"--data.prompts={bad}",
                     f"--run.dir={tmp_path / 'run'}"]) == 2
    assert "data error" in capsys.readouterr().err
    left = [p for p in psutil.Process().children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]
    assert left == []


