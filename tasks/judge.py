"""External judge: an OpenAI-compatible chat-completions endpoint (a hosted API, or a vLLM server on
127.0.0.1) compares round r's answer with round r-1's on each held-out prompt; the result is a win
rate of round r over round r-1, debiased for position.

Position swap: every prompt is judged twice, once with the new answer as "A" and once as "B". Each
judgement scores the new answer 1 (preferred), 0 (not) or 0.5 (no usable verdict); the prompt's
score is the mean of its two judgements, and

    win_rate = mean over prompts of (s(new as A) + s(new as B)) / 2

so a judge that always says "A" gives exactly 0.5. Prompts whose two answers are identical score 0.5
without a request. Besides the win rate: `consistency` (share of prompts where both orders name the
same answer), `first_position` (share of usable verdicts that chose "A": 0.5 means no position bias)
and `invalid` (judgements without a verdict).

Only the standard library is used (urllib). The API key is read from the environment variable the
caller names and is sent only in the Authorization header; it never appears in a log line or an
error message.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# One user message (no system turn: some chat templates, Gemma's for one, reject it).
TEMPLATE = ("You are an impartial judge. Compare two responses to the same instruction and decide which one "
            "follows the instruction better and answers it more helpfully and correctly. The order of the "
            "responses must not influence your decision.\n\n"
            "[Instruction]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
            "Which response is better? Reply with a single letter: A or B.")
_NAMED = re.compile(r"\b[Rr]esponse\s*\[?([AB])\b")
_LETTER = re.compile(r"(?<![\w'])\[?([AB])\]?(?![\w'])")


class JudgeError(RuntimeError):
    """The endpoint could not be used; the message names the URL and the status, never the key."""


@dataclass
class Judge:
    """An OpenAI-compatible chat-completions endpoint used as a pairwise judge.

    url: the API base (".../v1") or the full ".../chat/completions" URL.
    api_key_env: name of the environment variable holding the key ("" = no key sent)."""
    url: str
    model: str
    api_key_env: str = ""
    max_tokens: int = 8
    timeout: float = 120.0
    retries: int = 3
    concurrency: int = 4

    @property
    def endpoint(self) -> str:
        u = self.url.rstrip("/")
        return u if u.endswith("/chat/completions") else u + "/chat/completions"

    def _key(self) -> str:
        if not self.api_key_env:
            return ""
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise JudgeError(f"judge: the environment variable {self.api_key_env} (named as the API key) is not set")
        return key

    def request_body(self, prompt: str, a: str, b: str) -> dict[str, Any]:
        return {"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": TEMPLATE.format(prompt=prompt, a=a, b=b)}]}

    def ask(self, prompt: str, a: str, b: str) -> str:
        """The judge's reply text for one ordered comparison (A first, B second)."""
        data = json.dumps(self.request_body(prompt, a, b)).encode()
        headers = {"Content-Type": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode())
                break
            except urllib.error.HTTPError as e:
                # 429 and 5xx are worth another try; anything else is a configuration error.
                if (e.code == 429 or e.code >= 500) and attempt < self.retries:
                    time.sleep(2 ** attempt)
                    continue
                body = e.read().decode(errors="replace")[:300]
                raise JudgeError(f"judge: {self.endpoint} answered HTTP {e.code}: {body}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt < self.retries:
                    time.sleep(2 ** attempt)
                    continue
                reason = getattr(e, "reason", e)
                raise JudgeError(f"judge: cannot reach {self.endpoint}: {reason}") from None
            except json.JSONDecodeError:
                raise JudgeError(f"judge: {self.endpoint} did not answer with JSON") from None
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge: {self.endpoint} answered without choices[0].message.content: "
                             f"{json.dumps(reply)[:300]}") from None


def parse_verdict(text: str) -> str | None:
    """"A" or "B" from a judge's reply ("A", "B.", "Response B", "[A] is better"), else None."""
    t = text.strip().strip("*").strip()
    if t.rstrip(".!") in ("A", "B"):
        return t.rstrip(".!")
    # A named "Response B" counts before a bare capital letter, which may be an article.
    m = _NAMED.search(t) or _LETTER.search(t)
    return m.group(1) if m else None


def score_pair(verdict_new_first: str | None, verdict_new_second: str | None) -> float:
    """The new answer's score on one prompt from the two orders: the mean of 1 (chosen), 0 (not)
    and 0.5 (no verdict) over (new as A, new as B)."""
    first = 0.5 if verdict_new_first is None else float(verdict_new_first == "A")
    second = 0.5 if verdict_new_second is None else float(verdict_new_second == "B")
    return (first + second) / 2


def win_rate(items: Sequence[tuple[str, str, str]], ask: Callable[[str, str, str], str],
             concurrency: int = 1) -> dict[str, Any]:
    """Win rate of `new` over `old` for items (prompt, new, old); `ask(prompt, a, b)` returns the
    judge's reply text. Returns the metrics (see the module docstring) and the per-prompt records."""
    jobs: list[tuple[int, int, str, str, str]] = []  # (item, order, prompt, a, b); order 0: new is A
    for i, (prompt, new, old) in enumerate(items):
        if new.strip() != old.strip():
            jobs += [(i, 0, prompt, new, old), (i, 1, prompt, old, new)]

    def run(job):
        return job[:2], ask(*job[2:])

    if concurrency > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(concurrency) as pool:
            replies = dict(pool.map(run, jobs))
    else:
        replies = dict(map(run, jobs))
    records, verdicts = [], []
    for i, (prompt, new, old) in enumerate(items):
        if (i, 0) not in replies:
            records.append({"prompt": prompt, "new": new, "old": old, "score": 0.5, "identical": True,
                            "reply_new_first": "", "reply_new_second": "", "verdict_new_first": None,
                            "verdict_new_second": None})
            continue
        r0, r1 = replies[(i, 0)], replies[(i, 1)]
        v0, v1 = parse_verdict(r0), parse_verdict(r1)
        verdicts += [v0, v1]
        records.append({"prompt": prompt, "new": new, "old": old, "score": score_pair(v0, v1), "identical": False,
                        "reply_new_first": r0, "reply_new_second": r1, "verdict_new_first": v0,
                        "verdict_new_second": v1})
    n = len(records)
    judged = [r for r in records if not r["identical"]]
    usable = [v for v in verdicts if v is not None]
    consistent = [r for r in judged if r["verdict_new_first"] is not None and r["verdict_new_second"] is not None
                  and (r["verdict_new_first"] == "A") == (r["verdict_new_second"] == "B")]
    metrics = {
        "judge/win_rate": sum(r["score"] for r in records) / n if n else float("nan"),
        "judge/prompts": n,
        "judge/identical": n - len(judged),
        "judge/requests": len(jobs),
        "judge/invalid": len(verdicts) - len(usable),
        "judge/consistency": len(consistent) / len(judged) if judged else float("nan"),
        "judge/first_position": sum(v == "A" for v in usable) / len(usable) if usable else float("nan"),
    }
    return {"metrics": metrics, "records": records}


def judge_rounds(judge: Judge, new_rows: Sequence[dict[str, Any]], old_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Win rate of one round's answers over another's on the prompts both answered: rows are eval
    tables ({prompt_id, prompt, response}); with several samples per prompt the first is used."""
    old = {}
    for r in old_rows:
        old.setdefault(r["prompt_id"], r)
    items, seen = [], set()
    for r in new_rows:
        pid = r["prompt_id"]
        if pid in old and pid not in seen:
            seen.add(pid)
            items.append((r["prompt"], r["response"], old[pid]["response"]))
    if not items:
        raise JudgeError("judge: the two rounds have no evaluation prompt in common")
    return win_rate(items, judge.ask, judge.concurrency)


def judge_round(judge: Judge, run_dir, r: int, log=print) -> dict[str, Any]:
    """The evaluate stage's judge: round r's greedy evaluation answers against round r-1's
    (`round_<r>/eval_greedy.parquet`). Writes the per-prompt records to `round_<r>/judge.parquet`
    and returns the metrics."""
    from pathlib import Path

    from selfalign.tasks import artifacts

    new_dir, old_dir = artifacts.round_dir(Path(run_dir), r), artifacts.round_dir(Path(run_dir), r - 1)
    out = judge_rounds(judge, artifacts.read_table(new_dir / "eval_greedy.parquet"),
                       artifacts.read_table(old_dir / "eval_greedy.parquet"))
    artifacts.write_table(new_dir / "judge.parquet", out["records"])
    m = out["metrics"]
    log(f"judge: round {r} vs round {r - 1} on {m['judge/prompts']} prompts ({judge.model}): win rate "
        f"{m['judge/win_rate']:.3f}, consistency {m['judge/consistency']:.3f}, invalid {m['judge/invalid']}")
    return m
