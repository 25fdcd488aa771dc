"""`selfalign server`: a Prefect server and an MLflow tracking server side by side, with persistent
stores under one home folder, stopped together.

    <home>/prefect/prefect.db       Prefect's SQLite database (or --prefect-database-url)
    <home>/mlflow/mlflow.db         MLflow's SQLite store (or --mlflow-backend-uri, e.g. PostgreSQL)
    <home>/mlflow/artifacts         artifacts, served by the MLflow server (clients upload over HTTP)
    <home>/logs/{prefect,mlflow}.log

Each server runs in a process group of its own, so a Ctrl-C in the terminal reaches only this
process, which then stops both groups (the signal each shuts down cleanly on, then SIGKILL after a
grace period)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Service:
    name: str
    cmd: list[str]
    env: dict[str, str]
    health: str                   # URL that answers 200 once the server is up
    log: Path
    stop_signal: int = signal.SIGTERM
    # True: a session of its own (a Ctrl-C reaches only the command, which stops it); False: it
    # stays in the command's session and gets a fresh log. Either way it dies with the command (Linux).
    detached: bool = True
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        from selfalign.tasks.procs import die_with_parent

        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab" if self.detached else "wb") as f:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=self.detached, preexec_fn=lambda: die_with_parent(signal.SIGTERM))

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.health, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def signal(self, sig: int) -> None:
        # The whole group: the server's own workers and helpers stop with it.
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        self.signal(self.stop_signal)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(10)


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    # A client setting of the user's shell must not point the servers at another server.
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"})
    return env


def services(home: Path, host: str, prefect_port: int, mlflow_port: int, mlflow_backend_uri: str = "",
             prefect_database_url: str = "", mlflow_workers: int = 1) -> list[Service]:
    home = home.resolve()
    bin_dir = Path(sys.executable).parent
    penv = _base_env() | {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect" / "storage"),
        "PREFECT_MEMO_STORE_PATH": str(home / "prefect" / "memo_store.toml"),
    }
    if not (penv.get("PREFECT_UI_API_URL") or penv.get("PREFECT_SERVER_UI_API_URL")):
        # The UI calls the API at this URL; left to Prefect it is built from the port setting, not
        # from --port, and points at 4200 whatever port the server listens on.
        penv["PREFECT_SERVER_UI_API_URL"] = f"http://{host}:{prefect_port}/api"
    if prefect_database_url:
        penv["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = prefect_database_url
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    prefect = Service("prefect", [str(bin_dir / "prefect"), "server", "start", "--host", host,
                                  "--port", str(prefect_port)],
                      penv, f"http://{host}:{prefect_port}/api/health", home / "logs" / "prefect.log",
                      # On SIGTERM `prefect server start` dies at once; SIGINT shuts uvicorn down cleanly.
                      stop_signal=signal.SIGINT)

    (home / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    backend = mlflow_backend_uri or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    # The job runner serves MLflow's GenAI evaluation jobs, not used here; without it the server
    # starts in ~11 s instead of ~37 s.
    menv = _base_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Service("mlflow", [str(bin_dir / "mlflow"), "server", "--host", host, "--port", str(mlflow_port),
                                "--workers", str(mlflow_workers), "--backend-store-uri", backend,
                                "--artifacts-destination", str(home / "mlflow" / "artifacts")],
                     menv, f"http://{host}:{mlflow_port}/health", home / "logs" / "mlflow.log")
    return [prefect, mlflow]


def _safe(uri: str) -> str:
    """A database URL with its password hidden, for printing."""
    if "://" in uri and "@" in uri.split("://", 1)[1]:
        scheme, rest = uri.split("://", 1)
        cred, hostpart = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{hostpart}"
    return uri


def serve(home: Path, host: str = "127.0.0.1", prefect_port: int = 4200, mlflow_port: int = 5000,
          mlflow_backend_uri: str = "", prefect_database_url: str = "", mlflow_workers: int = 1,
          startup_timeout: float = 180.0, out=print) -> int:
    """Starts both servers, prints where they are, waits for SIGINT/SIGTERM or for either to die,
    then stops both. Returns the exit status for the command line."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    svcs = services(home, host, prefect_port, mlflow_port, mlflow_backend_uri, prefect_database_url, mlflow_workers)
    status = 0
    try:
        for s in svcs:
            s.start()
            out(f"{s.name}: started (pid {s.proc.pid}), log {s.log}")
        deadline = time.time() + startup_timeout
        pending = list(svcs)
        while pending and not stop.is_set():
            for s in list(pending):
                if not s.alive():
                    out(f"{s.name} exited during start-up (exit {s.proc.returncode}); last lines of {s.log}:\n"
                        f"{s.log_tail()}")
                    return 1
                if s.healthy():
                    pending.remove(s)
            if pending and time.time() > deadline:
                names = ", ".join(s.name for s in pending)
                out(f"not healthy after {startup_timeout:.0f}s: {names}; see {', '.join(str(s.log) for s in pending)}")
                return 1
            stop.wait(0.5)
        if stop.is_set():
            return 0
        prefect_url, mlflow_url = f"http://{host}:{prefect_port}", f"http://{host}:{mlflow_port}"
        backend = mlflow_backend_uri or f"sqlite:///{home.resolve() / 'mlflow' / 'mlflow.db'}"
        out("")
        out(f"Prefect UI   {prefect_url}    (API {prefect_url}/api; store "
            f"{_safe(prefect_database_url) or home.resolve() / 'prefect' / 'prefect.db'})")
        out(f"MLflow UI    {mlflow_url}    (store {_safe(backend)}; artifacts {home.resolve() / 'mlflow' / 'artifacts'})")
        out("")
        out("In another shell, point runs at them:")
        out(f"  export PREFECT_API_URL={prefect_url}/api")
        out(f"  export MLFLOW_TRACKING_URI={mlflow_url}    # or pass --tracking.uri={mlflow_url}")
        out("  selfalign run deploy/presets/demo.yaml")
        out("Ctrl-C (or SIGTERM) stops both servers.", )
        sys.stdout.flush()
        while not stop.is_set():
            dead = [s for s in svcs if not s.alive()]
            if dead:
                for s in dead:
                    out(f"{s.name} exited (exit {s.proc.returncode}); last lines of {s.log}:\n{s.log_tail()}")
                status = 1
                break
            stop.wait(1.0)
    finally:
        for s in svcs:
            if s.proc is not None:
                code = s.stop()
                out(f"{s.name}: stopped (exit {code})")
        for s, h in old.items():
            signal.signal(s, h)
    return status


class TemporaryPrefect:
    """The Prefect server of one `selfalign run` that has no Prefect API configured: `prefect server
    start` on a free loopback port, API only (no UI, no background services), its database in
    `home`. In a session of its own, so that a Ctrl-C in the terminal reaches only the command line,
    which records the interrupted run on it before stopping it; it dies with the command line (Linux)."""

    def __init__(self, home: Path, timeout: float = 90.0):
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.timeout = timeout
        home.mkdir(parents=True, exist_ok=True)
        env = _base_env() | {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
        cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
               "--port", str(port), "--no-services"]
        self.service = Service("prefect", cmd, env, f"{self.api_url}/health", home / "temporary-server.log",
                               stop_signal=signal.SIGINT)

    def start(self) -> "TemporaryPrefect":
        """Starts it and waits until it answers (RuntimeError with its log's end if it does not)."""
        svc = self.service
        svc.start()
        deadline = time.time() + self.timeout
        while not svc.healthy():
            if not svc.alive():
                raise RuntimeError(f"the temporary Prefect server exited during start-up (exit "
                                   f"{svc.proc.returncode}); last lines of {svc.log}:\n{svc.log_tail()}")
            if time.time() > deadline:
                svc.stop()
                raise RuntimeError(f"the temporary Prefect server did not answer within {self.timeout:.0f} s "
                                   f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); see {svc.log}")
            time.sleep(0.2)
        return self

    def settings(self):
        """A context in which this process's Prefect client uses the server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings({PREFECT_API_URL: self.api_url})

    def stop(self) -> None:
        """Sends what Prefect's background workers still hold (the last log lines, events) to the
        server, then stops it."""
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        if self.service.alive():
            with self.settings():
                for worker in (APILogWorker, EventsWorker):
                    worker.drain_all(timeout=10)
        self.service.stop()
