"""The MLflow seam: a four-method logger with an MLflow implementation and a null one.

The MLflow logger talks to explicit run ids through `MlflowClient`, never through the global
"active run", so it works from any thread (Prefect runs tasks in worker threads) and beside a run
the user already has active."""
from __future__ import annotations

import importlib.metadata
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from selfalign.tasks.config_base import ConfigError

# Values that look like secrets never go to MLflow params.
_SECRET_WORDS = ("key", "token", "secret", "password")
# tracking.log_model: none | artifact (the model folder as plain run artifacts) | transformers (an
# MLflow Model of the transformers flavour, loadable with mlflow.transformers.load_model / pyfunc)
LOG_MODEL = ("none", "artifact", "transformers")
# The packages a logged model needs to be loaded again (written to its requirements.txt). Given
# explicitly: MLflow's own guess for a transformers model pins torchvision, which may not be installed.
_MODEL_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors")


def check_options(log_model: str, registered_model_name: str = "", uri: str = "") -> None:
    """The tracking section's choices, checked before a run starts (the message names the key).
    `uri` is the resolved tracking URI (`resolve_uri`); "" skips the checks that need it."""
    if log_model not in LOG_MODEL:
        raise ValueError(f"tracking.log_model: {log_model!r} is not one of {list(LOG_MODEL)}")
    name = registered_model_name
    if not name:
        return
    if not name.strip() or name != name.strip():
        raise ValueError(f"tracking.registered_model_name: {name!r} must not be blank or start/end with spaces")
    bad = [c for c in "/:%\\'\"" if c in name]
    if bad:
        raise ValueError(f"tracking.registered_model_name: {name!r} must not contain {bad[0]!r} "
                         "(no '/', ':', '%', '\\' or quotes)")
    if log_model == "none":
        raise ValueError(f"tracking.registered_model_name: {name!r} is set but tracking.log_model is 'none', so no "
                         "model is logged to register; set tracking.log_model to transformers or artifact")
    why = registry_problem(uri) if uri else ""
    if why:
        raise ValueError(f"tracking.registered_model_name: {name!r} needs a model registry, but {why}")


@dataclass
class TrackingConfig:
    uri: str = ""                  # MLflow tracking URI; default $MLFLOW_TRACKING_URI, else
                                   # sqlite:///<run_dir>/mlflow.db
    experiment: str = "selfalign"  # MLflow experiment the runs go to
    plots: bool = True             # per-round PNG plots as MLflow artifacts (plots/) and in round_<r>/plots
    log_model: str = "none"        # none | artifact: each round's model folder as MLflow artifacts (model/) |
                                   # transformers: as an MLflow Model of the transformers flavour (model/)
    registered_model_name: str = ""  # each round's logged model becomes the next version of this registered
                                   # model ("" = none); needs tracking.log_model and a database or server store
    system_metrics: bool = True    # CPU, memory (and GPU) use sampled every 10 s into each round's MLflow run

    def __post_init__(self) -> None:
        # The store's own checks need the run's folder (its default store): flows/config.py makes them.
        try:
            check_options(self.log_model, self.registered_model_name)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def registry_problem(uri: str) -> str:
    """Why the MLflow store at `uri` cannot hold registered models, or "" when it can: a database
    store (the default sqlite:///<run_dir>/mlflow.db, PostgreSQL, MySQL, ...) or a tracking server
    (`selfalign server` keeps its registry in its SQLite or --mlflow-backend-uri database)."""
    from urllib.parse import urlparse

    if uri == "none":
        return "tracking is off (tracking.uri = 'none')"
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        return (f"the tracking store {uri!r} is a folder (MLflow's file store), which this MLflow refuses unless "
                "MLFLOW_ALLOW_FILE_STORE=true; use a database store such as sqlite:///path/mlflow.db (an empty "
                "tracking.uri gives the run's own sqlite:///<run dir>/mlflow.db) or a tracking server (selfalign server)")
    return ""


class MetricLogger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_model(self, model_dir: Path, how: str, *, step: int = 0, dtype: str = "", card: str = "",
                  registered_model_name: str = "", version_tags: dict[str, str] | None = None,
                  description: str = "") -> dict[str, str]: ...
    def set_tag(self, key: str, value: str) -> None: ...
    def log_table(self, columns: dict[str, list], artifact_file: str) -> None: ...
    def log_inputs(self, datasets: dict[str, tuple[str, str]]) -> None: ...
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

    def log_model(self, model_dir: Path, how: str, **_: Any) -> dict[str, str]:
        return {}

    def set_tag(self, key: str, value: str) -> None:
        pass

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        pass

    def log_inputs(self, datasets: dict[str, tuple[str, str]]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    def child(self, name: str) -> "NullLogger":
        return NullLogger()


class MlflowLogger:
    def __init__(self, uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None,
                 artifact_location: str | None = None, system_metrics: bool = False):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        # Without an explicit location MLflow puts artifacts in ./mlruns of whatever the working
        # directory happens to be.
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=artifact_location)
        if exp is None or "mlflow.experimentKind" not in exp.tags:
            # The MLflow UI opens an experiment of this kind on its runs table, not its GenAI pages.
            self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        self.experiment = experiment
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self.parent_run_id = parent_run_id or ""
        if run_id is None:
            run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
        self.run_id = run_id
        self.monitor = None
        if system_metrics:
            # MLflow's sampler of CPU, memory, disk, network (and GPU) use, as `log_system_metrics=True`
            # gives an active run; here for a run of this client, which has no active run.
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
            self.monitor.start()

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

    def log_model(self, model_dir: Path, how: str, *, step: int = 0, dtype: str = "", card: str = "",
                  registered_model_name: str = "", version_tags: dict[str, str] | None = None,
                  description: str = "") -> dict[str, str]:
        """The saved model folder `model_dir` (config.json, weights, tokenizer) logged to this run
        under `model`: as plain artifacts (how="artifact") or as an MLflow Model of the transformers
        flavour (how="transformers": a LoggedModel of the run's experiment, output of this run at
        `step`). The folder is copied as it is: nothing is loaded into memory or downloaded. With
        `registered_model_name` it also becomes the next version of that registered model (created
        on first use), with `version_tags` and `description`. Returns the source URI, and the
        model id and registered version where there are ones."""
        if how == "artifact":
            self.log_artifacts(model_dir, "model")
            out = {"source": f"{self.client.get_run(self.run_id).info.artifact_uri.rstrip('/')}/model"}
        elif how == "transformers":
            out = self._log_transformers(Path(model_dir), step, dtype, card)
        else:
            raise ValueError(f"tracking.log_model: {how!r} is not one of {list(LOG_MODEL)}")
        if registered_model_name:
            out["version"] = self._register(registered_model_name, out["source"], out.get("model_id"),
                                            version_tags or {}, description)
        return out

    def _log_transformers(self, model_dir: Path, step: int, dtype: str, card: str) -> dict[str, str]:
        # The flavour's save_model writes the MLflow Model folder and the client uploads it; this is
        # what mlflow.transformers.log_model does, minus its use of the process-wide tracking URI and
        # active experiment, which this logger never relies on (see the module docstring).
        import mlflow.transformers
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        logged = self.client.create_logged_model(self.experiment_id, name="model", source_run_id=self.run_id)
        try:
            mlflow_model = Model(artifact_path=logged.artifact_location, run_id=self.run_id,
                                 model_id=logged.model_id, model_uuid=logged.model_id)
            # Beside the model folder, not in /tmp: the copy is as large as the model.
            with tempfile.TemporaryDirectory(prefix=".mlflow-model-", dir=model_dir.parent) as tmp:
                local = Path(tmp) / "model"
                mlflow.transformers.save_model(
                    str(model_dir), path=str(local), task="text-generation", mlflow_model=mlflow_model,
                    torch_dtype=_torch_dtype(dtype), model_card=_model_card(card),
                    pip_requirements=_requirements())
                self.client.log_model_artifacts(logged.model_id, str(local))
        except BaseException:
            self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=step)])
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        return {"source": logged.artifact_location, "model_id": logged.model_id}

    def _register(self, name: str, source: str, model_id: str | None, tags: dict[str, str],
                  description: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="Models logged by selfalign runs, one "
                                                                   "version per round")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        token = tags.get("selfalign.model_token")
        if token:  # a rerun of a finished round: its model is registered already
            found = self.client.search_model_versions(
                f"name = '{name}' and tags.`selfalign.model_token` = '{token}'")
            if found:
                return str(min(int(v.version) for v in found))
        # The source is the artifact location itself, not models:/<id>: MLflow's registry resolves
        # a models:/ URI through the process-wide tracking URI, which may name another store.
        version = self.client.create_model_version(name, source, run_id=self.run_id, tags=tags,
                                                   description=description, model_id=model_id)
        return str(version.version)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        """A table the MLflow UI shows (the run's artifacts, and its Evaluation view): equal-length
        columns, written as `artifact_file` (a .json path)."""
        self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def child(self, name: str) -> "MlflowLogger":
        return MlflowLogger(self.uri, self.experiment, name, parent_run_id=self.run_id)

    def log_inputs(self, datasets: dict[str, tuple[str, str]]) -> None:
        """The run's datasets as MLflow inputs: name -> (source, digest)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        self.client.log_inputs(self.run_id, [
            DatasetInput(Dataset(name=name, digest=digest, source_type="local" if Path(src).exists() else "hugging_face",
                                 source=str(src)), tags=[InputTag("mlflow.data.context", name)])
            for name, (src, digest) in datasets.items()])

    def close(self, status: str = "FINISHED") -> None:
        if self.monitor is not None:
            self.monitor.finish()
        self.client.set_terminated(self.run_id, status=status)


def resolve_uri(configured: str, run_dir: Path) -> str:
    """The tracking URI of a run: `tracking.uri`, else MLFLOW_TRACKING_URI (a tracking server the
    user pointed the shell at), else the run's own SQLite store `<run_dir>/mlflow.db`."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or local_uri(run_dir)


def local_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def create_local_store(uri: str) -> None:
    """Creates the run's own SQLite store (MLflow's import and its schema migrations, 1-3 s) if it
    is that and does not exist yet; the command line does it while its temporary Prefect server is
    still starting, instead of in the flow."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def make_logger(uri: str, experiment: str, run_name: str, artifact_location: str | None = None) -> MlflowLogger | NullLogger:
    if uri == "none":
        return NullLogger()
    return MlflowLogger(uri, experiment, run_name, artifact_location=artifact_location)


def _torch_dtype(dtype: str) -> Any:
    if not dtype:
        return None
    import torch

    return getattr(torch, dtype)


def _model_card(text: str) -> Any:
    """A model card from `text`, so MLflow does not look one up on the hub by the folder's name."""
    from huggingface_hub import ModelCard

    return ModelCard(text or "---\ntags: [selfalign]\n---\n")


def _requirements() -> list[str]:
    out = []
    for pkg in _MODEL_REQUIREMENTS:
        try:
            out.append(f"{pkg}=={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def log_round_model(tracker: MetricLogger, cfg: Any, r: int, model_dir: Path, policy: str) -> dict[str, str]:
    """Round r's model (trained from `policy`), logged to the round's run as `tracking.log_model`
    chooses and, with `tracking.registered_model_name`, registered as the next version of that
    model, tagged with the run and the round and described with the policy it was trained from."""
    t = cfg.tracking
    if t.log_model == "none":
        return {}
    tags = {"selfalign.run": cfg.run.name, "selfalign.round": str(r), "selfalign.run_dir": str(cfg.run_dir),
            "selfalign.model_dir": str(Path(model_dir).resolve()), "selfalign.reference": str(policy)}
    parent = getattr(tracker, "parent_run_id", "") or ""
    if parent:
        tags["selfalign.parent_run_id"] = parent
    from selfalign.tasks.artifacts import manifest_path, read_json

    manifest = manifest_path(Path(model_dir))  # written by the train stage
    if manifest.is_file():
        # The token changes whenever training really ran: a rerun that skipped it registers no
        # second version of the same model.
        tags["selfalign.model_token"] = str(read_json(manifest).get("token", ""))
    description = (f"selfalign run {cfg.run.name!r}, round {r} of {cfg.run.rounds}: {cfg.train.loss} on the "
                   f"round's pairs, from {policy}; folder {model_dir}")
    card = (f"---\ntags: [selfalign, round-{r}]\n---\n# {cfg.run.name}, round {r}\n\n{description}\n")
    return tracker.log_model(Path(model_dir), t.log_model, step=r, dtype=cfg.model.dtype, card=card,
                             registered_model_name=t.registered_model_name, version_tags=tags,
                             description=description)
