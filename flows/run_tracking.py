"""What a run records in MLflow beside its metrics: the parent run's tags and dataset inputs, the
round runs' trackers, the round tables the UI can browse, and the links between the MLflow and
Prefect runs (tags one way, the summary artifact and the runs table the other)."""
from __future__ import annotations

from pathlib import Path

from selfalign.flows.config import Config
from selfalign.tasks import artifacts
from selfalign.tasks.config_base import digest
from selfalign.tasks.data import load_data
from selfalign.tasks.tracking import MetricLogger, local_uri, make_logger, resolve_uri


def tracking_uri(cfg: Config) -> str:
    return resolve_uri(cfg.tracking.uri, cfg.run_dir)



def open_run_tracker(cfg: Config):
    """The run's tracker (MLflow parent run, or the null logger) with the config as its params."""
    # With the default local store, artifacts live beside it in the run directory (a continual chain's
    # runs share the store of the folder above theirs).
    store_dir = cfg.run_dir.parent if cfg.continual.alias else cfg.run_dir
    local = tracking_uri(cfg) == local_uri(store_dir)
    artifacts_at = (store_dir / "mlartifacts").resolve().as_uri() if local else None
    tracker = make_logger(tracking_uri(cfg), cfg.tracking.experiment, cfg.run.name, artifacts_at)
    tracker.log_params(cfg.flat())
    for key, value in prefect_tags().items():
        tracker.set_tag(key, value)
    tracker.set_tag("selfalign.arm", cfg.pairs.source)  # dice, or the offline-only control arm
    for key, value in run_tags(cfg).items():
        tracker.set_tag(key, value)
    tracker.log_inputs(dataset_inputs(cfg))
    return tracker



def round_tracker(cfg: Config, parent_run_id: str, name: str) -> MetricLogger:
    from selfalign.tasks.tracking import MlflowLogger, NullLogger

    uri = tracking_uri(cfg)
    if uri == "none":
        return NullLogger()
    return MlflowLogger(uri, cfg.tracking.experiment, name, parent_run_id=parent_run_id or None, tags=prefect_tags(),
                        system_metrics=cfg.tracking.system_metrics)



def run_tags(cfg: Config) -> dict[str, str]:
    """The parent run's description (MLflow's note), loss, start model and the source's git commit."""
    start = cfg.model.policy or f"pi_0 trained from {cfg.model.reference}"
    note = (f"{cfg.run.name}: {cfg.run.rounds} round(s) of {cfg.train.loss} "
            f"({'DICE: generated pairs mixed with offline ones' if cfg.pairs.source == 'dice' else 'offline pairs only'}), "
            f"from {start}")
    tags = {"mlflow.note.content": note, "selfalign.loss": cfg.train.loss, "selfalign.start": start}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags



def git_commit() -> str:
    """The commit of the selfalign source that runs, when it is a git checkout ("" otherwise)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""



def dataset_inputs(cfg: Config) -> dict[str, tuple[str, str]]:
    """data.<name> -> (source, digest of its rows as loaded), for MLflow's run inputs."""
    data = load_data(cfg)
    out = {}
    for name in ("prompts", "eval_prompts", "offline_pairs", "heldout_pairs"):
        rows = getattr(data, name)
        if getattr(cfg.data, name):
            out[name] = (getattr(cfg.data, name), digest(rows))
    return out



def prefect_tags() -> dict[str, str]:
    """The Prefect flow run an MLflow run belongs to: its id and its page in the Prefect UI."""
    from prefect.runtime import flow_run

    return {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow_run_url": str(flow_run.ui_url or "")}



def runs_table_url(uri: str, tracker: MetricLogger) -> str:
    """The MLflow UI's runs table of the run's experiment: on the tracking server, or on `mlflow ui`
    started on a local store at its default address."""
    if not getattr(tracker, "experiment_id", ""):
        return ""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{tracker.experiment_id}/runs"



def mlflow_run_url(uri: str, tracker: MetricLogger) -> str:
    """The run's page in the MLflow UI when the store is a server; else how to open the UI on it."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
    return f"mlflow ui --backend-store-uri {uri}"



def summary_markdown(cfg: Config, rows: list[dict], tracker: MetricLogger, stopped: str) -> str:
    """The Prefect run's artifact: the round table and where the MLflow run is."""
    from selfalign.flows.compare import format_markdown

    where = mlflow_run_url(tracking_uri(cfg), tracker) if getattr(tracker, "run_id", "") else "tracking is off"
    lines = [f"# {cfg.run.name}: {len(rows) - 1} round(s)", "", format_markdown(rows), f"MLflow: {where}", ""]
    if stopped:
        lines.insert(4, f"Stopped early: {stopped}\n")
    return "\n".join(lines)



# Rows of each browsable table in MLflow; the whole tables stay in the round's folder as Parquet.
TABLE_ROWS = 500



def log_tables(tracker: MetricLogger, rd: Path) -> None:
    """Round tables the MLflow UI can show (tables/*.json): the generated samples with their scores
    (the first TABLE_ROWS), the training pairs with their shaped scores and lengths, and the greedy
    eval answers with the checkers' verdicts."""
    def cut(rows: list[dict], keys: list[str]) -> dict[str, list]:
        return {k: [row.get(k) for row in rows[:TABLE_ROWS]] for k in keys}

    if (rd / "scores.parquet").exists():
        tracker.log_table(cut(artifacts.read_table(rd / "scores.parquet"),
                              ["prompt_id", "k", "prompt", "response", "score", "policy_logp", "ref_logp", "n_tokens",
                               "finish_reason"]), "tables/samples.json")
    if (rd / "pairs.parquet").exists():
        tracker.log_table(cut(artifacts.read_table(rd / "pairs.parquet"),
                              ["source", "prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score",
                               "chosen_len", "rejected_len"]), "tables/pairs.json")
    if (rd / "eval_greedy.parquet").exists() and (rd / "eval_per_prompt.json").exists():
        rows, verdicts = artifacts.read_table(rd / "eval_greedy.parquet"), artifacts.read_json(rd / "eval_per_prompt.json")
        for row in rows:
            for name, values in (verdicts.get("greedy") or {}).items():
                row[name] = values.get(row["prompt_id"])
            row["group"] = (verdicts.get("groups") or {}).get(row["prompt_id"], "")
        tracker.log_table(cut(rows, ["prompt_id", "prompt", "response", "finish_reason", "group",
                                     *(verdicts.get("greedy") or {})]), "tables/eval_answers.json")
