"""The DICE pipeline as Prefect flows: one flow for the run, a sub-flow per round, a task per stage.
Tasks are thin: they take and return paths and metrics, call the stage function, and skip the work
when the stage's manifest shows its output came from the same inputs and config.

    for r in 1..R:
        samples = generate(pi_{r-1})                     K samples per prompt (vLLM)
        scores  = score(samples, pi_{r-1}, ref_{r-1})    implicit reward S_pi - S_ref
        pairs   = pairs(scores, offline)                 filters, alpha*, best-vs-worst, replay gamma
        guard: stop if the reward misranks held-out pairs
        pi_r    = train(pi_{r-1}, pairs)                 DPO, reference pi_{r-1} (DeepSpeed)
        metrics = evaluate(pi_r)                         held-out prompts

generate.shards / score.shards > 1: the stage task maps a worker task over its workers (Prefect task
mapping on the flow's thread-pool task runner; each worker is a process of its own), waits for all of
them and joins their parts; with no Prefect server the flow's temporary one records them as usual.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from selfalign.flows.config import Config, ConfigError, from_dict
from selfalign.tasks.cluster_config import ClusterConfig
from selfalign.tasks import artifacts, plots
from selfalign.tasks.config_base import digest
from selfalign.tasks.data import load_data
from selfalign.tasks.evaluate import NextRound, evaluate_key, run_evaluate
from selfalign.tasks.generate import generate_key, run_generate, run_vllm
from selfalign.tasks.judge import Judge, judge_round
from selfalign.tasks.pairs import pairs_key, run_pairs
from selfalign.tasks.tracking import (MetricLogger, check_options, local_uri, log_round_model, make_logger,
                                      resolve_uri)
from selfalign.tasks.train import checkpoint_dir, run_train, train_key


def _log():
    return get_run_logger().info


def _stage(output: Path, key: dict[str, Any], work, stats_path: Path, settings: dict[str, Any] | None = None,
           keep_old: bool = False) -> dict[str, Any]:
    """Run `work()` unless `output` is already there from the same key; returns the stage's stats.
    `settings` (the config keys the stage reads) are recorded beside the key, so that a rerun names
    the keys that changed; with `keep_old`, an output made again is first moved aside, not replaced."""
    why = artifacts.why_not_done(output, key, settings)
    if not why and stats_path.exists():
        _log()(f"{output.name}: up to date, skipped")
        return artifacts.read_json(stats_path)
    if why != "not made yet":
        _log()(f"{output.name}: running again, {why or 'its stats are missing'}")
        if keep_old and output.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            kept = next(k for i in range(1, 1000) if not (k := output.with_name(
                f"{output.name}.before-{stamp}" + (f"-{i}" if i > 1 else ""))).exists())
            os.replace(output, kept)
            _log()(f"{output.name}: the earlier one is kept as {kept.name} (run.keep_old_models)")
    stats = work()
    artifacts.write_json(stats_path, stats)
    artifacts.mark_done(output, key, settings)
    return stats


@task(name="generate-worker", cache_policy=NO_CACHE, task_run_name="generate-worker-{worker}")
def generate_worker_task(job: dict, job_path: Path, kv_cache_gib: float, worker: int,
                         cluster: ClusterConfig | None = None, tensor_parallel_size: int = 1) -> int:
    """One generation worker: its vLLM engine draws its shards (each written with its manifest). With
    a cluster the engine runs in a Ray task on the node Ray places it on; this task run waits for it."""
    if cluster is not None and cluster.address:
        from selfalign.tasks.cluster import run_generate_worker

        return len(run_generate_worker(cluster, job, job_path, kv_cache_gib, tensor_parallel_size, _log())["drawn"])
    return sum(map(len, run_vllm(job, job_path, kv_cache_gib, _log())))


@task(name="score-worker", cache_policy=NO_CACHE, task_run_name="score-worker-{worker}")
def score_worker_task(job: dict, job_path: Path, worker: int, cluster: ClusterConfig | None = None) -> Path:
    """One scoring worker: its share of the batches, under every model of the score stage (with a
    cluster: in a Ray task, as for generation)."""
    if cluster is not None and cluster.address:
        from selfalign.tasks.cluster import run_score_worker as run_on_cluster

        return run_on_cluster(cluster, job, job_path, _log())
    from selfalign.tasks.score import run_score_worker

    return run_score_worker(job, job_path, _log())


def _map_generate(kv_cache_gib: float, cluster: ClusterConfig | None = None, tensor_parallel_size: int = 1):
    def run(calls: list[tuple[dict, Path]]) -> list[int]:
        futures = generate_worker_task.map([c[0] for c in calls], [c[1] for c in calls], unmapped(kv_cache_gib),
                                           list(range(len(calls))), unmapped(cluster), unmapped(tensor_parallel_size))
        return [f.result() for f in futures]  # waits for all; raises the first failure
    return run


def _map_score(cluster: ClusterConfig | None = None):
    def run(calls: list[tuple[dict, Path]]) -> list[Path]:
        futures = score_worker_task.map([c[0] for c in calls], [c[1] for c in calls], list(range(len(calls))),
                                        unmapped(cluster))
        return [f.result() for f in futures]
    return run


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(cfg: Config, r: int, model: str, prompts: list[dict[str, str]]) -> tuple[Path, dict]:
    rd = artifacts.round_dir(cfg.run_dir, r)
    out = rd / "samples.parquet"
    key, keyed = generate_key(cfg.generate, cfg.model, model, prompts, cfg.run.seed + r)
    stats = _stage(out, key, lambda: run_generate(cfg.generate, cfg.model, model, prompts, out, rd, r, key, _log(),
                                                  map_workers=_map_generate(cfg.generate.kv_cache_gib, cfg.cluster,
                                                                            cfg.generate.tensor_parallel_size),
                                                  run_seed=cfg.run.seed, cluster=cfg.cluster),
                   rd / "generate.stats.json", keyed)
    artifacts.remove_shards(out)
    return out, stats


@task(name="score", cache_policy=NO_CACHE)
def score_task(cfg: Config, r: int, samples: Path, policy: str, reference: str,
               heldout: list[dict[str, str]]) -> tuple[Path, dict]:
    from selfalign.tasks.score import run_score, score_key

    rd = artifacts.round_dir(cfg.run_dir, r)
    out = rd / "scores.parquet"
    refs = cfg.train.extra_references()  # MRPO's additional references: the score stage scores them too
    key, keyed = score_key(cfg.score, cfg.model, samples, policy, reference, heldout, refs)
    stats = _stage(out, key, lambda: run_score(cfg.score, cfg.model, samples, policy, reference, heldout, out, _log(),
                                               map_workers=_map_score(cfg.cluster), references=refs,
                                               cluster=cfg.cluster),
                   rd / "score.stats.json", keyed)
    return out, stats


@task(name="pairs", cache_policy=NO_CACHE)
def pairs_task(cfg: Config, r: int, scores: Path | None, offline: list[dict[str, str]]) -> tuple[Path, dict]:
    """Round r's training pairs; from the offline pairs alone when `scores` is None."""
    rd = artifacts.round_dir(cfg.run_dir, r)
    out = rd / "pairs.parquet"
    labels = {"preferred": cfg.evaluate.preferred, "checker": cfg.evaluate.checker}  # label statistics
    key, keyed = pairs_key(cfg.pairs, scores, offline, cfg.run.seed + r, **labels)
    stats = _stage(out, key, lambda: run_pairs(cfg.pairs, scores, offline, out, rd / "alpha_sweep.json",
                                               cfg.run.seed + r, _log(), get_run_logger().warning, **labels),
                   rd / "pairs.stats.json", keyed)
    return out, stats


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: Config, r: int, model: str, pairs: Path, tracker: MetricLogger | None = None) -> tuple[Path, list[dict]]:
    """Round r's training; with `tracker`, each step's metrics reach it while training runs, and the
    steps it did not see then (a skipped stage, a resumed one's earlier steps) when it ends."""
    rd = artifacts.round_dir(cfg.run_dir, r)
    out = rd / "model"
    key, keyed = train_key(cfg.train, cfg.model, model, pairs, cfg.run.seed + r)
    steps_path = rd / "train.steps.json"
    seen: set[int] = set()

    def on_step(row: dict) -> None:
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        seen.add(row["step"])

    _stage(out, key, lambda: {"steps": run_train(cfg, model, pairs, out, cfg.run.seed + r, _log(), key=key,
                                                 on_step=on_step if tracker is not None else None,
                                                 batch_tokens=cfg.score.batch_tokens)},
           steps_path, keyed, keep_old=cfg.run.keep_old_models)
    if tracker is not None:
        for row in artifacts.read_json(steps_path)["steps"]:
            if row["step"] not in seen:
                on_step(row)
    if not cfg.train.keep_checkpoints and checkpoint_dir(out).exists():
        shutil.rmtree(checkpoint_dir(out))  # only once the model and its manifest are written
    return out, artifacts.read_json(steps_path)["steps"]




@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: Config, r: int, model: str, prompts: list[dict[str, str]],
                  also_draw: NextRound | None = None) -> dict:
    """Evaluates the model that round r produced (r = 0: pi_0). With `also_draw` (next_round_draw),
    the same vLLM engine also draws round r+1's samples and records them as round r+1's finished
    generate stage."""
    rd = artifacts.round_dir(cfg.run_dir, r)
    out = rd / "eval_greedy.parquet"
    key, keyed = evaluate_key(cfg.evaluate, cfg.generate, cfg.model, model, prompts)

    def work():
        metrics, gen = run_evaluate(cfg.evaluate, cfg.generate, cfg.model, model, prompts, rd, cfg.run.seed + 7919 * r,
                                    _log(), next_round=also_draw, run_seed=cfg.run.seed)
        if also_draw:
            artifacts.write_json(also_draw.output.parent / "generate.stats.json", gen)
            artifacts.mark_done(also_draw.output, also_draw.key)
            artifacts.remove_shards(also_draw.output)
        return metrics

    return _stage(out, key, work, rd / "evaluate.stats.json", keyed)


@task(name="judge", cache_policy=NO_CACHE)
def judge_task(cfg: Config, r: int) -> dict:
    """Round r's greedy eval answers against round r-1's, by the external judge (evaluate.judge_*);
    rerun only when either round's answers or the judge change."""
    rd, e = artifacts.round_dir(cfg.run_dir, r), cfg.evaluate
    key = {"judge": [e.judge_url, e.judge_model], "new": artifacts.input_token(rd / "eval_greedy.parquet"),
           "old": artifacts.input_token(artifacts.round_dir(cfg.run_dir, r - 1) / "eval_greedy.parquet")}
    judge = Judge(url=e.judge_url, model=e.judge_model, api_key_env=e.judge_api_key_env)
    return _stage(rd / "judge.parquet", key, lambda: judge_round(judge, cfg.run_dir, r, _log()),
                  rd / "judge.stats.json")


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
    tracker = _tracker(cfg, parent_run_id, "round_0")
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
    tracker = _tracker(cfg, parent_run_id, f"round_{r}")
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


def load_prompts_eval(cfg: Config) -> list[dict[str, str]]:
    rows = load_data(cfg).eval_prompts
    return rows[: cfg.data.max_eval_prompts] if cfg.data.max_eval_prompts else rows


def _tracker(cfg: Config, parent_run_id: str, name: str) -> MetricLogger:
    from selfalign.tasks.tracking import MlflowLogger, NullLogger

    uri = tracking_uri(cfg)
    if uri == "none":
        return NullLogger()
    return MlflowLogger(uri, cfg.tracking.experiment, name, parent_run_id=parent_run_id or None, tags=prefect_tags(),
                        system_metrics=cfg.tracking.system_metrics)


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


def tracking_uri(cfg: Config) -> str:
    return resolve_uri(cfg.tracking.uri, cfg.run_dir)


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
    tracker = _open_tracker(cfg)
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


def _open_tracker(cfg: Config):
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
