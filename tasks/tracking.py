"""The MLflow seam: a four-method logger with an MLflow implementation and a null one.

The MLflow logger talks to explicit run ids through `MlflowClient`, never through the global
"active run", so it works from any thread (Prefect runs tasks in worker threads) and beside a run
the user already has active."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

# Values that look like secrets never go to MLflow params.
_SECRET_WORDS = ("key", "token", "secret", "password")
LOG_MODEL = ("none", "artifact")  # tracking.log_model


def check_options(log_model: str) -> None:
    """The tracking section's choices, checked before a run starts (the message names the key)."""
    if log_model not in LOG_MODEL:
        raise ValueError(f"tracking.log_model: {log_model!r} is not one of {list(LOG_MODEL)}")


class MetricLogger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullLogger:
    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    def child(self, name: str) -> "NullLogger":
        return NullLogger()


class MlflowLogger:
    def __init__(self, uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None,
                 artifact_location: str | None = None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        # Without an explicit location MLflow puts artifacts in ./mlruns of whatever the working
        # directory happens to be.
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=artifact_location)
        self.experiment = experiment
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id is None:
            run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        clean = {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in params.items()}
        items = [Param(k, str(v)[:6000]) for k, v in clean.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        """Every file under the folder `path`, under `artifact_path`."""
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def child(self, name: str) -> "MlflowLogger":
        return MlflowLogger(self.uri, self.experiment, name, parent_run_id=self.run_id)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def resolve_uri(configured: str, run_dir: Path) -> str:
    """The tracking URI of a run: `tracking.uri`, else MLFLOW_TRACKING_URI (a tracking server the
    user pointed the shell at), else the run's own SQLite store `<run_dir>/mlflow.db`."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or local_uri(run_dir)


def local_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def make_logger(uri: str, experiment: str, run_name: str, artifact_location: str | None = None) -> MlflowLogger | NullLogger:
    if uri == "none":
        return NullLogger()
    return MlflowLogger(uri, experiment, run_name, artifact_location=artifact_location)
