"""The embedded demo task: 2-digit addition answered in one of four response styles, one preferred.

Why this task: a ~1M-parameter model's DPO implicit reward does not encode "the sum is correct"
(docs/demo.md), but it does learn a *style* preference. So the preference here is a
learnable property of the response (a complete, polite sentence), while correctness is measured on
the side. Every style is a strict grammar, so near-miss variants ("thesum is 828, thanks!") that game
a previous round's implicit reward can be rejected by ``is_valid`` (the config's validity hook
``selfalign.tasks.toy:is_valid``).

Prompt:   "What is 47 + 38?"                                  (both operands 10..99)
Styles (``STYLES``, exact full-string grammars; n = the stated result, no leading zeros):
  plain    "47 plus 38 is 85"                                  16-17 chars
  curt     "47 plus 38 is 85. Obviously."                      28-29 chars
  polite   "47 plus 38 is 85. Happy to help!"                  32-33 chars, PREFERRED
  rambling "47 plus 38 is 85 i guess?? um not sure lol"        42-43 chars
Every style opens with the same core sentence "a plus b is n" and differs only in what follows. This
is deliberate and measured. DPO's margin is a difference of summed log-probs, so tokens that chosen
and rejected share *with the same preceding context* cancel exactly: a pair of two correct answers in
different styles (the demo's offline pairs are built that way) teaches only the ending, never the
digits. Earlier versions put the numbers in different contexts per style ("85" / "47+38=85" /
"The sum of 47 and 38 is 85. ...", then "Sure! 47 + 38 = 85. ..."): DPO on polite-vs-other pairs
pushed the rejected answers' digits down, π0's implicit reward preferred sums off by +1 or +10 on
88-98% of prompts, and DICE rounds amplified that into collapsing arithmetic while the polite rate
rose. Rejected answers with wrong sums do the same through a global digit shift, which is why the
demo's offline pairs only pair correct answers (scripts/build_demo.py).
The rambling style is deliberately the longest, so a reward that learned "longer is better" from the
length-biased offline pairs favours it: DICE's length debiasing has a visible job. The longest valid
response is 43 characters = 44 tokens with EOS, so max_tokens 48 suffices for generation.

All hook functions take ``(prompt, response)`` strings and never raise on malformed input.
Pure Python at import time; ``build_tokenizer`` imports ``tokenizers``/``transformers`` lazily.
"""
from __future__ import annotations

import random
import re
from typing import Any

PROMPT_TEMPLATE = "What is {a} + {b}?"
_PROMPT_RE = re.compile(r"What is ([1-9]\d) \+ ([1-9]\d)\?")
OPERAND_RANGE = (10, 99)

# A number as the model must write it: 0 or no leading zeros, at most 3 digits (max sum 198).
_N = r"(0|[1-9]\d{0,2})"

# style -> (grammar, format template). Groups are named so that the checkers know which number is an
# operand and which is the stated result.
_CORE = rf"(?P<a>{_N}) plus (?P<b>{_N}) is (?P<n>{_N})"
STYLES: dict[str, tuple[re.Pattern[str], str]] = {
    "plain": (re.compile(_CORE), "{a} plus {b} is {n}"),
    "curt": (re.compile(rf"{_CORE}\. Obviously\."), "{a} plus {b} is {n}. Obviously."),
    "polite": (re.compile(rf"{_CORE}\. Happy to help!"), "{a} plus {b} is {n}. Happy to help!"),
    "rambling": (re.compile(rf"{_CORE} i guess\?\? um not sure lol"), "{a} plus {b} is {n} i guess?? um not sure lol"),
}
PREFERRED_STYLE = "polite"

# Chat tokens: one token each, so the prompt is "<|user|>" + characters + "<|end|><|assistant|>".
PAD, UNK, USER, ASSISTANT, END = "<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, UNK, USER, ASSISTANT, END]
# Only user/assistant turns exist in this task; any other role is an error rather than silently
# dropped, so a caller that passes a system prompt finds out.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}" + END +
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}" + END +
    "{% else %}{{ raise_exception('toy chat template supports only user and assistant roles') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
# Every printable ASCII character plus newline and tab: the task needs far fewer, but a model that
# can at least tokenize arbitrary ASCII keeps round-trips exact for user-typed prompts.
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


# --------------------------------------------------------------------------------------- prompts
def make_prompt(a: int, b: int) -> str:
    return PROMPT_TEMPLATE.format(a=a, b=b)


def parse_prompt(prompt: str) -> tuple[int, int]:
    """(a, b) of a prompt "What is a + b?"; ValueError (with the prompt) for anything else."""
    m = _PROMPT_RE.fullmatch(prompt.strip())
    if m is None:
        raise ValueError(f"not a toy addition prompt: {prompt!r}")
    return int(m.group(1)), int(m.group(2))


def all_operand_pairs() -> list[tuple[int, int]]:
    lo, hi = OPERAND_RANGE
    return [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]


def render(style: str, a: int, b: int, n: int | None = None) -> str:
    """The response to "a + b" in ``style``, stating ``n`` (default: the true sum)."""
    return STYLES[style][1].format(a=a, b=b, n=a + b if n is None else n)


def sample_style(rng: random.Random, weights: dict[str, float]) -> str:
    names = sorted(weights)
    return rng.choices(names, weights=[weights[s] for s in names], k=1)[0]


# -------------------------------------------------------------------------------------- checkers
def _match(response: str) -> tuple[str, re.Match[str]] | None:
    # Full matches are mutually exclusive (each style has its own ending), so the first full match
    # is the only one.
    for name, (grammar, _) in STYLES.items():
        m = grammar.fullmatch(response)
        if m is not None:
            return name, m
    return None


def _operands(prompt: str) -> tuple[int, int] | None:
    try:
        return parse_prompt(prompt)
    except ValueError:
        return None


def style_of(response: str) -> str | None:
    """Name of the style whose grammar matches the whole response exactly, else None."""
    hit = _match(response)
    return None if hit is None else hit[0]


def stated_result(response: str) -> int | None:
    """The result a well-formed response states; None when no grammar matches (nothing is stated
    in a recognisable way, so nothing can be checked)."""
    hit = _match(response)
    return None if hit is None else int(hit[1].group("n"))


def is_valid(prompt: str, response: str) -> bool:
    """The validity hook: the response matches one style grammar exactly AND the operands it states
    are the prompt's, in order. Correctness of the result is not required: a wrong but well-formed
    answer is a legitimate sample to rank."""
    hit, ab = _match(response), _operands(prompt)
    if hit is None or ab is None:
        return False
    return (int(hit[1].group("a")), int(hit[1].group("b"))) == ab


def is_preferred(prompt: str, response: str) -> bool:
    """Valid AND in the preferred (polite) style; says nothing about correctness."""
    return is_valid(prompt, response) and style_of(response) == PREFERRED_STYLE


def is_correct(prompt: str, response: str) -> bool:
    """The stated result equals a + b, whatever the style (operand copies are not checked here;
    that is ``is_valid``'s job)."""
    ab, n = _operands(prompt), stated_result(response)
    return ab is not None and n is not None and n == ab[0] + ab[1]


def checker_reward(prompt: str, response: str) -> float:
    """Auxiliary verifiable reward in [0, 1]: the preference (style) weighs most, correctness next.
      1.0  preferred and correct       0.5  preferred, wrong sum
      0.25 other valid style, correct  0.0  other valid style wrong, or invalid/malformed"""
    if not is_valid(prompt, response):
        return 0.0
    correct = is_correct(prompt, response)
    if style_of(response) == PREFERRED_STYLE:
        return 1.0 if correct else 0.5
    return 0.25 if correct else 0.0


_DOUBLED_PUNCT = re.compile(r"[?!.,]{2,}")


def readability_reward(prompt: str, response: str) -> float:
    """A crude readability score in [0, 1] that needs no model: a length term that rises to 1 at
    30 characters and decays to 0 between 60 and 120, times a tidiness term (starts with a capital
    letter or digit, ends with . ! ? or a digit, no doubled punctuation, no all-lowercase filler)."""
    text = response.strip()
    n = len(text)
    if n == 0:
        return 0.0
    length = min(1.0, n / 30.0) if n <= 60 else max(0.0, 1.0 - (n - 60) / 60.0)
    tidy = 0.0
    tidy += 0.25 * (text[0].isupper() or text[0].isdigit())
    tidy += 0.25 * (text[-1] in ".!?" or text[-1].isdigit())
    tidy += 0.25 * (_DOUBLED_PUNCT.search(text) is None)
    tidy += 0.25 * (any(c.isupper() for c in text) or not any(c.isalpha() for c in text))
    return round(length * tidy, 6)


# ------------------------------------------------------------------------------------- tokenizer
def build_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast``: one token per character (WordLevel over
    ``CHARACTERS``), the chat tokens as special tokens, EOS = ``<|end|>`` (the end-of-turn token, so
    generation stops at the end of the assistant turn), no BOS, and ``CHAT_TEMPLATE``.

    The decoder is ``Fuse`` so tokens join without spaces (decode(encode(s)) == s), and
    ``clean_up_tokenization_spaces`` is off: its " ?" -> "?" rewrite would break round-trips."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] = any character including newline; "isolated" makes each one its own piece.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=END,
        additional_special_tokens=[USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
        model_max_length=128,
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


__all__ = [
    "STYLES", "PREFERRED_STYLE", "CHAT_TEMPLATE", "make_prompt", "parse_prompt", "render",
    "style_of", "stated_result", "is_valid", "is_preferred", "is_correct", "checker_reward",
    "readability_reward", "build_tokenizer", "all_operand_pairs", "sample_style",
]
