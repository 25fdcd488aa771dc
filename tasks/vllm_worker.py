"""The vLLM worker: `python -m selfalign.tasks.vllm_worker <job.json>`, started by the generate stage
(`tasks.generate.run_vllm`) and by the evaluation. It is the only module that imports vLLM: another
engine replaces this file (docs/extending.md). The job lists the model, the prompts as token ids and
one or more sampling runs; the worker writes each run's table (and a shard's manifest) as soon as it
is drawn.

Top-p on CPU. vLLM's CPU sampler applies top-p by sorting the whole vocabulary for every token. There
the worker passes top_p=1 to vLLM and the real p to `TopPLogitsProcessor` (vLLM's public logits
processor interface, extra_args[TOP_P_KEY]), which applies the same rule with
`kernels.sampling.top_p_filter` (no sort) after the temperature. It draws no random numbers, so
per-request seeds give the same samples as vLLM's own top-p (up to float32 rounding and ties at the
nucleus boundary, which it keeps whole). On GPUs vLLM's own fused top-p is used.

The draw on CPU. vLLM's CPU sampler draws with Gumbel-max noise, a log and an exp for every token of
the vocabulary and every sampled token. vLLM has no public hook for the draw, so `use_inverse_cdf_sampler`
replaces its CPU sampler's method, for the vLLM version it was written against only (`PATCHED_VLLM`;
any other version samples with vLLM's own draw and says so, and tests/test_sampling.py fails until
the patch is checked against the new version). The inverse-CDF draw uses one uniform number per row,
from the request's own generator when it is seeded: the same distribution."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import vllm
from vllm import LLM, SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from selfalign.kernels.sampling import sample_inverse_cdf, top_p_filter
from selfalign.tasks import artifacts
from selfalign.tasks.procs import PROGRESS, quiet

TOP_P_KEY = "selfalign_top_p"  # SamplingParams.extra_args key of TopPLogitsProcessor's p
PATCHED_VLLM = "0.32.0"  # the vLLM whose CPU sampler `use_inverse_cdf_sampler` was checked against


def _request_p(params) -> float:
    p = (params.extra_args or {}).get(TOP_P_KEY)
    return 1.0 if p is None else float(p)


class TopPLogitsProcessor(LogitsProcessor):
    """Top-p of each request that carries extra_args[TOP_P_KEY] = p (others: none), applied to the
    temperature-scaled logits of the batch without a sort (`top_p_filter`). It keeps the persistent
    batch's row -> p table up to date from vLLM's batch updates."""

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        self.p = torch.ones(vllm_config.scheduler_config.max_num_seqs, dtype=torch.float64)
        self.any = False  # some row of the current batch has p < 1

    @classmethod
    def validate_params(cls, params) -> None:
        p = (params.extra_args or {}).get(TOP_P_KEY)
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"SamplingParams.extra_args[{TOP_P_KEY!r}] must be a number in (0, 1], got {p!r}")

    def is_argmax_invariant(self) -> bool:
        return True  # the most probable token always survives

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        # vLLM's order: removed, then added (which may reuse a removed row), then moved.
        for row in batch_update.removed:
            self.p[row] = 1.0
        for row, params, _, _ in batch_update.added:
            self.p[row] = _request_p(params)
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


def use_inverse_cdf_sampler() -> bool:
    """Makes vLLM's CPU sampler draw each token by inverse CDF (`sample_inverse_cdf`) instead of its
    Gumbel-max draw; everything before the draw stays vLLM's (its top-k/top-p, the logprobs it may
    return). Seeded requests take their number from their own generator, one per step as vLLM's CPU
    sampler does, so a request's samples depend on its seed only. An engine that asks for float64
    Gumbel noise keeps vLLM's draw. Returns False, changing nothing, on a vLLM other than PATCHED_VLLM."""
    if vllm.__version__ != PATCHED_VLLM:
        return False
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    vllm_forward_cpu = ops.TopKTopPSampler.forward_cpu
    if getattr(vllm_forward_cpu, "inverse_cdf", False):
        return True

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

    forward_cpu.inverse_cdf = True
    ops.TopKTopPSampler.forward_cpu = forward_cpu
    return True


def progress_bar(label: str, every: float = 0.2):
    """A `use_tqdm` callable for vLLM's generate: instead of a terminal bar, one line per `every`
    of the way (finished sequences), which the parent passes to the stage's log."""
    from tqdm import tqdm

    class Lines(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("dynamic_ncols", None)
            self.sink = open(os.devnull, "w")  # no bar; tqdm still keeps count and time
            # Enabled whatever TQDM_* says (tqdm reads its defaults from there): a disabled bar reports
            # an elapsed time of 0, which vLLM divides by.
            super().__init__(*args, file=self.sink, **kwargs | {"disable": False})
            self.next_report = every

        def update(self, n=1):
            super().update(n)
            if self.total and self.n / self.total >= self.next_report - 1e-9:
                rate = self.n / max(self.format_dict["elapsed"], 1e-9)
                print(f"{PROGRESS}vLLM {label}: {self.n}/{self.total} sequences, {rate:.0f}/s", flush=True)
                while self.next_report <= self.n / self.total + 1e-9:
                    self.next_report += every

        def close(self):
            super().close()
            self.sink.close()

    def make(*args, **kwargs):
        # vLLM also wraps the loop that adds requests (an iterable, no total): no lines for that.
        return tqdm(*args, disable=True, **kwargs) if args else Lines(**kwargs)

    return make


def generation_eos(model: str) -> set[int]:
    """End-of-turn ids from the model's generation config (Llama 3 has two)."""
    from transformers import GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        return set()
    return set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())


def engine(job: dict[str, Any]) -> LLM:
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(job.get("threads") or 1)
    # vLLM's own top-p on GPUs (fused kernel) or when the job asks for it (`native_top_p`, to
    # compare); ours on CPU (module docstring). The same for the draw (`native_sampler`).
    if not on_gpu and not job.get("native_sampler", False) and not use_inverse_cdf_sampler():
        print(f"{PROGRESS}vLLM {vllm.__version__}: its own CPU sampler (the inverse-CDF draw is checked "
              f"against {PATCHED_VLLM} only)", flush=True)
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
        if not job.get("native_top_p", False):
            kwargs["logits_processors"] = [TopPLogitsProcessor]
    llm = LLM(**kwargs)
    if not on_gpu:
        print(f"{PROGRESS}vLLM: engine ready, {torch.get_num_threads()} CPU thread(s)", flush=True)
    return llm


def draw(llm: LLM, job: dict[str, Any], run: dict[str, Any], own_top_p: bool, eos: set[int]) -> list[dict[str, Any]]:
    """The sample rows of one sampling run of the job; `eos`: the model's end-of-turn ids."""
    tok = llm.get_tokenizer()
    special = set(tok.all_special_ids)
    # A run may cover a slice of the job's prompts (evaluation and next-round sampling share one
    # engine start).
    first = run.get("first", 0)
    prompts = job["prompts"][first:first + run.get("count", len(job["prompts"]))]
    requests = [{"prompt_token_ids": p["ids"]} for p in prompts]
    sampling = dict(n=run["n"], temperature=run["temperature"], top_p=run["top_p"], max_tokens=run["max_tokens"])
    if own_top_p and run["top_p"] < 1:
        sampling.update(top_p=1.0, extra_args={TOP_P_KEY: run["top_p"]})
    if run.get("seed") is None:  # draws from the engine's generator, seeded at start
        params = SamplingParams(**sampling)
    else:
        # A shard: a seed of its own per request, so that it does not depend on what the engine drew
        # before; and an empty prefix cache, so that it is computed as in a fresh engine.
        llm.reset_prefix_cache()
        params = [SamplingParams(**sampling, seed=run["seed"] + i * run["n"]) for i in range(len(prompts))]
    outs = llm.generate(requests, params, use_tqdm=False if quiet() else progress_bar(Path(run["output"]).stem))
    rows = []
    for p, out in zip(prompts, outs):
        for k, c in enumerate(out.outputs):
            ids = list(c.token_ids)
            # The end-of-turn token is part of the response (scored and trained); vLLM may or may not
            # include it in token_ids depending on the stop condition: normalise.
            if c.finish_reason == "stop" and (not ids or ids[-1] not in eos):
                ids.append(tok.eos_token_id)
            # Control tokens inside the body (a chat-role marker, a pad) vanish from the decoded text,
            # so a hook would judge text the ids do not match: count them for the pairs stage.
            body = ids[:-1] if ids and ids[-1] in eos else ids
            rows.append({
                "prompt_id": p["id"], "prompt": p["prompt"], "k": k,
                "response": c.text.strip(), "response_ids": ids,
                "finish_reason": c.finish_reason or "", "n_tokens": len(ids),
                "special_tokens": sum(t in special for t in body),
            })
    return rows


def main(job: dict[str, Any]) -> None:
    llm = engine(job)
    own_top_p = not torch.cuda.is_available() and not job.get("native_top_p", False)
    eos = {llm.get_tokenizer().eos_token_id} | generation_eos(job["model"])
    for run in job["runs"]:
        rows = draw(llm, job, run, own_top_p, eos)
        artifacts.write_table(Path(run["output"]), rows)
        if "manifest" in run:
            artifacts.mark_done(Path(run["output"]), run["manifest"])
            print(f"{PROGRESS}vLLM: wrote {Path(run['output']).name} ({len(rows)} samples)", flush=True)


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
