"""Generate stage: K samples per prompt from the current policy with vLLM, in a process of its own so
the engine's memory is released when the stage ends. The prompt is the chat template applied by
`data.encode_prompt`, passed to vLLM as token ids, exactly what scoring and training see.

The samples are drawn in shards of `generate.shard_size` prompts, one engine start for all of them;
the worker writes each shard with its manifest as soon as it is drawn, so a crash loses at most the
shard in progress, and a rerun draws only the missing shards. Each shard samples with seeds of its
own (`shard_seed`), so the joined `samples.parquet` is the same, bit for bit, however many times the
stage was interrupted.

With `generate.shards` = N > 1 the shards still to draw are dealt round-robin to N workers, each a
process with a vLLM engine of its own (on GPUs: its own `tensor_parallel_size` devices), run
concurrently (`map_workers`: Prefect task mapping in the pipeline, threads otherwise). Since a shard's
samples depend on its prompts and seed only, the joined table is the same for any N.

The engine itself runs in `tasks/vllm_worker.py`, the only module that imports vLLM."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from selfalign.tasks import artifacts
from selfalign.tasks.config_base import ModelConfig, digest
from selfalign.tasks.data import encode_prompt, load_tokenizer
from selfalign.tasks.generate_config import GenerateConfig
from selfalign.tasks.procs import run_worker_process, thread_map, worker_resources, worker_threads


def engine_env(kv_cache_gib: float, model: str | None = None) -> dict[str, str]:
    """Environment for the vLLM worker: loopback only, offline for a local model (a hub id may be
    fetched unless HF_HUB_OFFLINE is set), caches in a per-machine folder (vLLM caches model
    inspection there: ~20 s saved on every later engine start)."""
    env = dict(os.environ)
    if model is None or Path(model).is_dir():
        env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "selfalign" / "vllm"))
    env.update({
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        # The worker is already our own process: run the engine core inside it (seconds to start
        # instead of a second spawned process).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
    })
    # The CPU KV cache's size: vLLM's variable takes whole GiB and, when set, overrides the engine's
    # `kv_cache_memory_bytes`, which our worker passes (the job's `kv_cache_bytes`). So the variable
    # is set for whole GiB only (also for a `vllm serve` started with this environment); a fraction
    # reaches the engine through the argument alone.
    if kv_cache_gib >= 1 and kv_cache_gib == int(kv_cache_gib):
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
    else:
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    return env


def run_vllm(job: dict[str, Any], job_path: Path, kv_cache_gib: float, log=print) -> list[list[dict[str, Any]]]:
    """Run one vLLM job in a subprocess; returns the sample rows of each of its runs. A job of one of
    several workers carries the GPUs it may use (`devices`, CUDA_VISIBLE_DEVICES) or, on CPU, the
    cores its process is pinned to (`cpus`)."""
    job = dict(job, kv_cache_bytes=int(kv_cache_gib * 2**30),  # the CPU engine's KV cache (engine_env)
               threads=worker_threads(job.get("threads", 0), job.get("cpus")))
    artifacts.write_json(job_path, job)
    t0 = time.time()
    env = engine_env(kv_cache_gib, job["model"])
    # vLLM's CPU engine keeps torch's thread count when OMP_NUM_THREADS is set, else cuts it to one.
    env["OMP_NUM_THREADS"] = str(job["threads"])
    if job.get("devices") is not None:
        env["CUDA_VISIBLE_DEVICES"] = job["devices"]
    rc, tail = run_worker_process("selfalign.tasks.vllm_worker", job_path, env, job.get("cpus"), log)
    if rc != 0:
        raise RuntimeError(f"vLLM worker failed (exit {rc}) for {job['model']}:\n" + "\n".join(tail))
    out = [artifacts.read_table(Path(r["output"])) for r in job["runs"]]
    log(f"vLLM: {sum(map(len, out))} samples in {time.time() - t0:.1f}s from {job['model']}")
    return out


def sampling_run(output: Path, *, n: int, temperature: float, top_p: float, max_tokens: int) -> dict[str, Any]:
    """One sampling configuration of a vLLM job; temperature 0 is greedy decoding."""
    return {"output": str(output), "n": n, "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0,
            "max_tokens": max_tokens}


def build_job(g: GenerateConfig, m: ModelConfig, model: str, prompts: list[dict[str, str]], runs: list[dict[str, Any]],
              seed: int) -> dict[str, Any]:
    """A vLLM job: one engine start for one model, several sampling runs over the same prompts."""
    tok = load_tokenizer(model, m.trust_remote_code)
    return {
        "model": model,
        "prompts": [{"id": p["id"], "prompt": p["prompt"], "ids": encode_prompt(tok, p["prompt"])} for p in prompts],
        "runs": runs,
        "seed": seed,
        "dtype": m.dtype,
        "enforce_eager": g.enforce_eager,
        "gpu_memory_utilization": g.gpu_memory_utilization,
        "tensor_parallel_size": g.tensor_parallel_size,
        "threads": g.threads,
        "max_model_len": g.max_model_len,
        "trust_remote_code": m.trust_remote_code,
    }


def generate_stats(rows: list[dict[str, Any]], n_prompts: int, k: int, seconds: float, log=print) -> dict[str, Any]:
    n_tok = sum(r["n_tokens"] for r in rows)
    log(f"generate: {n_prompts} prompts x {k} = {len(rows)} samples, {n_tok} tokens in {seconds:.1f}s")
    return {"generate/samples": len(rows), "generate/tokens": n_tok, "generate/seconds": seconds,
            "generate/truncated": sum(r["finish_reason"] == "length" for r in rows)}


def k_samples_run(g: GenerateConfig, out_path: Path) -> dict[str, Any]:
    return sampling_run(out_path, n=g.k, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens)


def shard_seed(run_seed: int, r: int, shard: int) -> int:
    """The sampling seed of shard `shard` of round r. It depends on nothing else (not on the shards
    drawn before it in the same engine), so a shard drawn again after a crash is the one an
    uninterrupted run drew. Request i of the shard samples with seed + i * K (vLLM gives the k-th
    sample of a request seed + k)."""
    digest = hashlib.sha256(f"selfalign-generate/{run_seed}/{r}/{shard}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def plan_shards(g: GenerateConfig, prompts: list[dict[str, str]], out_path: Path, run_seed: int, r: int,
                key: dict[str, Any], log=print) -> tuple[list[Path], list[dict[str, Any]]]:
    """The stage's shards of `generate.shard_size` prompts (0: one shard): every shard's path, and
    a sampling run for each one not already written under the same stage key. A run's
    `first`/`count` index `prompts`; the worker writes each shard with its manifest as it completes."""
    size = g.shard_size or len(prompts)
    paths, runs = [], []
    for i, first in enumerate(range(0, len(prompts), size)):
        path = artifacts.shard_path(out_path, i)
        paths.append(path)
        shard_key = key | {"shard": i}
        if artifacts.is_done(path, shard_key):
            log(f"{path.name}: up to date, skipped")
            continue
        runs.append(k_samples_run(g, path) | {
            "first": first, "count": min(size, len(prompts) - first), "seed": shard_seed(run_seed, r, i),
            "manifest": shard_key})
    return paths, runs


def join_shards(out_path: Path, paths: list[Path]) -> list[dict[str, Any]]:
    """Concatenates the shards, in order, into `out_path` (the shards stay until the stage's own
    manifest is written: `artifacts.remove_shards`)."""
    rows = [row for p in paths for row in artifacts.read_table(p)]
    artifacts.write_table(out_path, rows)
    return rows


def worker_jobs(job: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Splits a job of shard runs among `n` workers (fewer when there are fewer runs): run i goes to
    worker i mod n, with only the prompts of its own runs (`first` re-based)."""
    n = max(1, min(n, len(job["runs"])))
    if n == 1:
        return [job]
    jobs = []
    for w in range(n):
        prompts, runs = [], []
        for run in job["runs"][w::n]:
            first = run.get("first", 0)
            count = run.get("count", len(job["prompts"]))
            runs.append(run | {"first": len(prompts), "count": count})
            prompts += job["prompts"][first:first + count]
        jobs.append(job | {"prompts": prompts, "runs": runs})
    return jobs


def run_workers(g: GenerateConfig, job: dict[str, Any], work_dir: Path, log=print, map_workers=None,
                cluster=None) -> None:
    """Runs a job of shard runs on `generate.shards` concurrent vLLM workers (one: in one engine, as
    before). `map_workers(calls)` runs `run_vllm(job, job_path, kv_cache_gib)` for each call
    (job, job_path) concurrently; default `thread_map`. With a `cluster` (tasks/cluster.py's
    ClusterConfig, address set) every worker, even a single one, is a Ray task placed by Ray."""
    jobs = worker_jobs(job, g.shards)
    if cluster is not None and cluster.address:
        from selfalign.tasks import cluster as ray_workers

        jobs = [ray_workers.prepare_generate_job(cluster, j, g.threads) for j in jobs]
        run = lambda c: ray_workers.run_generate_worker(cluster, c[0], c[1], g.kv_cache_gib, g.tensor_parallel_size, log)
    elif len(jobs) == 1:
        run_vllm(job, work_dir / "generate_job.json", g.kv_cache_gib, log)
        return
    else:
        for j, res in zip(jobs, worker_resources(len(jobs), g.tensor_parallel_size, "generate.shards")):
            j.update(res)
        run = lambda c: run_vllm(c[0], c[1], g.kv_cache_gib, log)
    calls = [(j, work_dir / f"generate_job.worker-{w}.json") for w, j in enumerate(jobs)]
    log(f"generate: {len(job['runs'])} shards on {len(jobs)} workers" + " of the Ray cluster" * bool(cluster and cluster.address))
    if map_workers is None:
        thread_map(run, calls)
    else:
        map_workers(calls)


def generate_key(g: GenerateConfig, m: ModelConfig, model: str, prompts: list[dict[str, str]],
                 seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the stage is skipped by: its own keys and the model's (less the worker count), the model
    drawn from, the prompts and the round's seed; and those config keys by name, recorded beside
    it to say which changed on a rerun."""
    settings = g.keyed() | m.settings()
    return {"config": digest(settings), "model": artifacts.input_token(model), "prompts": [p["id"] for p in prompts],
            "seed": seed}, settings


def run_generate(g: GenerateConfig, m: ModelConfig, model: str, prompts: list[dict[str, str]], out_path: Path,
                 work_dir: Path, r: int, key: dict[str, Any], log=print, map_workers=None,
                 run_seed: int = 0, cluster=None) -> dict[str, Any]:
    """K samples per prompt at the configured temperature/top_p/max_tokens -> `out_path`, drawn in
    shards (one engine start for all the missing ones, or one per worker: `run_workers`); round r
    samples with seeds from `run_seed` + r."""
    t0 = time.time()
    paths, runs = plan_shards(g, prompts, out_path, run_seed, r, key, log)
    if runs:
        job = build_job(g, m, model, prompts, runs, run_seed + r)
        run_workers(g, job, work_dir, log, map_workers, cluster)
    rows = join_shards(out_path, paths)
    return generate_stats(rows, len(prompts), g.k, time.time() - t0, log)
