"""The pairs stage's config section (`pairs.*`), apart from tasks/pairs.py so that checking a
config imports no stage code."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from selfalign.tasks.config_base import check, check_choices


@dataclass
class PairsConfig:
    min_valid: int = 8             # keep prompts with at least this many valid samples (DICE: 8 of 16)
    min_chars: int = 4             # responses shorter than this are degenerate (DICE: <= 3 dropped)
    max_chars: int = 6699          # responses longer than this are degenerate (DICE: >= 6700 dropped)
    length_unit: Literal["chars", "tokens"] = "chars"  # chars (DICE) | tokens: the unit of the alpha * length penalty
    alpha_step: float = 0.001      # grid step of the alpha sweep (DICE: 0.001)
    alpha_max: float = 1.0         # the sweep's upper end, exclusive (DICE: 1.0)
    alpha_min: float = -1.0        # < 0: two-sided sweep, alpha* may be negative and so cancel a reward's taste
                                   # for shorter answers as well as for longer ones | 0: DICE's one-sided sweep
    validity: str = ""             # optional hook package.module:function(prompt, response) -> bool
    gamma: float = 0.5             # fraction of offline (replay) pairs in the training set (0: every generated
                                   # pair, no replay; 1: offline pairs only)
    budget: int = 0                # training pairs per round: generated ones at 1 - gamma, offline ones fill the
                                   # rest (0 = DICE's rule: ~as many as there are offline pairs)
    source: Literal["dice", "offline"] = "dice"  # dice: generated pairs mixed with offline ones | offline: offline
                                   # pairs only, no generation or scoring (the control arm: iterated DPO on the
                                   # offline data)

    def __post_init__(self) -> None:
        check_choices(self, "pairs")
        for key, ok, why in [
            ("min_valid", self.min_valid >= 2, "must be >= 2 (best-vs-worst needs two samples)"),
            ("gamma", 0 <= self.gamma <= 1, "must be in [0, 1]"),
            ("alpha_step", self.alpha_step > 0, "must be > 0"),
            ("alpha_max", self.alpha_max >= 0, "must be >= 0"),
            ("alpha_min", self.alpha_min <= 0, "must be <= 0 (0 = one-sided, as DICE)"),
            ("budget", self.budget >= 0, "must be >= 0 (0 = DICE's replay rule)"),
            ("min_chars", self.min_chars >= 0, "must be >= 0"),
            ("max_chars", self.max_chars > self.min_chars, f"must be > pairs.min_chars={self.min_chars}"),
        ]:
            check(f"pairs.{key}", getattr(self, key), ok, why)

    def keyed(self) -> dict[str, Any]:
        return {f"pairs.{k}": v for k, v in asdict(self).items()}
