"""The generate stage's config section (`generate.*`), apart from tasks/generate.py so that
checking a config imports no stage code."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from selfalign.tasks.config_base import check


@dataclass
class GenerateConfig:
    k: int = 16                    # samples per prompt (DICE: 16)
    temperature: float = 0.7       # DICE Zephyr setting
    top_p: float = 0.9             # nucleus sampling: keep the smallest set of tokens with this much probability
    max_tokens: int = 2048         # response length limit; a response cut here is dropped from the pairs
    kv_cache_gib: float = 1.0      # vLLM KV cache on CPU, GiB (fractions too)
    gpu_memory_utilization: float = 0.85  # share of GPU memory vLLM may take (weights and KV cache)
    enforce_eager: bool = True     # skip torch.compile / CUDA graphs warm-up
    tensor_parallel_size: int = 1  # GPUs per vLLM engine
    max_model_len: int = 0         # 0 = the model's own limit
    shard_size: int = 256          # prompts per shard: each is written when drawn, so a crash loses at most
                                   # one and a rerun draws only the missing ones (0 = one shard per stage)
    shards: int = 1                # concurrent generation workers, each a process with its own vLLM engine on
                                   # tensor_parallel_size GPUs of its own; the shards still to draw are dealt
                                   # among them; the samples are the same, bit for bit, for any number
                                   # of workers (evaluate then no longer draws the next round's samples)
    threads: int = 0               # CPU threads of each vLLM worker (0 = its cores: all of them, or its share
                                   # with shards > 1; vLLM alone would run one). 2 on 2 idle cores: a 96-prompt
                                   # stage 1.3x faster; the threads spin, so beside another busy process 1 is
                                   # better (there 2 took 1.4x as long). In the stage key: in bfloat16 the
                                   # thread count can change a few samples (float rounding)

    def __post_init__(self) -> None:
        for key, ok, why in [
            ("k", self.k >= 2, "must be >= 2 (best-vs-worst needs two samples)"),
            ("temperature", self.temperature > 0, "must be > 0 for sampling"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("kv_cache_gib", self.kv_cache_gib > 0, "must be > 0"),
            ("gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "must be in (0, 1]"),
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be >= 1"),
            ("max_model_len", self.max_model_len >= 0, "must be >= 0 (0 = the model's own limit)"),
            ("shard_size", self.shard_size >= 0, "must be >= 0 (0 = one shard)"),
            ("shards", self.shards >= 1, "must be >= 1"),
            ("threads", self.threads >= 0, "must be >= 0 (0 = the worker's cores)"),
        ]:
            check(f"generate.{key}", getattr(self, key), ok, why)

    def engine(self) -> dict[str, Any]:
        """The engine's keys, which evaluation shares: they can change what it draws (threads: float
        rounding in bfloat16; memory and length limits: what fits). Not how many workers draw."""
        return {f"generate.{k}": v for k, v in asdict(self).items()
                if k in ("kv_cache_gib", "gpu_memory_utilization", "enforce_eager", "tensor_parallel_size",
                         "max_model_len", "threads")}

    def keyed(self) -> dict[str, Any]:
        """The keys the stage's output depends on: all but the worker count (the samples are the same
        for any number of workers)."""
        return {f"generate.{k}": v for k, v in asdict(self).items() if k != "shards"}
