"""The data section (`data.*`): the datasets every stage reads, as tasks/data.py loads them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from selfalign.tasks.config_base import ConfigError, check, check_choices, check_source

DATASETS = ("prompts", "eval_prompts", "offline_pairs", "heldout_pairs")


@dataclass
class DataConfig:
    prompts: str = ""              # prompts for on-policy sampling (JSONL/Parquet path or hub id)
    eval_prompts: str = ""         # held-out prompts for evaluation
    offline_pairs: str = ""        # offline preference pairs (experience replay)
    heldout_pairs: str = ""        # held-out offline pairs: implicit-reward accuracy and the guard
    # The split and the config (subset) of each dataset above when it is a hub id or a dataset folder:
    # "" = split `train`, the default config; a split may be sliced as `datasets` allows, e.g. test[:500].
    # A single JSONL/JSON/Parquet file has neither.
    prompts_split: str = ""
    prompts_config: str = ""
    eval_prompts_split: str = ""
    eval_prompts_config: str = ""
    offline_pairs_split: str = ""
    offline_pairs_config: str = ""
    heldout_pairs_split: str = ""
    heldout_pairs_config: str = ""
    prompts_per_round: int = 0     # prompts sampled per round (0 = all); rounds take fresh slices
    max_eval_prompts: int = 0      # cap on eval prompts (0 = all)
    max_heldout_pairs: int = 0     # cap on held-out pairs scored each round for the guard (0 = all)
    on_bad_row: Literal["error", "skip"] = "error"  # error: stop at the first bad row, naming file, row and
                                   # field | skip: drop bad rows, counted per reason (MLflow data/skipped_*)
    strict: bool = False           # true: duplicate prompts, prompts reused across rounds, eval prompts among
                                   # the training prompts or held-out pairs on offline pairs' prompts stop the
                                   # run; false: warned and counted (MLflow data/duplicate_prompts, ...)

    def __post_init__(self) -> None:
        for name in DATASETS:
            check_source(f"data.{name}", getattr(self, name))
        self._check_splits()
        check_choices(self, "data")
        for key in ("prompts_per_round", "max_eval_prompts", "max_heldout_pairs"):
            check(f"data.{key}", getattr(self, key), getattr(self, key) >= 0, "must be >= 0 (0 = all)")

    def _check_splits(self) -> None:
        """data.<name>_split / _config: only for a dataset that has splits (a hub id or a folder)."""
        from selfalign.tasks.data import is_single_file

        for name in DATASETS:
            source = getattr(self, name)
            for part in ("split", "config"):
                key, value = f"data.{name}_{part}", getattr(self, f"{name}_{part}")
                if not value:
                    continue
                if value != value.strip():
                    raise ConfigError(f"{key}: {value!r} must not start or end with spaces")
                if not source:
                    raise ConfigError(f"{key}: {value!r} is set but data.{name} is empty")
                if is_single_file(source):
                    raise ConfigError(f"{key}: {value!r} applies to a hub id or a dataset folder, but data.{name} "
                                      f"{source!r} is a single file (one table, no {part}s)")
