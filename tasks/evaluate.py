"""Evaluate stage: the round's model on held-out prompts, with one vLLM engine start for both
greedy decoding and `evaluate.samples` sampled answers per prompt. The user's hooks decide what
counts as preferred and as correct; the response lengths show whether the rounds drift longer.
Every rate comes with its 95% interval over prompts (`<rate>_ci95`, the half-width; kernels/stats),
and with `evaluate.group` also per group of prompts (`<rate>/<group>`). The per-prompt values are
kept in eval_per_prompt.json, so that two runs on the same prompts can be compared pairwise."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, NamedTuple

from selfalign.kernels.stats import mean_ci, per_prompt
from selfalign.tasks import artifacts
from selfalign.tasks.config_base import ModelConfig, digest
from selfalign.tasks.data import load_hook
from selfalign.tasks.evaluate_config import EvaluateConfig
from selfalign.tasks.generate import build_job, generate_stats, join_shards, plan_shards, run_vllm, sampling_run
from selfalign.tasks.generate_config import GenerateConfig


class NextRound(NamedTuple):
    """The next round's samples for an evaluation engine to draw as well: that round's prompts, its
    samples table, its number and its generate stage's key."""
    prompts: list[dict[str, str]]
    output: Path
    round: int
    key: dict[str, Any]


def _per_prompt_values(rows: list[dict[str, Any]], preferred, checker) -> dict[str, dict[str, float]]:
    """rate name -> prompt_id -> that prompt's value (its answers' mean)."""
    values = {}
    if preferred:
        values["preferred_rate"] = per_prompt(rows, lambda r: bool(preferred(r["prompt"], r["response"])))
    if checker:
        values["accuracy"] = per_prompt(rows, lambda r: bool(checker(r["prompt"], r["response"])))
    return values


def _rates(rows: list[dict[str, Any]], values: dict[str, dict[str, float]],
           groups: dict[str, str] | None, suffix: str = "") -> dict[str, float]:
    """eval/<rate><suffix> with eval/<rate><suffix>_ci95, and per group eval/<rate><suffix>/<group>."""
    n = len(rows)
    out = {f"eval/len_mean{suffix}": sum(len(r["response"]) for r in rows) / n if n else math.nan,
           f"eval/truncated{suffix}": sum(r["finish_reason"] == "length" for r in rows) / n if n else math.nan}
    for name, by_prompt in values.items():
        key = f"eval/{name}{suffix}"
        out[key], out[f"{key}_ci95"] = mean_ci(list(by_prompt.values()))
        for g in sorted(set((groups or {}).values())):
            out[f"{key}/{g}"], out[f"{key}_ci95/{g}"] = mean_ci([v for k, v in by_prompt.items() if groups[k] == g])
    return out


def sampling_settings(e: EvaluateConfig, g: GenerateConfig) -> dict[str, Any]:
    """What the evaluation reads of the generate section: its engine, and its sampling for the
    sampled answers (its length limit unless evaluate.max_tokens sets one)."""
    return g.engine() | {"generate.temperature": g.temperature, "generate.top_p": g.top_p,
                         "generate.max_tokens": e.max_tokens or g.max_tokens}


def evaluate_key(e: EvaluateConfig, g: GenerateConfig, m: ModelConfig, model: str,
                 prompts: list[dict[str, str]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the stage is skipped by: its own keys (not the judge's), the engine and sampling keys it
    shares with generation, the model's, the model evaluated and the prompts; and those config keys
    by name."""
    settings = e.keyed() | sampling_settings(e, g) | m.settings()
    return {"config": digest(settings), "model": artifacts.input_token(model),
            "prompts": [p["id"] for p in prompts]}, settings


def run_evaluate(e: EvaluateConfig, g: GenerateConfig, m: ModelConfig, model: str, prompts: list[dict[str, str]],
                 out_dir: Path, seed: int, log=print,
                 next_round: NextRound | None = None,
                 run_seed: int = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Greedy and sampled answers on the eval prompts, on the engine of the generate section `g`.
    With `next_round` = (prompts, output, round, generate stage key), the same engine also draws the
    next round's K samples per prompt from this model, in that stage's shards (those still missing;
    seeds from `run_seed`), and joins them into `output` (the next round's generate stage then finds
    it done): one engine start per round instead of two."""
    t0 = time.time()
    preferred = load_hook(e.preferred, "evaluate.preferred") if e.preferred else None
    checker = load_hook(e.checker, "evaluate.checker") if e.checker else None
    group_of = load_hook(e.group, "evaluate.group") if e.group else None
    groups = {p["id"]: str(group_of(p["prompt"])) for p in prompts} if group_of else None
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
        shards, shard_runs = plan_shards(g, next_prompts, next_out, run_seed, next_r, next_key, log)
        runs += [run | {"first": run["first"] + len(prompts)} for run in shard_runs]
        job_prompts += next_prompts
        for run in runs[:n_eval]:
            run["count"] = len(prompts)
    results = run_vllm(build_job(g, m, model, job_prompts, runs, seed), out_dir / "eval_job.json", g.kv_cache_gib, log)
    metrics: dict[str, Any] = {}
    kept: dict[str, Any] = {"groups": groups or {}}
    for name, rows in zip(("greedy", "sampled"), results[:n_eval]):
        values = _per_prompt_values(rows, preferred, checker)
        kept[name] = values
        metrics |= _rates(rows, values, groups, "" if name == "greedy" else "_sampled")
    artifacts.write_json(out_dir / "eval_per_prompt.json", kept)
    # The engine draws its runs in order and writes each run's table when it is done: the evaluation's
    # time ends with its last table (the engine's start included), the next round's sampling's
    # starts there. Each stage is credited with its own part of the shared engine.
    eval_done = max(Path(r["output"]).stat().st_mtime for r in runs[:n_eval])
    metrics["eval/seconds"] = eval_done - t0
    shown = {k: round(v, 3) for k, v in metrics.items() if "rate" in k or "accuracy" in k}
    log(f"evaluate: {len(prompts)} prompts: {shown}")
    gen = None
    if next_round:
        drawn = [Path(r["output"]) for r in runs[n_eval:] if Path(r["output"]).exists()]
        seconds = max(f.stat().st_mtime for f in drawn) - eval_done if drawn else 0.0
        gen = generate_stats(join_shards(next_out, shards), len(next_prompts), g.k, seconds, log)
        gen["generate/shared_engine"] = 1  # drawn by the previous round's evaluation engine
    return metrics, gen
