"""`selfalign deploy <preset>`: registers the run flow as a Prefect deployment on a process work pool,
with the preset's resolved config as its parameters and an optional cron schedule.

No image and no remote repository: the deployment's code source is this project's folder
(`Flow.from_source(<project>, "flows/pipeline.py:run_flow")`), which Prefect records as a pull step
that sets the flow run's working directory there. A process worker on a machine with the same
folder and environment runs it: `prefect worker start --pool <pool>`.

`deploy/prefect.yaml` declares the same deployment for `prefect deploy` (the demo preset)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from selfalign.flows.config import Config

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/pipeline.py:run_flow"
FLOW_NAME = "selfalign-run"
# The flow run's process gets the worker's environment plus these: offline and quiet engines.
JOB_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "TOKENIZERS_PARALLELISM": "false",
}


class DeployError(RuntimeError):
    """Deployment cannot be registered; the message says what to do."""


def deployment_config(cfg: Config, cwd: Path | None = None) -> dict[str, Any]:
    """The flow's parameters: the resolved config, with what a worker would resolve differently
    pinned now. The run directory becomes absolute (a process worker runs flows elsewhere), and an
    MLflow server exported in this shell becomes `tracking.uri`."""
    d = cfg.to_dict()
    base = Path(cwd or Path.cwd())
    d["run"]["dir"] = str((base / cfg.run_dir).resolve()) if not Path(cfg.run_dir).is_absolute() else str(cfg.run_dir)
    if not d["tracking"]["uri"] and os.environ.get("MLFLOW_TRACKING_URI"):
        d["tracking"]["uri"] = os.environ["MLFLOW_TRACKING_URI"]
    return d


def schedules(cron: str | None, timezone: str | None = None) -> list | None:
    """The deployment's schedules: one cron schedule, or none. Bad values raise ValueError."""
    if timezone:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"--timezone {timezone!r} is not a known time zone (e.g. UTC, Europe/Paris)") from None
    if not cron:
        return None
    from prefect.schedules import Cron

    return [Cron(cron, timezone=timezone)]  # raises ValueError on a malformed cron string


def ensure_pool(pool: str) -> bool:
    """Creates a process work pool named `pool` unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            return True
    if found.type != "process":
        raise DeployError(f"work pool {pool!r} is of type {found.type!r}; this command deploys to process pools")
    return False


def deploy(cfg: Config, name: str, pool: str = "selfalign", cron: str | None = None, timezone: str | None = None,
           env: dict[str, str] | None = None, out=print) -> str:
    """Registers (or updates) deployment `selfalign-run/<name>`; returns its id."""
    if not os.environ.get("PREFECT_API_URL"):
        raise DeployError("PREFECT_API_URL is not set: deployments live on a Prefect server. Start one with "
                          "`selfalign server` and export the PREFECT_API_URL it prints")
    from prefect import Flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    plan = schedules(cron, timezone)
    created = ensure_pool(pool)
    out(f"work pool {pool!r}: {'created (process)' if created else 'exists'}")
    params = deployment_config(cfg)
    flow = Flow.from_source(source=str(ROOT), entrypoint=ENTRYPOINT)
    dep_id = flow.deploy(
        name=name, work_pool_name=pool, parameters={"config": params}, schedules=plan,
        job_variables={"env": JOB_ENV | (env or {})}, build=False, push=False,
        # One run at a time: every run of a deployment writes the same run folder (or, in a continual
        # chain, starts from the model the run before it promoted); a run due while one is going waits.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy="ENQUEUE"),
        description=f"DICE run {cfg.run.name!r}: {cfg.run.rounds} rounds from {cfg.model.policy or cfg.model.reference}",
        tags=["selfalign"], print_next_steps=False, ignore_warnings=True,
    )
    out(f"deployment {FLOW_NAME}/{name} ({dep_id}) on pool {pool!r}"
        + (f", schedule cron {cron!r}" + (f" ({timezone})" if timezone else " (UTC)") if cron else ", no schedule")
        + "; one run at a time (a run due while another runs waits for it)")
    out(f"  run directory {params['run']['dir']}; MLflow {params['tracking']['uri'] or 'sqlite store in the run directory'}")
    out("next:")
    out(f"  prefect worker start --pool {pool}              # a worker with this environment, same PREFECT_API_URL")
    out(f"  prefect deployment run '{FLOW_NAME}/{name}'     # a run now (or wait for the schedule)")
    return str(dep_id)
