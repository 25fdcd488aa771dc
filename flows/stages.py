"""The stages of a round as Prefect tasks, one per stage. Tasks are thin: they take and return paths
and metrics, call the stage function (tasks/), and skip the work when the stage's manifest shows its
output came from the same inputs and config.

generate.shards / score.shards > 1: the stage task maps a worker task over its workers (Prefect task
mapping on the flow's thread-pool task runner; each worker is a process of its own), waits for all of
them and joins their parts; with no Prefect server the flow's temporary one records them as usual.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from selfalign.flows.config import Config
from selfalign.tasks import artifacts
from selfalign.tasks.cluster_config import ClusterConfig
from selfalign.tasks.evaluate import NextRound, evaluate_key, run_evaluate
from selfalign.tasks.generate import generate_key, run_generate, run_vllm
from selfalign.tasks.judge import Judge, judge_round
from selfalign.tasks.pairs import pairs_key, run_pairs
from selfalign.tasks.tracking import MetricLogger
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

    _stage(out, key, lambda: {"steps": run_train(cfg.train, cfg.model, model, pairs, out, cfg.run.seed + r, _log(), key=key,
                                                 on_step=on_step if tracker is not None else None,
                                                 batch_tokens=cfg.score.batch_tokens, run_dir=cfg.run_dir)},
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
