"""Verifiable instruction following for a small instruct model (SmolLM2-135M-Instruct): short factual or
arithmetic questions with known answers, each with one format instruction that a rule can check.

Prompt: "<instruction> <question>" or "<question> <instruction>", e.g.
    "Answer with a number only. What is 17 plus 25?"      "What is the capital of Peru? Answer in one word."
Kinds (``KINDS``), each with 3 phrasings (``PHRASINGS``); the preferred answer obeys its prompt's own:
  one_word      one word, optionally ending in . or !          (questions with a one-word answer)
  number_only   digits only ("42", "1,000", "3.5"), optional .  (numeric answers)
  yes_no        "yes" or "no" in any case, optional . or !       (yes/no questions)
  lowercase     at least one letter, no upper-case letter
  uppercase     at least one letter, no lower-case letter        (held out)
  quoted        the whole answer inside one pair of double quotes ("..." or “...”)  (held out)
  starts_with   begins with a given phrase (case-insensitive) followed by some text
  ends_with     ends with a given phrase (final . or ! ignored) after some text
  max_words     1 to N words (N = 3, 4 or 5)
  no_commas     some text and no comma
  bullets       exactly N non-blank lines (N = 2 or 3), each "- ", "* " or "• " followed by text
  then_done     some text, then the word "Done" as the last word (optional . or !)
  exclaim       some text, ending with "!"
``HELDOUT_KINDS`` appear only in evaluation prompts, never in training prompts or pairs, so the rate on
them (``group``) measures whether obeying instructions generalises beyond the kinds trained on.

Question bank (``BANK``, tasks/demos/ifollow_bank.py, built deterministically at import): about 500 hand-written facts (capitals,
languages, currencies, animals, colours, opposites, planets and science, counts and units, yes/no facts)
plus generated ones (days/months order, parity and comparison yes/no questions, addition and subtraction
up to 50/60, multiplication up to 12). A fact has 1-3 question wordings; its ``key`` groups facts that
give each other away (e.g. "opposite of hot" and "opposite of cold"), and splits are made by key.
``is_correct`` looks up the question text and accepts any accepted answer as a whole word, ignoring case
and accents; numbers as digits or words ("42", "forty-two"); yes/no by the first yes or no.

Data files (assets/ifollow/, written by scripts/build_ifollow.py, deterministic, no model needed): fact
keys split train/eval/pair-holdout; prompts.jsonl and offline_pairs.jsonl use training facts and seen
kinds; eval_prompts.jsonl uses eval facts (about 29% held-out kinds); heldout_pairs.jsonl uses the
pair-holdout facts and seen kinds. Pair sides come from response templates: chosen = the right answer
formatted to obey; rejected = the right answer in a typical small-model failure (a full sentence, wrong
case, a comma, a missing phrase, a wrong bullet count...), so a pair differs in format, not in facts.

All hooks take ``(prompt, response)`` strings and never raise.
"""
from __future__ import annotations

import re

from selfalign.tasks.demos.ifollow_bank import BANK, Fact, answer_pattern, fact_of, normalise, number_words

__all__ = ["BANK", "Fact", "fact_of", "number_words"]  # the bank's names, used through this module

KINDS = ("one_word", "number_only", "yes_no", "lowercase", "uppercase", "quoted", "starts_with", "ends_with",
         "max_words", "no_commas", "bullets", "then_done", "exclaim")
HELDOUT_KINDS = frozenset({"uppercase", "quoted"})
SEEN_KINDS = tuple(k for k in KINDS if k not in HELDOUT_KINDS)
ALL_QTYPES = frozenset({"word", "number", "yesno"})
# Which questions a kind fits: the three answer-shape kinds only where the answer has that shape.
QTYPES_OF = {k: ALL_QTYPES for k in KINDS} | {
    "one_word": frozenset({"word"}), "number_only": frozenset({"number"}), "yes_no": frozenset({"yesno"})}
PARAMS = {"starts_with": ("The answer is", "My answer is", "Here is my answer:"),
          "ends_with": ("Hope this helps", "That is all", "Thank you for asking"),
          "max_words": (3, 4, 5), "bullets": (2, 3)}
# {p}: the phrase, {n}: N in words, {d}: N in digits.
PHRASINGS = {
    "one_word": ("Answer in one word.", "Reply with a single word.", "Use just one word in your answer."),
    "number_only": ("Answer with a number only.", "Reply with just the number, in digits.", "Give only the number."),
    "yes_no": ("Answer yes or no.", "Reply with just yes or no.", "Say only yes or no."),
    "lowercase": ("Answer in lowercase.", "Write your answer in all lowercase letters.",
                  "Do not use any capital letters."),
    "uppercase": ("Answer in all capital letters.", "Write your whole answer in uppercase.",
                  "Reply using only capital letters."),
    "quoted": ("Wrap your whole answer in double quotes.", "Put your entire answer inside double quotation marks.",
               "Reply with your answer enclosed in double quotes."),
    "starts_with": ('Start your answer with "{p}".', 'Begin your reply with the words "{p}".',
                    'Your answer must begin with "{p}".'),
    "ends_with": ('End your answer with "{p}".', 'Finish your reply with the words "{p}".',
                  'Your answer must end with "{p}".'),
    "max_words": ("Answer in at most {n} words.", "Use no more than {d} words.", "Reply in {n} words or fewer."),
    "no_commas": ("Do not use any commas.", "Answer without using commas.", "Your reply must not contain a comma."),
    "bullets": ("Answer in exactly {n} bullet points.", 'Reply with exactly {n} lines, each starting with "- ".',
                "Use exactly {n} bullet points, each starting with a dash."),
    "then_done": ('Give your answer, then write the word "Done".', 'After your answer, write "Done".',
                  'Answer and then finish with the word "Done".'),
    "exclaim": ("End your answer with an exclamation mark.", 'Finish your reply with a "!".',
                "Your answer must end with an exclamation point."),
}

def instruction(kind: str, phrasing: int, param: str | int | None = None) -> str:
    """The instruction text of a kind's phrasing with its parameter (phrase or N)."""
    n = param if isinstance(param, int) else 0
    return PHRASINGS[kind][phrasing].format(p=param, n=number_words(n), d=n)


def make_prompt(instr: str, question: str, instruction_first: bool) -> str:
    return f"{instr} {question}" if instruction_first else f"{question} {instr}"


# Every instruction text -> (kind, param), longest first so that parsing prefers the most specific.
INSTRUCTIONS: dict[str, tuple[str, str | int | None]] = {}
for _k in KINDS:
    for _i in range(len(PHRASINGS[_k])):
        for _p in PARAMS.get(_k, (None,)):
            INSTRUCTIONS[instruction(_k, _i, _p)] = (_k, _p)
_BY_LENGTH = sorted(INSTRUCTIONS, key=lambda s: (-len(s), s))


def parse(prompt: str) -> tuple[str, str | int | None, str] | None:
    """(kind, param, question) of a prompt, or None when it carries no known instruction."""
    if not isinstance(prompt, str):
        return None
    p = " ".join(prompt.split())
    # Fast paths (instructions end with "." and hold no ". "; questions end with "?"), then the general one.
    head, sep, tail = p.partition(". ")
    if sep and head + "." in INSTRUCTIONS:
        return (*INSTRUCTIONS[head + "."], tail)
    head, sep, tail = p.rpartition("? ")
    if sep and tail in INSTRUCTIONS:
        return (*INSTRUCTIONS[tail], head + "?")
    for text in _BY_LENGTH:
        if p.startswith(text + " "):
            return (*INSTRUCTIONS[text], p[len(text) + 1:])
        if p.endswith(" " + text):
            return (*INSTRUCTIONS[text], p[:-len(text) - 1])
    return None


def kind_of(prompt: str) -> str | None:
    parsed = parse(prompt)
    return parsed[0] if parsed else None


def group(prompt: str) -> str:
    kind = kind_of(prompt)
    return "unknown" if kind is None else "heldout_kinds" if kind in HELDOUT_KINDS else "seen_kinds"


# ---------------------------------------------------------------------------------------------- checks
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*[.!]?")
_NUMBER = re.compile(r"[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?\.?")
_YES_NO = re.compile(r"(?:yes|no)[.!]?", re.IGNORECASE)
_BULLET = re.compile(r"[-*•]\s+\S")
_DONE = re.compile(r"(.*)\bdone[.!]?", re.IGNORECASE | re.DOTALL)


def _text(t: str) -> bool:
    return any(c.isalnum() for c in t)


def _n_words(t: str) -> int:
    return sum(_text(w) for w in t.split())


def _ends_with(t: str, phrase: str) -> bool:
    t, p = t.rstrip(".! "), phrase.rstrip(".! ")
    head = t[:len(t) - len(p)]
    return len(t) > len(p) and t[len(head):].casefold() == p.casefold() and not head[-1:].isalnum() and _text(head)


_CHECKS = {
    "one_word": lambda t, _: _WORD.fullmatch(t) is not None,
    "number_only": lambda t, _: _NUMBER.fullmatch(t) is not None,
    "yes_no": lambda t, _: _YES_NO.fullmatch(t) is not None,
    "lowercase": lambda t, _: any(c.isalpha() for c in t) and not any(c.isupper() for c in t),
    "uppercase": lambda t, _: any(c.isalpha() for c in t) and not any(c.islower() for c in t),
    "quoted": lambda t, _: (len(t) >= 3 and t[0] in '"“' and t[-1] in '"”' and _text(t[1:-1])
                            and not any(c in '"“”' for c in t[1:-1])),
    "starts_with": lambda t, p: t[:len(p)].casefold() == p.casefold() and _text(t[len(p):]),
    "ends_with": _ends_with,
    "max_words": lambda t, n: 1 <= _n_words(t) <= n,
    "no_commas": lambda t, _: _text(t) and not any(c in ",，、،" for c in t),
    "bullets": lambda t, n: (len(lines := [ln.strip() for ln in t.splitlines() if ln.strip()]) == n
                             and all(_BULLET.match(ln) and _text(ln[1:]) for ln in lines)),
    "then_done": lambda t, _: bool(m := _DONE.fullmatch(t)) and _text(m.group(1)),
    "exclaim": lambda t, _: t.endswith("!") and _text(t),
}


def obeys(prompt: str, response: str) -> bool:
    """The response (stripped) obeys its prompt's format instruction; False for unknown prompts."""
    parsed = parse(prompt)
    if parsed is None or not isinstance(response, str):
        return False
    try:
        return bool(_CHECKS[parsed[0]](response.strip(), parsed[1]))
    except Exception:  # a rule check must never fail a run; the checks are written not to raise
        return False


def is_preferred(prompt: str, response: str) -> bool:
    return obeys(prompt, response)


def format_reward(prompt: str, response: str) -> float:
    """1.0 when the response obeys its instruction, else 0.0 (an auxiliary reward for train.loss=hpo)."""
    return float(obeys(prompt, response))



_YN = re.compile(r"(?<![a-z0-9])(yes|no)(?![a-z0-9])")


def is_correct(prompt: str, response: str) -> bool:
    """The response states an accepted answer of the prompt's question (a whole word or phrase, any case
    and accents, numbers as digits or words; for yes/no questions the first yes or no); False for
    questions not in the bank. A prompt without a known instruction is looked up as a bare question."""
    if not isinstance(prompt, str) or not isinstance(response, str):
        return False
    parsed = parse(prompt)
    fact = fact_of(parsed[2] if parsed else prompt)
    if fact is None:
        return False
    text = normalise(response)
    if fact.qtype == "yesno":
        m = _YN.search(text)
        return m is not None and m.group(1) == fact.accepted[0]
    return answer_pattern(fact.accepted).search(text) is not None
