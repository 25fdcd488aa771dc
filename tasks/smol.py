"""The SmolLM2 preset's task: short questions whose prompt opens with a format instruction that a rule
can check, so the preferred property of an answer is decidable without a judge.

Prompt:   "<instruction> <question>", e.g. "Answer in one word. What is the capital of France?"
Instructions (``INSTRUCTIONS``; the preferred answer obeys the prompt's own):
  "Answer in one word."          one word, optionally followed by . or !
  "Answer with a number only."   digits only ("8", "1,000", "3.5"), optionally a final period
  "Answer yes or no."            "yes" or "no" in any case, optionally followed by . or !
  "Answer in lowercase."         at least one letter and no upper-case letter
  "Answer in at most N words."   1 to N words
An instruct model of 135M parameters often answers in a full sentence instead, so the property has
room to improve. Correctness is tracked on the side: ``ANSWERS`` holds the accepted answers of the
evaluation questions (assets/smollm2/eval_prompts.jsonl), and ``is_correct`` looks for one of them
as a whole word in the response.

All hooks take ``(prompt, response)`` strings and never raise on malformed input.
"""
from __future__ import annotations

import re

_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_MOST = re.compile(r"Answer in at most (\w+) words\.")
INSTRUCTIONS = ("Answer in one word.", "Answer with a number only.", "Answer yes or no.", "Answer in lowercase.",
                "Answer in at most N words.")

_ONE_WORD = re.compile(r"[^\W\d_][\w'-]*[.!]?")
_NUMBER = re.compile(r"-?\d{1,3}(,\d{3})*(\.\d+)?\.?|-?\d+(\.\d+)?\.?")
_YES_NO = re.compile(r"(yes|no)[.!]?", re.IGNORECASE)

# Accepted answers of the evaluation questions (lower case; any one, as a whole word, is correct).
ANSWERS: dict[str, tuple[str, ...]] = {
    "What is the capital of France?": ("paris",),
    "How many legs does a spider have?": ("8", "eight"),
    "Is the sun a star?": ("yes",),
    "What color is the sky on a clear day?": ("blue",),
    "What do bees make?": ("honey",),
    "What is the opposite of hot?": ("cold",),
    "How many days are in a week?": ("7", "seven"),
    "Can fish breathe underwater?": ("yes",),
    "What animal says moo?": ("cow", "cows"),
    "What is frozen water called?": ("ice",),
    "Which planet do we live on?": ("earth",),
    "What is 3 plus 4?": ("7", "seven"),
}


def split_prompt(prompt: str) -> tuple[str, str] | None:
    """(instruction, question) of a prompt, or None when it opens with no known instruction. The
    instruction is returned in its generic form ("Answer in at most N words." keeps its N)."""
    for ins in INSTRUCTIONS[:-1]:
        if prompt.startswith(ins):
            return ins, prompt[len(ins):].strip()
    m = _MOST.match(prompt)
    if m and _word_limit(m.group(1)):
        return m.group(0), prompt[m.end():].strip()
    return None


def _word_limit(n: str) -> int:
    if n.isdigit():
        return int(n)
    return _WORDS.get(n.lower(), 0)


def is_preferred(prompt: str, response: str) -> bool:
    """The response obeys the format instruction its prompt opens with."""
    parts = split_prompt(prompt)
    text = response.strip()
    if parts is None or not text:
        return False
    ins = parts[0]
    if ins == "Answer in one word.":
        return bool(_ONE_WORD.fullmatch(text))
    if ins == "Answer with a number only.":
        return bool(_NUMBER.fullmatch(text))
    if ins == "Answer yes or no.":
        return bool(_YES_NO.fullmatch(text))
    if ins == "Answer in lowercase.":
        return any(c.isalpha() for c in text) and not any(c.isupper() for c in text)
    limit = _word_limit(_MOST.match(ins).group(1))
    return 1 <= len(text.split()) <= limit


def is_correct(prompt: str, response: str) -> bool:
    """One of the question's accepted answers occurs in the response as a whole word (case-insensitive);
    False for questions not in ``ANSWERS``."""
    parts = split_prompt(prompt)
    accepted = ANSWERS.get(parts[1]) if parts else None
    if not accepted:
        return False
    words = set(re.findall(r"[a-z0-9]+", response.lower()))
    return any(a in words for a in accepted)


def format_reward(prompt: str, response: str) -> float:
    """1.0 when the response obeys its instruction, else 0.0 (an auxiliary reward for train.loss=hpo)."""
    return float(is_preferred(prompt, response))
