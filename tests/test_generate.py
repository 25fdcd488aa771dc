"""Sharded generation: a stage's samples are drawn in shards of `generate.shard_size` prompts, each
written with its manifest as soon as it is drawn; a rerun draws only the missing shards, with the
seeds an uninterrupted run used, and joins them into `samples.parquet`. The evaluate stage's combined
job (eval of round r + round r+1's samples in one engine start) draws the same shards."""
import os
import shutil
import time
from types import SimpleNamespace

import pytest

from selfalign.flows.config import load_config
from selfalign.tasks import artifacts, evaluate, generate

BASE = {"model.policy": "pi0", "model.reference": "sft", "data.prompts": "p", "data.eval_prompts": "e",
        "data.offline_pairs": "o", "generate.k": 2, "pairs.min_valid": 2, "generate.shard_size": 4}
PROMPTS = [{"id": f"p{i}", "prompt": f"What is {i} + 1?"} for i in range(10)]
KEY = {"config": "c", "prompts": [p["id"] for p in PROMPTS]}


class Crash(RuntimeError):
    pass


@pytest.fixture
def engine(monkeypatch):
    """The vLLM job, faked by its contract: each run's slice of the job's prompts, n samples each,
    written (with the manifest, for a shard) as the run completes; `crash_after` runs it dies."""
    state = SimpleNamespace(calls=[], crash_after=None, seconds_per_run=0.0)

    def run_vllm(job, job_path, kv_cache_gib, log=print):
        state.calls.append(job)
        out = []
        for j, run in enumerate(job["runs"]):
            if state.crash_after is not None and j == state.crash_after:
                raise Crash("killed")
            first = run.get("first", 0)
            prompts = job["prompts"][first:first + run.get("count", len(job["prompts"]))]
            rows = [{"prompt_id": p["id"], "prompt": p["prompt"], "k": k, "seed": run.get("seed", -1),
                     "response": f"{p['id']}/{k}/{run.get('seed')}", "finish_reason": "stop", "n_tokens": 3}
                    for p in prompts for k in range(run["n"])]
            time.sleep(state.seconds_per_run)
            artifacts.write_table(run["output"], rows)
            if "manifest" in run:
                artifacts.mark_done(run["output"], run["manifest"])
            out.append(rows)
        return out

    monkeypatch.setattr(generate, "run_vllm", run_vllm)
    monkeypatch.setattr(evaluate, "run_vllm", run_vllm)
    monkeypatch.setattr(generate, "build_job", lambda g, m, model, prompts, runs, seed: {
        "model": model, "prompts": prompts, "runs": runs, "seed": seed})
    monkeypatch.setattr(evaluate, "build_job", generate.build_job)
    return state


def test_shards_of_a_stage_and_their_seeds(engine, tmp_path):
    cfg = load_config(None, BASE)
    out = tmp_path / "samples.parquet"
    logged = []
    stats = generate.run_generate(cfg.generate, cfg.model, "pi0", PROMPTS, out, tmp_path, 1, KEY, logged.append)
    assert len(engine.calls) == 1  # one engine start for every shard
    runs = engine.calls[0]["runs"]
    assert [(r["first"], r["count"]) for r in runs] == [(0, 4), (4, 4), (8, 2)]
    assert [r["output"] for r in runs] == [str(tmp_path / f"samples.shard-0000{i}.parquet") for i in range(3)]
    # a shard's seed depends on (run seed, round, shard) only
    assert [r["seed"] for r in runs] == [generate.shard_seed(0, 1, i) for i in range(3)]
    assert len({generate.shard_seed(s, r, i) for s in range(3) for r in range(3) for i in range(3)}) == 27
    rows = artifacts.read_table(out)
    assert [(r["prompt_id"], r["k"]) for r in rows] == [(p["id"], k) for p in PROMPTS for k in range(2)]
    assert stats["generate/samples"] == 20
    # shard 0 is one shard of the whole set when shard_size is 0
    whole = tmp_path / "whole"
    whole.mkdir()
    one = load_config(None, BASE | {"generate.shard_size": 0})
    generate.run_generate(one.generate, one.model, "pi0", PROMPTS,
                          whole / "samples.parquet", whole, 1, KEY, logged.append)
    assert [(r["first"], r["count"]) for r in engine.calls[-1]["runs"]] == [(0, 10)]


def test_a_crash_loses_one_shard_and_the_rerun_draws_only_the_missing_ones(engine, tmp_path):
    cfg = load_config(None, BASE)
    ref, out = tmp_path / "ref" / "samples.parquet", tmp_path / "run" / "samples.parquet"
    ref.parent.mkdir()
    out.parent.mkdir()
    generate.run_generate(cfg.generate, cfg.model, "pi0", PROMPTS, ref, ref.parent, 1, KEY, print)

    engine.crash_after = 1  # the engine dies while drawing shard 1
    with pytest.raises(Crash):
        generate.run_generate(cfg.generate, cfg.model, "pi0", PROMPTS, out, out.parent, 1, KEY, print)
    assert artifacts.is_done(artifacts.shard_path(out, 0), KEY | {"shard": 0}) and not out.exists()
    engine.crash_after = None
    logged = []
    generate.run_generate(cfg.generate, cfg.model, "pi0", PROMPTS, out, out.parent, 1, KEY, logged.append)
    assert [r["output"] for r in engine.calls[-1]["runs"]] == [str(artifacts.shard_path(out, i)) for i in (1, 2)]
    assert "samples.shard-00000.parquet: up to date, skipped" in logged
    assert out.read_bytes() == ref.read_bytes()

    # a shard written under another stage key (other config, model or prompts) is drawn again
    (out.parent / "samples.parquet").unlink()
    generate.run_generate(cfg.generate, cfg.model, "pi0", PROMPTS, out, out.parent, 1, KEY | {"config": "other"}, print)
    assert len(engine.calls[-1]["runs"]) == 3
    artifacts.remove_shards(out)
    assert sorted(p.name for p in out.parent.iterdir() if "shard" in p.name) == []


def test_evaluate_draws_the_next_rounds_shards_in_its_job(engine, tmp_path, monkeypatch):
    cfg = load_config(None, BASE)
    evals = [{"id": f"e{i}", "prompt": f"What is {i} + 2?"} for i in range(3)]
    ref = tmp_path / "ref" / "samples.parquet"
    ref.parent.mkdir()
    generate.run_generate(cfg.generate, cfg.model, "pi0", PROMPTS, ref, ref.parent, 1, KEY, print)

    nxt = tmp_path / "round_1" / "samples.parquet"
    nxt.parent.mkdir()
    # shard 1 survived an earlier, interrupted evaluate stage
    shutil.copy(artifacts.shard_path(ref, 1), artifacts.shard_path(nxt, 1))
    artifacts.mark_done(artifacts.shard_path(nxt, 1), KEY | {"shard": 1})
    metrics, gen = evaluate.run_evaluate(cfg.evaluate, cfg.generate, cfg.model, "pi0", evals, tmp_path, 7, print, next_round=(PROMPTS, nxt, 1, KEY))
    runs = engine.calls[-1]["runs"]
    prompts = engine.calls[-1]["prompts"]
    assert [r["output"] for r in runs[2:]] == [str(artifacts.shard_path(nxt, i)) for i in (0, 2)]
    # eval runs cover the eval prompts, shard runs index the next round's prompts after them
    assert [(r.get("first", 0), r["count"]) for r in runs] == [(0, 3), (0, 3), (3, 4), (11, 2)]
    assert [p["id"] for p in prompts[3:]] == [p["id"] for p in PROMPTS]
    assert nxt.read_bytes() == ref.read_bytes() and gen["generate/samples"] == 20


def test_a_shared_engine_credits_each_stage_with_its_own_time(engine, tmp_path):
    """Evaluation and the next round's sampling share one engine: the evaluation's seconds end with
    its last table, the sampling's are the rest (here 2 eval runs, then 3 shards, 0.3 s each)."""
    cfg = load_config(None, BASE)
    evals = [{"id": f"e{i}", "prompt": f"What is {i} + 2?"} for i in range(3)]
    nxt = tmp_path / "round_1" / "samples.parquet"
    nxt.parent.mkdir()
    engine.seconds_per_run = 0.3
    metrics, gen = evaluate.run_evaluate(cfg.evaluate, cfg.generate, cfg.model, "pi0", evals, tmp_path, 7, print, next_round=(PROMPTS, nxt, 1, KEY))
    assert len(engine.calls[-1]["runs"]) == 5
    assert 0.6 <= metrics["eval/seconds"] < 0.85 and 0.9 <= gen["generate/seconds"] < 1.15
    assert gen["generate/shared_engine"] == 1


@pytest.mark.slow
def test_vllm_shards_are_the_same_whether_drawn_together_or_alone(tiny_model, tmp_path):
    """Real vLLM (CPU): a shard drawn alone in a fresh engine, after the engine drew other runs, or
    after the other shards in one engine start, has the same samples, bit for bit."""
    cfg = load_config(None, BASE | {"model.policy": tiny_model, "model.reference": tiny_model,
                                    "generate.k": 3, "pairs.min_valid": 2, "generate.max_tokens": 12,
                                    "generate.temperature": 1.0, "generate.top_p": 1.0,
                                    "evaluate.samples": 2})
    ref, out = tmp_path / "ref" / "samples.parquet", tmp_path / "run" / "samples.parquet"
    ref.parent.mkdir()
    out.parent.mkdir()
    generate.run_generate(cfg.generate, cfg.model, tiny_model, PROMPTS, ref, ref.parent, 1, KEY, print)
    rows = artifacts.read_table(ref)
    assert len(rows) == 30 and len({r["response"] for r in rows}) > 10  # sampled, not degenerate

    # shards 0 and 2 survive; shard 1 is drawn by an evaluate job, after the eval runs
    for i in (0, 2):
        shutil.copy(artifacts.shard_path(ref, i), artifacts.shard_path(out, i))
        artifacts.mark_done(artifacts.shard_path(out, i), KEY | {"shard": i})
    evals = [{"id": f"e{i}", "prompt": f"What is {i} + 2?"} for i in range(3)]
    logged = []
    evaluate.run_evaluate(cfg.evaluate, cfg.generate, cfg.model, tiny_model, evals, out.parent, 7, logged.append, next_round=(PROMPTS, out, 1, KEY))
    assert "vLLM: wrote samples.shard-00001.parquet (12 samples)" in logged
    # generate.threads' default: every core this process may use
    assert f"vLLM: engine ready, {len(os.sched_getaffinity(0))} CPU thread(s)" in logged
    assert not any("wrote samples.shard-00000" in m or "wrote samples.shard-00002" in m for m in logged)
    assert artifacts.read_table(out) == rows and out.read_bytes() == ref.read_bytes()

    # a fresh engine that draws shard 2 alone
    alone = tmp_path / "alone" / "samples.parquet"
    alone.parent.mkdir()
    for i in (0, 1):
        shutil.copy(artifacts.shard_path(ref, i), artifacts.shard_path(alone, i))
        artifacts.mark_done(artifacts.shard_path(alone, i), KEY | {"shard": i})
    generate.run_generate(cfg.generate, cfg.model, tiny_model, PROMPTS, alone, alone.parent, 1, KEY, print)
    assert alone.read_bytes() == ref.read_bytes()


@pytest.fixture
def worker_sees(tmp_path, monkeypatch):
    """run_vllm with the worker process faked: `seen(job, gib)` runs it and returns the job file and
    the environment the worker would have been started with."""
    seen = {}

    def worker(module, job_path, env, cpus, log):
        seen["job"], seen["env"] = artifacts.read_json(job_path), env
        return 0, []

    monkeypatch.setattr(generate, "run_worker_process", worker)
    monkeypatch.setattr(artifacts, "read_table", lambda path: [])

    def run(job, gib=1.0):
        generate.run_vllm(job, tmp_path / "job.json", gib, log=lambda m: None)
        return seen

    return run


@pytest.mark.parametrize("gib, variable", [(1.0, "1"), (2.0, "2"), (0.5, None), (2.5, None)])
def test_the_kv_cache_size_reaches_the_engine_as_configured(tmp_path, monkeypatch, worker_sees, gib, variable):
    """generate.kv_cache_gib in bytes, fractions included: the worker's job carries it for the engine's
    kv_cache_memory_bytes, and vLLM's whole-GiB variable (which would override it) is set only for a
    whole number, never inherited from the user's shell."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    job = {"model": str(tmp_path), "prompts": [], "runs": [{"output": str(tmp_path / "out.parquet")}]}
    seen = worker_sees(job, gib)
    assert seen["job"]["kv_cache_bytes"] == int(gib * 1024 ** 3)
    assert seen["env"].get("VLLM_CPU_KVCACHE_SPACE") == variable
    assert "kv_cache_bytes" not in job  # the caller's job is left as it was


@pytest.mark.slow
def test_the_cpu_engine_runs_generate_threads_threads(tiny_model, tmp_path, monkeypatch):
    """Real vLLM (CPU): generate.threads=3 gives the engine three torch threads (vLLM alone would cut
    them to one), whatever the shell's OMP_NUM_THREADS says."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(None, BASE | {"model.policy": tiny_model, "model.reference": tiny_model, "generate.k": 2,
                                    "generate.max_tokens": 8, "generate.threads": 3})
    out, logged = tmp_path / "samples.parquet", []
    stats = generate.run_generate(cfg.generate, cfg.model, tiny_model, PROMPTS[:2], out, tmp_path, 1, KEY, logged.append)
    assert "vLLM: engine ready, 3 CPU thread(s)" in logged and stats["generate/samples"] == 4


@pytest.mark.parametrize("threads, cpus, expected", [(3, None, 3), (2, [0, 1, 2, 3], 2), (0, [1, 3], 2), (0, None, None)])
def test_the_worker_threads_reach_the_job(tmp_path, monkeypatch, worker_sees, threads, cpus, expected):
    """generate.threads reaches the worker's job as a count: as configured, or for 0 the worker's
    cores (its share when it has one, else every core this process may use), never the shell's
    OMP_NUM_THREADS."""
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    job = {"model": str(tmp_path), "prompts": [], "runs": [{"output": str(tmp_path / "out.parquet")}],
           "threads": threads} | ({"cpus": cpus} if cpus else {})
    seen = worker_sees(job)
    assert seen["job"]["threads"] == (expected or len(os.sched_getaffinity(0)))
    assert job["threads"] == threads  # the caller's job is left as it was
