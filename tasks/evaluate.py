"""Evaluate stage: the round's model on held-out prompts, with one vLLM engine start for both
greedy decoding and `evaluate.samples` sampled answers per prompt. The user's hooks decide what
counts as preferred and as correct; the response lengths show whether the rounds drift longer."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from selfalign.tasks import artifacts
from selfalign.tasks.data import load_hook
from selfalign.tasks.generate import build_job, generate_stats, join_shards, plan_shards, run_vllm, sampling_run


def _rates(rows: list[dict[str, Any]], preferred, checker) -> dict[str, float]:
    n = len(rows)
    out = {"len_mean": sum(len(r["response"]) for r in rows) / n if n else math.nan,
           "truncated": sum(r["finish_reason"] == "length" for r in rows) / n if n else math.nan}
    if preferred:
        out["preferred_rate"] = sum(bool(preferred(r["prompt"], r["response"])) for r in rows) / n
    if checker:
        out["accuracy"] = sum(bool(checker(r["prompt"], r["response"])) for r in rows) / n
    return out


def run_evaluate(cfg, model: str, prompts: list[dict[str, str]], out_dir: Path, seed: int, log=print,
                 next_round: tuple[list[dict[str, str]], Path, int, dict[str, Any]] | None = None,
                 ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Greedy and sampled answers on the eval prompts. With `next_round` = (prompts, output, round,
    generate stage key), the same engine also draws the next round's K samples per prompt from this
    model, in that stage's shards (those still missing), and joins them into `output` (the next
    round's generate stage then finds it done): one engine start per round instead of two."""
    t0 = time.time()
    e, g = cfg.evaluate, cfg.generate
    preferred = load_hook(e.preferred, "evaluate.preferred") if e.preferred else None
    checker = load_hook(e.checker, "evaluate.checker") if e.checker else None
    max_tokens = e.max_tokens or g.max_tokens
    runs = [sampling_run(out_dir / "eval_greedy.parquet", n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)]
    if e.samples:
        runs.append(sampling_run(out_dir / "eval_sampled.parquet", n=e.samples, temperature=g.temperature,
                                 top_p=g.top_p, max_tokens=max_tokens))
    n_eval = len(runs)
    # vLLM takes one prompt list per job: eval prompts first, then the next round's.
    job_prompts = list(prompts)
    if next_round:
        next_prompts, next_out, next_r, next_key = next_round
        shards, shard_runs = plan_shards(cfg, next_prompts, next_out, next_r, next_key, log)
        runs += [run | {"first": run["first"] + len(prompts)} for run in shard_runs]
        job_prompts += next_prompts
        for run in runs[:n_eval]:
            run["count"] = len(prompts)
    results = run_vllm(build_job(cfg, model, job_prompts, runs, seed), out_dir / "eval_job.json", g.kv_cache_gib, log)
    metrics: dict[str, Any] = {}
    for name, rows in zip(("greedy", "sampled"), results[:n_eval]):
        for k, v in _rates(rows, preferred, checker).items():
            metrics[f"eval/{k}" if name == "greedy" else f"eval/{k}_sampled"] = v
    metrics["eval/seconds"] = time.time() - t0
    shown = {k: round(v, 3) for k, v in metrics.items() if "rate" in k or "accuracy" in k}
    log(f"evaluate: {len(prompts)} prompts: {shown}")
    gen = None
    if next_round:
        gen = generate_stats(join_shards(next_out, shards), len(next_prompts), g.k, time.time() - t0, log)
    return metrics, gen
