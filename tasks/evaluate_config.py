"""The evaluate stage's config section (`evaluate.*`), apart from tasks/evaluate.py so that
checking a config imports no stage code. The external judge's keys are here too: it judges the
evaluation's answers (tasks/judge.py), as a stage of its own."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from selfalign.tasks.config_base import ConfigError, check

# The judge reads the eval answers and has a stage key of its own: its keys rerun no evaluation.
JUDGE_KEYS = ("judge_url", "judge_model", "judge_api_key_env")


@dataclass
class EvaluateConfig:
    preferred: str = ""            # hook package.module:function(prompt, response) -> bool
    checker: str = ""              # hook for correctness, same signature
    group: str = ""                # hook package.module:function(prompt) -> str: the eval rates are also
                                   # reported per group (eval/<rate>/<group>), e.g. seen vs held-out kinds
    samples: int = 4               # sampled answers per eval prompt (temperature of generate)
    max_tokens: int = 0            # 0 = generate.max_tokens
    # External judge (tasks/judge.py): round r's greedy answers against round r-1's on the eval prompts,
    # each asked in both orders; logs judge/win_rate (position-debiased), consistency, invalid replies.
    judge_url: str = ""            # OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1 ("" = no judge)
    judge_model: str = ""          # the model name the endpoint serves
    judge_api_key_env: str = ""    # name of the environment variable holding the API key ("" = send none);
                                   # the key itself is never a config value and never logged

    def __post_init__(self) -> None:
        for key, ok, why in [
            ("samples", self.samples >= 0, "must be >= 0"),
            ("max_tokens", self.max_tokens >= 0, "must be >= 0 (0 = generate.max_tokens)"),
            ("judge_url", not self.judge_url or self.judge_url.startswith(("http://", "https://")),
             "must be an http(s) URL, or empty for no judge"),
            ("judge_model", bool(self.judge_model.strip()) or not self.judge_url,
             "must name the judge's model when evaluate.judge_url is set"),
        ]:
            check(f"evaluate.{key}", getattr(self, key), ok, why)
        if self.judge_api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.judge_api_key_env):
            # Not echoed: a value that is no variable name may be the key itself, pasted by mistake.
            raise ConfigError("evaluate.judge_api_key_env must be the NAME of an environment variable holding the key "
                              "(letters, digits, _), not the key")

    def keyed(self) -> dict[str, Any]:
        """The keys the evaluation's output depends on: not the judge's."""
        return {f"evaluate.{k}": v for k, v in asdict(self).items() if k not in JUDGE_KEYS}
