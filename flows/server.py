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
import shutil
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
    # stays in the command's session, gets a fresh log and dies with the command (Linux)
    detached: bool = True
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        from selfalign.tasks.procs import die_with_parent

        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab" if self.detached else "wb") as f:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=self.detached,
                preexec_fn=None if self.detached else (lambda: die_with_parent(signal.SIGTERM)))

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


def database_template() -> Path:
    """A new home's Prefect database, copied from here: an empty database already migrated by this
    Prefect version ($SELFALIGN_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /selfalign/prefect-db/
    <version>/prefect.db). Migrating a new database from scratch takes ~4 s of a 2-core machine
    at every new home (a project's first run, every test's temporary home)."""
    from importlib.metadata import version

    from selfalign.tasks.procs import cache_dir

    return cache_dir("prefect-db") / version("prefect") / "prefect.db"


def _database_configured() -> bool:
    """Whether Prefect's database is configured elsewhere than the home's prefect.db."""
    return bool(os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"))


def save_database_template(db: Path, template: Path) -> bool:
    """Copies the database `db` of a server that has just migrated it (and recorded nothing yet) to
    `template`, as one consistent file (SQLite's backup, WAL included), atomically. Nothing is saved
    when a template exists, or when the copy holds a flow run. Returns whether it was saved."""
    import sqlite3

    if template.exists():
        return False
    tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")  # one file (the server turns WAL on again)
            empty = dst.execute("SELECT count(*) FROM flow_run").fetchone()[0] == 0
        finally:
            src.close()
            dst.close()
        if not empty:
            tmp.unlink()
            return False
        os.replace(tmp, template)
        return True
    except (OSError, sqlite3.Error):
        tmp.unlink(missing_ok=True)
        return False


class TemporaryPrefect:
    """The temporary Prefect server of one `selfalign run` that has no Prefect API configured: the
    same server Prefect starts by itself in that case (its API app under uvicorn on a free loopback
    port, no UI), but started by the command line at its first step, so that its start (the server's
    imports, and on a new home the database's migrations: 6-12 s on 2 cores) overlaps the command
    line's own imports and dataset checks instead of following them.

    `start` returns at once; `wait` blocks until the API answers (or raises with the server's log);
    `settings` gives the Prefect settings that point this process's flows at it; `stop` ends it.
    The server process dies with this one (Linux) should the command line be killed."""

    def __init__(self, home: Path, timeout: float = 90.0):
        self.home = home
        self.timeout = timeout
        self.port = 0
        self.service: Service | None = None
        self.ready = False
        self.migrating = True  # whether its start creates the database (known at `start`)
        self.from_template = False  # whether a new home's database was copied from `database_template`

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, PREFECT_HOME=str(self.home), PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1",
                   PREFECT__SERVER_FINAL="1")
        env.pop("PREFECT_API_URL", None)
        # A new database is migrated from scratch at start (seconds); an existing one is only checked.
        # A database configured elsewhere counts as new: its start time is unknown. A new home gets a
        # copy of this Prefect version's empty migrated database when one was saved before.
        configured = _database_configured()
        db = self.home / "prefect.db"
        if not configured and not db.exists():
            self.from_template = self._copy_template(db)
        self.migrating = configured or not db.exists()
        cmd = [sys.executable, "-m", "selfalign.flows.prefect_server", "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        self.service = Service("prefect", cmd, env, f"{self.api_url}/health", self.home / "temporary-server.log",
                               detached=False)
        self.service.start()

    def _copy_template(self, db: Path) -> bool:
        template = database_template()
        if not template.is_file():
            return False
        tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(template, tmp)
            os.replace(tmp, db)
            return True
        except OSError:
            tmp.unlink(missing_ok=True)
            return False

    def wait(self) -> None:
        """Blocks until the server answers. A server that migrated a new database leaves a copy of it
        as the template of later new homes (`database_template`); one started from a template that
        fails starts again without it (the template is removed)."""
        svc = self.service
        deadline = time.time() + self.timeout
        while not svc.healthy():
            if not svc.alive() and self.from_template:
                self.from_template = False
                database_template().unlink(missing_ok=True)
                for name in ("prefect.db", "prefect.db-wal", "prefect.db-shm"):
                    (self.home / name).unlink(missing_ok=True)
                self.start()
                svc = self.service
                continue
            if not svc.alive():
                raise RuntimeError(f"the temporary Prefect server exited during start-up (exit "
                                   f"{svc.proc.returncode}); last lines of {svc.log}:\n{svc.log_tail()}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the temporary Prefect server did not answer within {self.timeout:.0f} s "
                                   f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); see {svc.log}")
            time.sleep(0.02)  # the command line has nothing else to do; a refused connection costs ~0.1 ms
        self.ready = True
        if self.migrating and not _database_configured():
            save_database_template(self.home / "prefect.db", database_template())

    def settings(self):
        """A context in which this process's Prefect client uses the server (whatever Prefect read
        from the environment when it was imported). Flow-run heartbeats are off: they let a
        long-lived server mark a crashed run, while this one ends with the run; and each flow's end
        waits up to a second for its heartbeat thread."""
        from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        return temporary_settings({PREFECT_API_URL: self.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})

    def stop(self) -> None:
        """SIGTERM once it served (uvicorn then shuts down cleanly); SIGKILL while it is still
        starting, when uvicorn would finish its start-up first (a bad dataset found by the command
        line, say). A database migration cut short is rolled back: SQLite's DDL is transactional."""
        proc = self.service.proc if self.service is not None else None
        if proc is None or proc.poll() is not None:
            return
        if self.ready:
            proc.terminate()
            try:
                proc.wait(10)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        proc.wait(10)

