"""Continual bootstrapping (the `continual` config section), for runs on a schedule: each run of a
chain starts from the model that a registered-model alias names (`@champion`), trains on prompts that
no earlier run of the chain used, writes into a fresh folder `<run dir>/<time>`, and at its end moves
the alias to its final model only if that beats its start model on the held-out metric by more than
the margin. The first run of a chain starts from the preset's model. The decision and its numbers are
logged to the run's MLflow parent run (tags `continual.*`, metrics `continual/*`)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from selfalign.tasks import artifacts

USED = "used_prompts.json"  # in a run folder: the training prompt ids of its chain so far (its own included)
CHAIN = "continual.json"    # in a run folder: where the run started from and which prompts it left out


def client_for(cfg):
    from mlflow.tracking import MlflowClient

    from selfalign.tasks.tracking import resolve_uri

    return MlflowClient(tracking_uri=resolve_uri(cfg.tracking.uri, cfg.run_dir))


def champion(cfg) -> Any | None:
    """The registered version the alias names, or None (the chain's first run)."""
    from mlflow.exceptions import MlflowException

    try:
        return client_for(cfg).get_model_version_by_alias(cfg.tracking.registered_model_name, cfg.continual.alias)
    except MlflowException:
        return None


def continue_chain(config: dict) -> dict:
    """The config of the chain's next run: from the champion's model (and the model it was trained
    from, its reference) when there is one, in a fresh folder, with the store fixed to the chain's.
    Writes the new folder's `continual.json` (start version, prompts left out)."""
    from selfalign.flows.config import from_dict
    from selfalign.tasks.tracking import resolve_uri

    cfg = from_dict(config)
    base = cfg.run_dir
    found = champion(cfg)
    run = dataclasses.replace(cfg.run, dir=str(base / time.strftime("%Y%m%d-%H%M%S")))
    tracking = dataclasses.replace(cfg.tracking, uri=resolve_uri(cfg.tracking.uri, base))
    model, excluded, start = cfg.model, [], {"alias": cfg.continual.alias, "version": None}
    if found is not None:
        tags = found.tags
        model = dataclasses.replace(cfg.model, policy=tags["selfalign.model_dir"], reference=tags["selfalign.reference"])
        used = tags.get("selfalign.used_prompts", "")
        excluded = artifacts.read_json(Path(used)) if used and Path(used).is_file() else []
        start = {"alias": cfg.continual.alias, "version": str(found.version), "model": model.policy}
    new = dataclasses.replace(cfg, run=run, tracking=tracking, model=model)
    new.run_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(new.run_dir / CHAIN, start | {"excluded_prompts": excluded})
    return new.to_dict()


def excluded_prompts(run_dir: Path) -> set[str]:
    """The training prompt ids earlier runs of the chain used (none outside a chain)."""
    path = Path(run_dir) / CHAIN
    return set(artifacts.read_json(path)["excluded_prompts"]) if path.is_file() else set()


def decide(cfg, rows: list[dict], used: list[str], tracker) -> dict:
    """Moves the alias to the run's final registered version when its metric beats the start's (round
    0: the champion, or the preset's model) by more than the margin; logs and returns the decision."""
    c, name = cfg.continual, cfg.tracking.registered_model_name
    start, final = rows[0].get(c.metric), rows[-1].get(c.metric)
    chain = artifacts.read_json(cfg.run_dir / CHAIN) if (cfg.run_dir / CHAIN).is_file() else {}
    used_path = cfg.run_dir / USED
    artifacts.write_json(used_path, sorted(set(chain.get("excluded_prompts", [])) | set(used)))
    client = client_for(cfg)
    last = rows[-1]["round"]
    versions = client.search_model_versions(f"name = '{name}' and tags.`selfalign.run_dir` = '{cfg.run_dir}' "
                                            f"and tags.`selfalign.round` = '{last}'")
    version = str(max(int(v.version) for v in versions)) if versions else ""
    promote = (version != "" and last > 0 and start is not None and final is not None
               and final - start > c.margin)
    decision = {"promoted": promote, "alias": c.alias, "metric": c.metric, "start": start, "final": final, "margin": c.margin,
                "version": version, "from_version": chain.get("version")}
    if version:
        client.set_model_version_tag(name, version, "selfalign.used_prompts", str(used_path.resolve()))
    if promote:
        client.set_registered_model_alias(name, c.alias, version)
    tracker.set_tag("continual.decision", "promoted" if promote else "kept")
    tracker.set_tag("continual.from_version", str(chain.get("version") or "none"))
    tracker.log_metrics({k: float(v) for k, v in (("continual/start", start), ("continual/final", final),
                                                   ("continual/margin", c.margin)) if v is not None}, step=last)
    artifacts.write_json(cfg.run_dir / "continual_decision.json", decision)
    return decision


def describe(d: dict) -> str:
    if d["start"] is None or d["final"] is None:
        return f"continual: no {d['metric']} to compare: @{d['alias']} stays"
    head = f"continual: {d['metric']} {d['start']:.4f} -> {d['final']:.4f} (margin {d['margin']}): "
    return head + (f"version {d['version']} is now @{d['alias']}" if d["promoted"] else f"@{d['alias']} stays")
