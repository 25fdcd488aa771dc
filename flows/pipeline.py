"""The DICE pipeline as Prefect flows: one flow for the run, a sub-flow per round, in them a task per
stage (flows/stages.py), which skips its work when its output is there from the same inputs and
config; what the runs record in MLflow beside their metrics is in flows/run_tracking.py.

    for r in 1..R:
        samples = generate(pi_{r-1})                     K samples per prompt (vLLM)
        scores  = score(samples, pi_{r-1}, ref_{r-1})    implicit reward S_pi - S_ref
        pairs   = pairs(scores, offline)                 filters, alpha*, best-vs-worst, replay gamma
        guard: stop if the reward misranks held-out pairs
        pi_r    = train(pi_{r-1}, pairs)                 DPO, reference pi_{r-1} (DeepSpeed)
        metrics = evaluate(pi_r)                         held-out prompts
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from selfalign.flows.config import Config, ConfigError, from_dict
from selfalign.flows.run_tracking import (log_tables, open_run_tracker, round_tracker, runs_table_url, summary_markdown,
                                          tracking_uri)
from selfalign.flows.stages import evaluate_task, generate_task, judge_task, pairs_task, score_task, train_task
from selfalign.tasks import artifacts, plots
from selfalign.tasks.data import load_data
from selfalign.tasks.evaluate import NextRound
from selfalign.tasks.generate import generate_key
from selfalign.tasks.tracking import check_options, log_round_model


def _log():
    return get_run_logger().info


def training_prompts(cfg: Config) -> list[dict[str, str]]:
    """data.prompts, less those earlier runs of a continual chain trained on."""
    from selfalign.flows.continual import excluded_prompts

    prompts, used = load_data(cfg).prompts, excluded_prompts(cfg.run_dir)
    return [p for p in prompts if p["id"] not in used] if used else prompts



def round_prompts(prompts: list[dict[str, str]], per_round: int, r: int) -> list[dict[str, str]]:
    """Round r's prompts: a fresh slice of `per_round` prompts (wrapping around), or all of them."""
    if not per_round or per_round >= len(prompts):
        return prompts
    start = ((r - 1) * per_round) % len(prompts)
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]



def next_round_draw(cfg: Config, r: int, model: str) -> NextRound | None:
    """Round r+1's samples from `model` (its policy) for round r's evaluation engine to draw, unless
    they are drawn already; None after the last round, for the offline arm (it draws none), and where
    round r+1's generate stage draws on workers of its own (generate.shards > 1, a cluster)."""
    if r >= cfg.run.rounds or cfg.generate.shards != 1 or cfg.cluster.address or cfg.pairs.source != "dice":
        return None
    out = artifacts.round_dir(cfg.run_dir, r + 1) / "samples.parquet"
    prompts = round_prompts(training_prompts(cfg), cfg.data.prompts_per_round, r + 1)
    key = generate_key(cfg.generate, cfg.model, model, prompts, cfg.run.seed + r + 1)[0]
    return None if artifacts.is_done(out, key) else NextRound(prompts, out, r + 1, key)



def scoring_reference(cfg: Config, r: int, reference_prev: str) -> str:
    if cfg.score.reference == "previous" or r == 1:
        return reference_prev if cfg.score.reference == "previous" else cfg.model.reference
    if cfg.score.reference == "initial":  # pi_0: given, or trained in round 0
        return cfg.model.policy or str(artifacts.round_dir(cfg.run_dir, 0) / "model")
    return cfg.model.reference



def start_config(cfg: Config) -> Config:
    """The config of round 0 from an SFT model: offline pairs only (`start.pairs` of them), the
    start's learning rate and epochs; everything else as the rounds'."""
    return dataclasses.replace(
        cfg, pairs=dataclasses.replace(cfg.pairs, source="offline", budget=cfg.start.pairs),
        train=dataclasses.replace(cfg.train, lr=cfg.start.lr or cfg.train.lr, epochs=cfg.start.epochs, max_steps=0))



def load_prompts_eval(cfg: Config) -> list[dict[str, str]]:
    rows = load_data(cfg).eval_prompts
    return rows[: cfg.data.max_eval_prompts] if cfg.data.max_eval_prompts else rows



def stopped_by_signal(e: BaseException) -> bool:
    """Whether `e` ends a run that a signal stops: our interrupt, or Prefect's own TerminationSignal
    (a task run turns SIGTERM into it before the command line's handler sees the signal)."""
    from prefect.exceptions import TerminationSignal

    from selfalign.tasks.procs import stopped_by

    return isinstance(e, (KeyboardInterrupt, TerminationSignal)) or stopped_by() is not None



def end_status(e: BaseException) -> str:
    """The MLflow status of a run that ended with `e`: KILLED when a signal stopped it."""
    return "KILLED" if stopped_by_signal(e) else "FAILED"



@flow(name="dice-start", flow_run_name="{config[run][name]}-pi0")
def start_flow(config: dict, parent_run_id: str = "") -> dict:
    """Round 0 from an SFT model: pi_0 = DPO(model.reference, offline pairs) through the pair and
    training stages, then evaluated like every round; its own MLflow run (round_0)."""
    cfg = from_dict(config)
    start = start_config(cfg)
    t0 = time.time()
    tracker = round_tracker(cfg, parent_run_id, "round_0")
    tracker.log_params({"round": 0, "policy": cfg.model.reference, "reference": cfg.model.reference})
    try:
        pairs, metrics = pairs_task(start, 0, None, load_data(cfg).offline_pairs)
        tracker.log_artifact(pairs, "tables")
        model, steps = train_task(start, 0, cfg.model.reference, pairs, tracker)
        if steps:
            metrics |= {f"train/{k}": v for k, v in steps[-1].items() if k in ("loss", "rewards/accuracies", "rewards/margins")}
        # round 1's samples come from the same vLLM engine as pi_0's evaluation: one engine start less
        metrics |= evaluate_task(cfg, 0, str(model), load_prompts_eval(cfg), also_draw=next_round_draw(cfg, 0, str(model)))
        metrics["round/seconds"] = time.time() - t0
        tracker.log_metrics(metrics, step=0)
        log_tables(tracker, artifacts.round_dir(cfg.run_dir, 0))
        log_round_model(tracker, cfg, 0, model, cfg.model.reference)
        tracker.close("FINISHED")
    except BaseException as e:
        tracker.close(end_status(e))
        raise
    return {"model": str(model), "metrics": metrics}



@flow(name="dice-round", flow_run_name="{config[run][name]}-round-{r}")
def round_flow(config: dict, r: int, policy: str, reference: str, parent_run_id: str = "") -> dict:
    cfg = from_dict(config)
    log = _log()
    t0 = time.time()
    data = load_data(cfg)
    prompts = round_prompts(training_prompts(cfg), cfg.data.prompts_per_round, r)
    offline, heldout = data.offline_pairs, data.heldout_pairs
    if cfg.data.max_heldout_pairs:
        heldout = heldout[: cfg.data.max_heldout_pairs]
    tracker = round_tracker(cfg, parent_run_id, f"round_{r}")
    tracker.log_params({"round": r, "policy": policy, "reference": reference})
    result: dict[str, Any] = {"round": r, "model": policy, "stopped": ""}
    metrics: dict[str, Any] = {}
    try:
        scores = None  # the offline arm (pairs.source=offline) neither samples nor scores
        if cfg.pairs.source == "dice":
            samples, st = generate_task(cfg, r, policy, prompts)
            metrics |= st
            scores, st = score_task(cfg, r, samples, policy, scoring_reference(cfg, r, reference), heldout)
            metrics |= st
        pairs, st = pairs_task(cfg, r, scores, offline)
        metrics |= st
        rd = artifacts.round_dir(cfg.run_dir, r)
        tracker.log_artifact(pairs, "tables")
        if scores:
            tracker.log_artifact(rd / "alpha_sweep.json", "tables")
        acc = metrics.get("eval/pair_accuracy", math.nan)
        if scores and heldout and not acc >= cfg.guard.min_pair_accuracy:
            result["stopped"] = (f"round {r}: the implicit reward ranks only {acc:.3f} of the held-out pairs "
                                 f"correctly (guard.min_pair_accuracy = {cfg.guard.min_pair_accuracy}); "
                                 f"stopping before training, the run ends with {policy}")
            log(result["stopped"])
        elif metrics["pairs/kept"] == 0:
            result["stopped"] = f"round {r}: no training pairs survived the filters; stopping"
            log(result["stopped"])
        else:
            model, steps = train_task(cfg, r, policy, pairs, tracker)
            if steps:
                metrics |= {f"train/{k}": v for k, v in steps[-1].items()
                            if k in ("loss", "rewards/accuracies", "rewards/margins")}
            # round r+1's samples come from the same vLLM engine as this evaluation: one engine start less
            metrics |= evaluate_task(cfg, r, str(model), load_prompts_eval(cfg),
                                     also_draw=next_round_draw(cfg, r, str(model)))
            if cfg.evaluate.judge_url:
                metrics |= judge_task(cfg, r)
            result["model"] = str(model)
        metrics["round/seconds"] = time.time() - t0
        tracker.log_metrics(metrics, step=r)
        artifacts.write_json(artifacts.round_dir(cfg.run_dir, r) / "metrics.json", metrics)
        log_tables(tracker, artifacts.round_dir(cfg.run_dir, r))
        if cfg.tracking.plots:
            for png in plots.round_plots(cfg.run_dir, r, cfg.pairs.length_unit):
                tracker.log_artifact(png, "plots")
        if not result["stopped"]:
            log_round_model(tracker, cfg, r, Path(result["model"]), policy)
        tracker.close("KILLED" if result["stopped"] else "FINISHED")
    except BaseException as e:
        log(f"round {r} {'stopped by a signal' if stopped_by_signal(e) else 'failed'}: {e!r}")
        tracker.close(end_status(e))
        raise
    result["metrics"] = metrics
    return result



def run_name() -> str:
    """The flow run's name: run.name, and for a run of a continual chain its start time as well, so
    that a deployment's scheduled runs can be told apart in the Prefect UI."""
    from prefect.runtime import flow_run

    config = flow_run.parameters["config"]
    name = config["run"]["name"]
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" if (config.get("continual") or {}).get("alias") else name



@flow(name="selfalign-run", flow_run_name=run_name)
def run_flow(config: dict) -> dict:
    """Multi-round DICE from pi_0: `model.policy` (DPO-trained against `model.reference`), or with
    `model.policy` empty, pi_0 trained first from the SFT model `model.reference` (round 0)."""
    cfg = from_dict(config)
    check_options(cfg.tracking.log_model)
    if cfg.continual.alias:  # a run of a chain: from the champion, in a fresh folder
        from selfalign.flows.continual import continue_chain

        config = continue_chain(config)
        cfg = from_dict(config)
        _log()(f"continual: from {cfg.model.policy or cfg.model.reference}, into {cfg.run_dir}")
    if cfg.model.policy and artifacts.same_weights(cfg.model.policy, cfg.model.reference):
        raise ConfigError(f"model.policy and model.reference hold the same weights ({cfg.model.policy}): the implicit "
                          "reward log pi - log ref is zero for every sample, so round 1 would rank nothing. Leave "
                          "model.policy empty to train pi_0 from the SFT model (model.reference) on the offline pairs first")
    with artifacts.run_lock(cfg.run_dir):
        if cfg.cluster.address:
            check_cluster(cfg)
        return _rounds(cfg, config)



def check_cluster(cfg: Config) -> None:
    """Every node of the Ray cluster sees the run folder, or the run stops naming the node that does not."""
    from selfalign.tasks.cluster import SharedStorageError, check_shared_storage

    try:
        check_shared_storage(cfg.cluster, cfg.run_dir, _log())
    except SharedStorageError as e:
        raise ConfigError(f"cluster.address: {e}") from None



def _rounds(cfg: Config, config: dict) -> dict:
    log = _log()
    # Every dataset is read and checked (rows, ids, lengths against the model's context) before the
    # first engine starts; under data.on_bad_row=skip the dropped rows are counted here.
    data = load_data(cfg)
    if data.warning():
        get_run_logger().warning(data.warning())
    tracker = open_run_tracker(cfg)
    parent = getattr(tracker, "run_id", "")
    tracker.log_metrics(data.metrics(), step=0)
    rows = []
    try:
        t0 = time.time()
        policy, reference = cfg.model.policy, cfg.model.reference
        if policy:
            # round 1's samples come from the same vLLM engine as pi_0's evaluation: one engine start less
            base = evaluate_task(cfg, 0, policy, load_prompts_eval(cfg), also_draw=next_round_draw(cfg, 0, policy))
            base["round/seconds"] = time.time() - t0
        else:  # round 0: pi_0 from the SFT model
            start = start_flow(config, parent)
            policy, base = start["model"], start["metrics"]
        artifacts.write_json(artifacts.round_dir(cfg.run_dir, 0) / "metrics.json", base)
        tracker.log_metrics(base, step=0)
        rows.append({"round": 0, **base})
        stopped = ""
        for r in range(1, cfg.run.rounds + 1):
            res = round_flow(config, r, policy, reference, parent)
            tracker.log_metrics(res["metrics"], step=r)
            rows.append({"round": r, **res["metrics"]})
            if res["stopped"]:
                stopped = res["stopped"]
                break
            reference, policy = policy, res["model"]
        summary = {"rounds": rows, "final_model": policy, "stopped": stopped,
                   "tracking_uri": tracking_uri(cfg), "run_dir": str(cfg.run_dir),
                   "runs_table": runs_table_url(tracking_uri(cfg), tracker)}
        if cfg.continual.alias:
            from selfalign.flows.continual import decide, describe

            pool = training_prompts(cfg)
            used = [p["id"] for r in range(1, rows[-1]["round"] + 1)
                    for p in round_prompts(pool, cfg.data.prompts_per_round, r)]
            summary["continual"] = decide(cfg, rows, used, tracker)
            log(describe(summary["continual"]))
        artifacts.write_json(cfg.run_dir / "summary.json", summary)
        tracker.log_artifact(cfg.run_dir / "summary.json")
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(summary_markdown(cfg, rows, tracker, stopped), key="round-table",
                                 description=f"{cfg.run.name}: the round table and the MLflow run")
        if cfg.tracking.plots:
            title = f"{cfg.run.name}: evaluation over rounds"
            tracker.log_artifact(plots.rounds_plot(rows, cfg.run_dir / "rounds.png", title), "plots")
        tracker.close("FINISHED")
    except BaseException as e:
        tracker.close(end_status(e))
        raise
    log(f"final model: {policy}")
    return summary
