"""The score stage's config section (`score.*`), apart from tasks/score.py, which imports torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from selfalign.tasks.config_base import check, check_choices


@dataclass
class ScoreConfig:
    reference: Literal["previous", "sft", "initial"] = "previous"  # previous: ref_{r-1} as in DICE | sft: always
                                   # model.reference | initial: pi_0 from round 2 on (the SFT model in round 1)
    batch_tokens: int = 16384      # tokens per scoring forward (padded ones too, unless packing)
    packing: bool = True           # padding-free rows: sequences back to back, attention kept inside each
    shards: int = 1                # concurrent scoring workers, each a process (one GPU each on GPUs) scoring
                                   # every other batch; the merged scores equal one worker's

    def __post_init__(self) -> None:
        check_choices(self, "score")
        check("score.batch_tokens", self.batch_tokens, self.batch_tokens >= 1, "must be >= 1")
        check("score.shards", self.shards, self.shards >= 1, "must be >= 1")

    def keyed(self) -> dict[str, Any]:
        """The keys the scores depend on: not the worker count (the merged scores equal one worker's),
        nor which reference (that model is an input of the stage key)."""
        return {f"score.{k}": v for k, v in asdict(self).items() if k not in ("shards", "reference")}
