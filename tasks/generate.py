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

Top-p on CPU. vLLM's CPU sampler applies top-p by sorting the whole vocabulary for every token,
most of the worker's time at a 32k vocabulary. There the worker passes top_p=1 to vLLM and the real
p to `TopPLogitsProcessor` (extra_args[TOP_P_KEY]), which applies the same rule with
`selfalign.kernels.sampling.top_p_filter` (no sort) at the same point of vLLM's sampler: after the
temperature, before vLLM's own top-k/top-p. It draws no random numbers, so per-request seeds give
the same samples as vLLM's own top-p (up to float32 rounding at the nucleus boundary, and ties at the
boundary, which it keeps whole). On GPUs vLLM's own top-p (a fused kernel) is used.

The draw on CPU. vLLM's CPU sampler then draws with Gumbel-max noise: a log and an exp for every
token of the vocabulary and every sampled token, ~30% of the decoding time of a small model. The
worker draws by inverse CDF instead (`use_inverse_cdf_sampler`, `kernels.sampling.sample_inverse_cdf`):
one uniform number per row, from the request's own generator when it has a seed; the same
distribution, ~7x cheaper at a 32k vocabulary.

Run as a module (`python -m selfalign.tasks.generate <job.json>`) it is the vLLM worker."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from selfalign.tasks import artifacts
from selfalign.tasks.data import encode_prompt, load_tokenizer


PROGRESS = "selfalign-progress: "  # worker lines that start so go to the stage's log


def quiet() -> bool:
    """No progress lines in CI (CI=true, as GitHub Actions, GitLab and most runners set)."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def progress_bar(label: str, every: float = 0.2):
    """A `use_tqdm` callable for vLLM's generate: instead of a terminal bar, one line per `every`
    of the way (finished sequences), which the parent passes to the Prefect task log."""
    from tqdm import tqdm

    class Lines(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("dynamic_ncols", None)
            self._sink = open(os.devnull, "w")  # no bar; tqdm still keeps count and time
            super().__init__(*args, file=self._sink, **kwargs)
            self._next = every

        def update(self, n=1):
            super().update(n)
            if self.total and self.n / self.total >= self._next - 1e-9:
                rate = self.n / max(self.format_dict["elapsed"], 1e-9)
                print(f"{PROGRESS}vLLM {label}: {self.n}/{self.total} sequences, {rate:.0f}/s", flush=True)
                while self._next <= self.n / self.total + 1e-9:
                    self._next += every

        def close(self):
            super().close()
            self._sink.close()

    def make(*args, **kwargs):
        # vLLM also wraps the loop that adds requests (an iterable, no total): no lines for that.
        return tqdm(*args, disable=True, **kwargs) if args else Lines(**kwargs)

    return make


def engine_env(kv_cache_gib: float, model: str | None = None) -> dict[str, str]:
    """Environment for the vLLM worker: loopback only, offline for a local model (a hub id may be
    fetched unless HF_HUB_OFFLINE is set), caches in a per-machine folder (vLLM caches model
    inspection there: ~20 s saved on every later engine start)."""
    env = dict(os.environ)
    if model is None or Path(model).is_dir():
        env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "selfalign" / "vllm"))
    # The CPU engine's thread count is the job's (`generate.threads`, set by the worker), not the
    # shell's OMP_NUM_THREADS.
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


def run_worker_process(module: str, job_path: Path, env: dict[str, str], cpus, log) -> tuple[int, list[str]]:
    """Runs `python -m module job_path` and waits: pinned to `cpus` when given (before the worker's
    engine starts: vLLM binds within it), its PROGRESS lines passed to `log`. Returns the exit
    status and the last 40 lines of output."""
    proc = subprocess.Popen([sys.executable, "-m", module, str(job_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(proc.pid, cpus)
        except OSError:
            pass  # the worker already ended: its exit status says why
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        if line.startswith(PROGRESS):
            log(line[len(PROGRESS):].rstrip())
    return proc.wait(), tail


def run_vllm(job: dict[str, Any], job_path: Path, kv_cache_gib: float, log=print) -> list[list[dict[str, Any]]]:
    """Run one vLLM job in a subprocess; returns the sample rows of each of its runs. A job of one of
    several workers carries the GPUs it may use (`devices`, CUDA_VISIBLE_DEVICES) or, on CPU, the
    cores its process is pinned to (`cpus`)."""
    job = dict(job, kv_cache_bytes=int(kv_cache_gib * 2**30),  # the CPU engine's KV cache (engine_env)
               threads=worker_threads(job.get("threads", 0), job.get("cpus")))
    artifacts.write_json(job_path, job)
    t0 = time.time()
    env = engine_env(kv_cache_gib, job["model"])
    if job.get("devices") is not None:
        env["CUDA_VISIBLE_DEVICES"] = job["devices"]
    rc, tail = run_worker_process("selfalign.tasks.generate", job_path, env, job.get("cpus"), log)
    if rc != 0:
        raise RuntimeError(f"vLLM worker failed (exit {rc}) for {job['model']}:\n" + "\n".join(tail))
    out = [artifacts.read_table(Path(r["output"])) for r in job["runs"]]
    log(f"vLLM: {sum(map(len, out))} samples in {time.time() - t0:.1f}s from {job['model']}")
    return out


def worker_threads(threads: int, cpus) -> int:
    """The CPU threads of a vLLM worker: `threads` (`generate.threads`), or for 0 the worker's cores:
    its share `cpus` when it has one, else every core this process may run on."""
    if threads > 0:
        return threads
    if cpus:
        return len(cpus)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sampling_run(output: Path, *, n: int, temperature: float, top_p: float, max_tokens: int) -> dict[str, Any]:
    """One sampling configuration of a vLLM job; temperature 0 is greedy decoding."""
    return {"output": str(output), "n": n, "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0,
            "max_tokens": max_tokens}


def build_job(cfg, model: str, prompts: list[dict[str, str]], runs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """A vLLM job: one engine start for one model, several sampling runs over the same prompts."""
    tok = load_tokenizer(model, cfg.model.trust_remote_code)
    g = cfg.generate
    return {
        "model": model,
        "prompts": [{"id": p["id"], "prompt": p["prompt"], "ids": encode_prompt(tok, p["prompt"])} for p in prompts],
        "runs": runs,
        "seed": seed,
        "dtype": cfg.model.dtype,
        "enforce_eager": g.enforce_eager,
        "gpu_memory_utilization": g.gpu_memory_utilization,
        "tensor_parallel_size": g.tensor_parallel_size,
        "threads": g.threads,
        "max_model_len": g.max_model_len,
        "trust_remote_code": cfg.model.trust_remote_code,
    }


def generate_stats(rows: list[dict[str, Any]], n_prompts: int, k: int, seconds: float, log=print) -> dict[str, Any]:
    n_tok = sum(r["n_tokens"] for r in rows)
    log(f"generate: {n_prompts} prompts x {k} = {len(rows)} samples, {n_tok} tokens in {seconds:.1f}s")
    return {"generate/samples": len(rows), "generate/tokens": n_tok, "generate/seconds": seconds,
            "generate/truncated": sum(r["finish_reason"] == "length" for r in rows)}


def k_samples_run(cfg, out_path: Path) -> dict[str, Any]:
    g = cfg.generate
    return sampling_run(out_path, n=g.k, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens)


def shard_seed(run_seed: int, r: int, shard: int) -> int:
    """The sampling seed of shard `shard` of round r. It depends on nothing else (not on the shards
    drawn before it in the same engine), so a shard drawn again after a crash is the one an
    uninterrupted run drew. Request i of the shard samples with seed + i * K (vLLM gives the k-th
    sample of a request seed + k)."""
    digest = hashlib.sha256(f"selfalign-generate/{run_seed}/{r}/{shard}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def plan_shards(cfg, prompts: list[dict[str, str]], out_path: Path, r: int, key: dict[str, Any],
                log=print) -> tuple[list[Path], list[dict[str, Any]]]:
    """The stage's shards of `generate.shard_size` prompts (0: one shard): every shard's path, and
    a sampling run for each one not already written under the same stage key. A run's
    `first`/`count` index `prompts`; the worker writes each shard with its manifest as it completes."""
    size = cfg.generate.shard_size or len(prompts)
    paths, runs = [], []
    for i, first in enumerate(range(0, len(prompts), size)):
        path = artifacts.shard_path(out_path, i)
        paths.append(path)
        shard_key = key | {"shard": i}
        if artifacts.is_done(path, shard_key):
            log(f"{path.name}: up to date, skipped")
            continue
        runs.append(k_samples_run(cfg, path) | {
            "first": first, "count": min(size, len(prompts) - first), "seed": shard_seed(cfg.run.seed, r, i),
            "manifest": shard_key})
    return paths, runs


def join_shards(out_path: Path, paths: list[Path]) -> list[dict[str, Any]]:
    """Concatenates the shards, in order, into `out_path` (the shards stay until the stage's own
    manifest is written: `artifacts.remove_shards`)."""
    rows = [row for p in paths for row in artifacts.read_table(p)]
    artifacts.write_table(out_path, rows)
    return rows


def thread_map(fn, items: list) -> list:
    """`fn` over `items` concurrently, one thread each (the work is in subprocesses); results in
    order, the first exception raised once all have ended."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, len(items))) as ex:
        futures = [ex.submit(fn, item) for item in items]
    return [f.result() for f in futures]


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_resources(n: int, per_worker: int, key: str) -> list[dict[str, Any]]:
    """What each of `n` concurrent workers may use: on GPUs `per_worker` devices of its own
    (`devices`, an error naming `key` when there are too few); on CPU a share of this process's
    cores (`cpus`), so that engines binding their threads do not all pick the same core."""
    gpus = visible_gpus()
    if gpus:
        if n * per_worker > len(gpus):
            raise ValueError(f"{key}: {n} workers x {per_worker} GPU(s) each need {n * per_worker} GPUs, "
                             f"{len(gpus)} are visible")
        return [{"devices": ",".join(gpus[w * per_worker:(w + 1) * per_worker])} for w in range(n)]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < n:
        return [{} for _ in range(n)]
    return [{"cpus": cpus[w::n]} for w in range(n)]


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


def run_workers(cfg, job: dict[str, Any], work_dir: Path, log=print, map_workers=None) -> None:
    """Runs a job of shard runs on `generate.shards` concurrent vLLM workers (one: in one engine, as
    before). `map_workers(calls)` runs `run_vllm(job, job_path, kv_cache_gib)` for each call
    (job, job_path) concurrently; default `thread_map`."""
    g = cfg.generate
    jobs = worker_jobs(job, g.shards)
    if len(jobs) == 1:
        run_vllm(job, work_dir / "generate_job.json", g.kv_cache_gib, log)
        return
    for j, res in zip(jobs, worker_resources(len(jobs), g.tensor_parallel_size, "generate.shards")):
        j.update(res)
    calls = [(j, work_dir / f"generate_job.worker-{w}.json") for w, j in enumerate(jobs)]
    log(f"generate: {len(job['runs'])} shards on {len(jobs)} workers")
    if map_workers is None:
        thread_map(lambda c: run_vllm(c[0], c[1], g.kv_cache_gib, log), calls)
    else:
        map_workers(calls)


def run_generate(cfg, model: str, prompts: list[dict[str, str]], out_path: Path, work_dir: Path, r: int,
                 key: dict[str, Any], log=print, map_workers=None) -> dict[str, Any]:
    """K samples per prompt at the configured temperature/top_p/max_tokens -> `out_path`, drawn in
    shards (one engine start for all the missing ones, or one per worker: `run_workers`)."""
    t0 = time.time()
    paths, runs = plan_shards(cfg, prompts, out_path, r, key, log)
    if runs:
        job = build_job(cfg, model, prompts, runs, cfg.run.seed + r)
        run_workers(cfg, job, work_dir, log, map_workers)
    rows = join_shards(out_path, paths)
    return generate_stats(rows, len(prompts), cfg.generate.k, time.time() - t0, log)


def _generation_eos(model: str) -> set[int]:
    """End-of-turn ids from the model's generation config (Llama 3 has two)."""
    from transformers import GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        return set()
    return set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())


TOP_P_KEY = "selfalign_top_p"  # SamplingParams.extra_args key of TopPLogitsProcessor's p
TOP_P_PROCESSOR = "selfalign.tasks.generate:TopPLogitsProcessor"  # as vLLM loads it


def _top_p_processor_class():
    """Defines `TopPLogitsProcessor` (it derives from a vLLM class, and this module is imported
    without vLLM by the parent process: the class exists once the worker asks for it)."""
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    from selfalign.kernels.sampling import top_p_filter

    def request_p(params) -> float:
        p = (params.extra_args or {}).get(TOP_P_KEY)
        return 1.0 if p is None else float(p)

    class TopPLogitsProcessor(LogitsProcessor):
        """Top-p of each request that carries extra_args[TOP_P_KEY] = p (others: none), applied to
        the temperature-scaled logits of the batch without a sort (`top_p_filter`). It keeps the
        persistent batch's row -> p table up to date from vLLM's batch updates."""

        def __init__(self, vllm_config, device, is_pin_memory: bool):
            self.p = torch.ones(vllm_config.scheduler_config.max_num_seqs, dtype=torch.float64)
            self.any = False  # some row of the current batch has p < 1

        @classmethod
        def validate_params(cls, params) -> None:
            p = (params.extra_args or {}).get(TOP_P_KEY)
            if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
                raise ValueError(f"SamplingParams.extra_args[{TOP_P_KEY!r}] must be a number in (0, 1], got {p!r}")

        def is_argmax_invariant(self) -> bool:
            return True  # the most probable token always survives; vLLM then applies it after temperature

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            # vLLM's order: removed, then added (which may reuse a removed row), then moved.
            for row in batch_update.removed:
                self.p[row] = 1.0
            for row, params, _, _ in batch_update.added:
                self.p[row] = request_p(params)
            for src, dst, kind in batch_update.moved:
                if kind == MoveDirectionality.SWAP:
                    self.p[src], self.p[dst] = self.p[dst].item(), self.p[src].item()
                else:  # src's request now lives in dst; src is empty
                    self.p[dst] = self.p[src].item()
                    self.p[src] = 1.0
            self.any = bool((self.p[:batch_update.batch_size] < 1).any())

        def apply(self, logits):
            if not self.any:
                return logits
            return top_p_filter(logits, self.p[:logits.shape[0]], inplace=True)

    TopPLogitsProcessor.__qualname__ = "TopPLogitsProcessor"  # importable (and picklable) by that name
    return TopPLogitsProcessor


def __getattr__(name: str):
    if name == "TopPLogitsProcessor":
        cls = _top_p_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_inverse_cdf_sampler() -> None:
    """Makes vLLM's CPU sampler draw each token by inverse CDF (`sample_inverse_cdf`: one uniform
    number per row) instead of its Gumbel-max draw (`fused_gumbel_argmax`: a log and an exp per token
    of the vocabulary, ~30% of a small model's decoding time). Everything before the draw is vLLM's:
    its top-k/top-p (when a request asks for them), the logprobs it may return. Seeded requests take
    their number from their own generator, one per step as vLLM's CPU sampler does, so a request's
    samples depend on its seed only, not on the batch around it. An engine that asks for float64
    Gumbel noise keeps vLLM's draw. Affects samplers built after the call, in this process."""
    import torch
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    from selfalign.kernels.sampling import sample_inverse_cdf

    vllm_forward_cpu = ops.TopKTopPSampler.forward_cpu
    if getattr(vllm_forward_cpu, "_selfalign", False):
        return

    def forward_cpu(self, logits, generators, k, p):
        if self.use_fp64_gumbel:
            return vllm_forward_cpu(self, logits, generators, k, p)
        logits = ops.apply_top_k_top_p(logits, k, p)
        logits_to_return = None
        if self.logprobs_mode == "processed_logits":
            logits_to_return = logits
        elif self.logprobs_mode == "processed_logprobs":
            logits_to_return = logits.log_softmax(dim=-1, dtype=torch.float32)
        u = torch.rand(logits.shape[0], dtype=torch.float64)
        for i, gen in generators.items():
            u[i] = torch.rand(1, dtype=torch.float64, generator=gen)
        return sample_inverse_cdf(logits.float(), u), logits_to_return

    forward_cpu._selfalign = True
    ops.TopKTopPSampler.forward_cpu = forward_cpu


def _worker(job: dict[str, Any]):
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # vLLM's in-process CPU engine cuts torch to one thread unless OMP_NUM_THREADS is set (and
        # not by vLLM itself), in which case it keeps torch's count as it finds it.
        threads = job.get("threads") or 1
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ.pop("VLLM_OMP_NUM_THREADS_SET_BY_VLLM", None)
        torch.set_num_threads(threads)

    from vllm import LLM, SamplingParams

    from selfalign.tasks.procs import freeze_imports

    freeze_imports()

    # vLLM's own top-p on GPUs (fused kernel) or when the job asks for it (`native_top_p`, to
    # compare); ours on CPU, where vLLM's sorts the vocabulary (module docstring). The same for the
    # draw itself (`native_sampler`).
    own_top_p = not on_gpu and not job.get("native_top_p", False)
    if not on_gpu and not job.get("native_sampler", False):
        use_inverse_cdf_sampler()
    kwargs = dict(
        model=job["model"], dtype=job["dtype"], enforce_eager=job["enforce_eager"], seed=job["seed"],
        trust_remote_code=job["trust_remote_code"], tensor_parallel_size=job["tensor_parallel_size"],
        enable_prefix_caching=True,  # the K samples of a prompt share its KV blocks
        load_format="safetensors",  # never unpickle a checkpoint (pytorch_model.bin)
    )
    if job["max_model_len"]:
        kwargs["max_model_len"] = job["max_model_len"]
    if on_gpu:
        kwargs["gpu_memory_utilization"] = job["gpu_memory_utilization"]
    else:
        # Per-request seeds give each request its own torch.Generator; when a prompt's prefill is
        # split across steps vLLM rewinds that generator's offset, which CPU generators do not
        # support ("CPU Generator does not use offset"). Whole prefills avoid the rewind.
        kwargs["enable_chunked_prefill"] = False
        if job.get("kv_cache_bytes"):
            kwargs["kv_cache_memory_bytes"] = job["kv_cache_bytes"]
    if own_top_p:
        kwargs["logits_processors"] = [TOP_P_PROCESSOR]
    llm = LLM(**kwargs)
    if not on_gpu:
        print(f"{PROGRESS}vLLM: engine ready, {torch.get_num_threads()} CPU thread(s)", flush=True)
    tok = llm.get_tokenizer()
    eos = {tok.eos_token_id} | _generation_eos(job["model"])
    special = set(tok.all_special_ids)
    for run in job["runs"]:
        # A run may cover a slice of the job's prompts (evaluation and next-round sampling share
        # one engine start).
        first = run.get("first", 0)
        prompts = job["prompts"][first:first + run.get("count", len(job["prompts"]))]
        requests = [{"prompt_token_ids": p["ids"]} for p in prompts]
        sampling = dict(n=run["n"], temperature=run["temperature"], top_p=run["top_p"], max_tokens=run["max_tokens"])
        if own_top_p and run["top_p"] < 1:
            sampling.update(top_p=1.0, extra_args={TOP_P_KEY: run["top_p"]})
        if run.get("seed") is None:  # draws from the engine's generator, seeded at start
            params = SamplingParams(**sampling)
        else:
            # A shard: a seed of its own per request, so that it does not depend on what the engine
            # drew before; and an empty prefix cache, so that it is computed as in a fresh engine.
            llm.reset_prefix_cache()
            params = [SamplingParams(**sampling, seed=run["seed"] + i * run["n"]) for i in range(len(prompts))]
        outs = llm.generate(requests, params, use_tqdm=False if quiet() else progress_bar(Path(run["output"]).stem))
        rows = []
        for p, out in zip(prompts, outs):
            for k, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                # The end-of-turn token is part of the response (scored and trained); vLLM may or
                # may not include it in token_ids depending on the stop condition: normalise.
                if c.finish_reason == "stop" and (not ids or ids[-1] not in eos):
                    ids.append(tok.eos_token_id)
                # Control tokens inside the body (a chat-role marker, a pad) vanish from the decoded
                # text, so a hook would judge text the ids do not match: count them for the pairs stage.
                body = ids[:-1] if ids and ids[-1] in eos else ids
                rows.append({
                    "prompt_id": p["id"], "prompt": p["prompt"], "k": k,
                    "response": c.text.strip(), "response_ids": ids,
                    "finish_reason": c.finish_reason or "", "n_tokens": len(ids),
                    "special_tokens": sum(t in special for t in body),
                })
        artifacts.write_table(Path(run["output"]), rows)
        if "manifest" in run:
            artifacts.mark_done(Path(run["output"]), run["manifest"])
            print(f"{PROGRESS}vLLM: wrote {Path(run['output']).name} ({len(rows)} samples)", flush=True)
    return llm


if __name__ == "__main__":
    from selfalign.tasks.procs import children_alive, exit_now, pause_gc, skip_unused_imports

    pause_gc()
    skip_unused_imports()
    engine = _worker(json.loads(Path(sys.argv[1]).read_text()))
    # Every output is written and marked done: skip the interpreter's seconds of teardown, unless
    # the engine left worker processes (multi-GPU) that a normal exit shuts down. An engine core in
    # this process has nothing left to release that the exit does not: its shutdown (freeing the KV
    # cache block by block, ~1 s) is skipped too.
    if not children_alive():
        finalizer = getattr(getattr(engine.llm_engine, "engine_core", None), "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        exit_now(0)
