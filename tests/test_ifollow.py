"""The verifiable instruction-following task (selfalign.tasks.demos.ifollow): its rule checkers for every
kind, its answer checker, and the shipped data in assets/ifollow/ (counts, disjoint splits, held-out kinds,
pair sides, byte-for-byte reproducible by scripts/build_ifollow.py). Fast, no torch."""
import importlib.util
import json
import random
from pathlib import Path

import pytest

from selfalign.tasks.demos import ifollow as ifo

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "ifollow"
FILES = ("prompts.jsonl", "eval_prompts.jsonl", "offline_pairs.jsonl", "heldout_pairs.jsonl", "build_report.json")
WORD_Q, NUM_Q, YN_Q = "What is the capital of France?", "What is 17 plus 25?", "Is the Sun a star?"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def question(prompt: str) -> str:
    return ifo.parse(prompt)[2]


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_ifollow", ROOT / "scripts" / "build_ifollow.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# (kind, param, question, response, obeys)
CASES = [
    ("one_word", None, WORD_Q, "Paris", True), ("one_word", None, WORD_Q, "Paris.", True),
    ("one_word", None, WORD_Q, "  Paris!\n", True), ("one_word", None, WORD_Q, "São", True),
    ("one_word", None, WORD_Q, "The capital of France is Paris.", False), ("one_word", None, WORD_Q, "", False),
    ("one_word", None, WORD_Q, "   ", False), ("one_word", None, WORD_Q, "Paris..", False),
    ("one_word", None, WORD_Q, "New York", False), ("one_word", None, WORD_Q, "Paris?", False),
    ("number_only", None, NUM_Q, "42", True), ("number_only", None, NUM_Q, "42.", True),
    ("number_only", None, NUM_Q, " 1,000 ", True), ("number_only", None, NUM_Q, "3.5", True),
    ("number_only", None, NUM_Q, "forty-two", False), ("number_only", None, NUM_Q, "42 apples", False),
    ("number_only", None, NUM_Q, "The answer is 42.", False), ("number_only", None, NUM_Q, "", False),
    ("number_only", None, NUM_Q, "٤٢", False), ("number_only", None, NUM_Q, "42..", False),
    ("yes_no", None, YN_Q, "Yes", True), ("yes_no", None, YN_Q, "no.", True), ("yes_no", None, YN_Q, "YES!", True),
    ("yes_no", None, YN_Q, "Yes, it is.", False), ("yes_no", None, YN_Q, "Nope", False),
    ("yes_no", None, YN_Q, "", False), ("yes_no", None, YN_Q, "Yes or no", False),
    ("lowercase", None, WORD_Q, "paris.", True), ("lowercase", None, WORD_Q, "the capital is paris, 1 city", True),
    ("lowercase", None, WORD_Q, "ça va, é", True), ("lowercase", None, WORD_Q, "Paris", False),
    ("lowercase", None, NUM_Q, "42", False), ("lowercase", None, WORD_Q, "", False),
    ("lowercase", None, WORD_Q, "paris É", False),
    ("uppercase", None, WORD_Q, "PARIS.", True), ("uppercase", None, NUM_Q, "42 IS THE ANSWER", True),
    ("uppercase", None, WORD_Q, "ÉTÉ", True), ("uppercase", None, WORD_Q, "Paris", False),
    ("uppercase", None, NUM_Q, "42", False), ("uppercase", None, WORD_Q, " ", False),
    ("quoted", None, WORD_Q, '"Paris"', True), ("quoted", None, WORD_Q, '  "The capital is Paris."  ', True),
    ("quoted", None, WORD_Q, "“Paris”", True), ("quoted", None, WORD_Q, "Paris", False),
    ("quoted", None, WORD_Q, '"Paris".', False), ("quoted", None, WORD_Q, "'Paris'", False),
    ("quoted", None, WORD_Q, '""', False), ("quoted", None, WORD_Q, '"', False),
    ("quoted", None, WORD_Q, 'The answer is "Paris".', False), ("quoted", None, WORD_Q, '"Pa"ris"', False),
    ("starts_with", "The answer is", WORD_Q, "The answer is Paris.", True),
    ("starts_with", "The answer is", WORD_Q, "the answer is paris", True),
    ("starts_with", "Here is my answer:", WORD_Q, "Here is my answer: Paris", True),
    ("starts_with", "The answer is", WORD_Q, "The answer is", False),
    ("starts_with", "The answer is", WORD_Q, "The answer is.", False),
    ("starts_with", "The answer is", WORD_Q, "Sure! The answer is Paris.", False),
    ("starts_with", "The answer is", WORD_Q, "", False),
    ("ends_with", "Hope this helps", WORD_Q, "Paris. Hope this helps.", True),
    ("ends_with", "Hope this helps", WORD_Q, "Paris hope this helps!", True),
    ("ends_with", "Hope this helps", WORD_Q, "Paris. Hope this helps", True),
    ("ends_with", "Hope this helps", WORD_Q, "Hope this helps.", False),
    ("ends_with", "Hope this helps", WORD_Q, "Hope this helps. Paris.", False),
    ("ends_with", "Hope this helps", WORD_Q, "Paris. Hope this helps. Bye.", False),
    ("ends_with", "That is all", WORD_Q, "Paris. Xthat is all", False),
    ("ends_with", "That is all", WORD_Q, "", False),
    ("max_words", 3, WORD_Q, "It is Paris.", True), ("max_words", 3, WORD_Q, "Paris", True),
    ("max_words", 3, WORD_Q, "It is — Paris", True),  # a lone dash is not a word
    ("max_words", 3, WORD_Q, "The answer is Paris.", False), ("max_words", 5, WORD_Q, "", False),
    ("max_words", 5, WORD_Q, "The capital of France is Paris.", False),
    ("no_commas", None, WORD_Q, "The capital of France is Paris.", True), ("no_commas", None, NUM_Q, "1000", True),
    ("no_commas", None, WORD_Q, "Sure, Paris.", False), ("no_commas", None, WORD_Q, "Paris，France", False),
    ("no_commas", None, WORD_Q, "", False), ("no_commas", None, WORD_Q, "...", False),
    ("bullets", 2, WORD_Q, "- Paris\n- The capital of France is Paris.", True),
    ("bullets", 2, WORD_Q, "\n- Paris\n\n  * It is in France\n", True),
    ("bullets", 3, WORD_Q, "• Paris\n• France\n• Europe", True),
    ("bullets", 2, WORD_Q, "- Paris", False), ("bullets", 2, WORD_Q, "- Paris\n- France\n- Europe", False),
    ("bullets", 2, WORD_Q, "1. Paris\n2. France", False), ("bullets", 2, WORD_Q, "-Paris\n-France", False),
    ("bullets", 2, WORD_Q, "- Paris\n- France\nHope this helps.", False), ("bullets", 2, WORD_Q, "- \n- France", False),
    ("bullets", 2, WORD_Q, "", False),
    ("then_done", None, WORD_Q, "Paris. Done.", True), ("then_done", None, WORD_Q, "Paris done", True),
    ("then_done", None, WORD_Q, "The capital is Paris.\nDONE!", True), ("then_done", None, WORD_Q, "Done.", False),
    ("then_done", None, WORD_Q, "Done. Paris.", False), ("then_done", None, WORD_Q, "Paris is undone", False),
    ("then_done", None, WORD_Q, "Paris. Finished.", False), ("then_done", None, WORD_Q, "", False),
    ("exclaim", None, WORD_Q, "Paris!", True), ("exclaim", None, WORD_Q, "It is Paris!!  ", True),
    ("exclaim", None, WORD_Q, "Paris.", False), ("exclaim", None, WORD_Q, "!", False),
    ("exclaim", None, WORD_Q, "Paris! It is in France.", False), ("exclaim", None, WORD_Q, "", False),
]


@pytest.mark.parametrize("kind, param, q, response, expected", CASES)
def test_checkers_every_kind_every_phrasing_both_orders(kind, param, q, response, expected):
    for i in range(len(ifo.PHRASINGS[kind])):
        for first in (True, False):
            prompt = ifo.make_prompt(ifo.instruction(kind, i, param), q, first)
            assert ifo.kind_of(prompt) == kind and question(prompt) == q
            assert ifo.obeys(prompt, response) is expected, (prompt, response)
            assert ifo.is_preferred(prompt, response) is expected
            assert ifo.format_reward(prompt, response) == float(expected)


def test_every_kind_has_positive_and_negative_cases():
    pos = {c[0] for c in CASES if c[4]}
    neg = {c[0] for c in CASES if not c[4]}
    assert pos == neg == set(ifo.KINDS)


def test_kinds_phrasings_and_groups():
    assert len(ifo.KINDS) >= 10 and len(ifo.HELDOUT_KINDS) >= 2 and ifo.HELDOUT_KINDS < set(ifo.KINDS)
    assert all(len(ifo.PHRASINGS[k]) >= 3 for k in ifo.KINDS)
    assert len(set(ifo.INSTRUCTIONS)) == sum(len(ifo.PHRASINGS[k]) * len(ifo.PARAMS.get(k, (None,))) for k in ifo.KINDS)
    assert ifo.group("Answer in all capital letters. " + WORD_Q) == "heldout_kinds"
    assert ifo.group(WORD_Q + " Answer in one word.") == "seen_kinds"
    assert ifo.group(WORD_Q) == "unknown" and ifo.kind_of(WORD_Q) is None and ifo.kind_of("") is None
    assert ifo.kind_of("Answer in one word.") is None  # an instruction with no question
    # whitespace is normalised; a question without "?" still parses (the general path)
    assert ifo.parse("  Answer in one word.\n " + WORD_Q + "  ") == ("one_word", None, WORD_Q)
    assert ifo.parse("Name a colour. Use no more than 3 words.") == ("max_words", 3, "Name a colour.")


@pytest.mark.parametrize("prompt, response, correct", [
    ("Answer in one word. " + WORD_Q, "Paris", True), ("Answer in one word. " + WORD_Q, "paris.", True),
    ("Answer in one word. " + WORD_Q, "It is PARIS!", True), ("Answer in one word. " + WORD_Q, "Parisian", False),
    ("Answer in one word. " + WORD_Q, "Lyon", False), ("Answer in one word. " + WORD_Q, "", False),
    ("What is the capital of Colombia? Answer in one word.", "Bogotá", True),
    ("What is the capital of Ukraine? Answer in one word.", "Kiev", True),
    ("Answer with a number only. " + NUM_Q, "42", True), ("Answer with a number only. " + NUM_Q, "forty-two", True),
    ("Answer with a number only. " + NUM_Q, "Forty two.", True), ("Answer with a number only. " + NUM_Q, "142", False),
    ("Answer with a number only. " + NUM_Q, "4.2", False), ("Answer with a number only. " + NUM_Q, "43", False),
    ("Answer with a number only. What is 9 times 7?", "sixty-three", True),
    ("Answer with a number only. What is 60 minus 2?", "58", True),
    ("Answer with a number only. How many meters are in a kilometer?", "1,000", True),
    ("Answer with a number only. How many meters are in a kilometer?", "one thousand", True),
    ("Answer with a number only. How many bones does the adult human body have?", "two hundred and six", True),
    ("Answer with a number only. At what temperature in Celsius does water freeze?", "Zero.", True),
    ("Answer yes or no. " + YN_Q, "Yes.", True), ("Answer yes or no. " + YN_Q, "No, yes.", False),
    ("Answer yes or no. Can penguins fly?", "No. Penguins cannot fly.", True),
    ("Answer yes or no. Can penguins fly?", "Nope, not at all", False),
    ("Answer yes or no. Is 7 an odd number?", "yes", True), ("Answer yes or no. Is 7 an even number?", "yes", False),
    ("Answer in one word. What is the capital of Atlantis?", "Paris", False),  # not in the bank
    (WORD_Q, "Paris", True),  # a bare question is looked up too
])
def test_is_correct(prompt, response, correct):
    assert ifo.is_correct(prompt, response) is correct


def test_is_correct_for_every_question_in_the_bank():
    assert len(ifo.BANK) >= 1000 and sum(f.category not in ("add", "sub", "mul", "parity", "compare")
                                         for f in ifo.BANK) >= 300
    n = 0
    for fact in ifo.BANK:
        assert "," not in fact.sentence  # the sentence is a chosen side of no_commas pairs
        for q in fact.questions:
            assert ifo.fact_of(q) is fact
            prompt = ifo.make_prompt("Answer in one word.", q, n % 2 == 0)
            assert ifo.is_correct(prompt, fact.answer) and ifo.is_correct(prompt, fact.sentence), (q, fact)
            assert ifo.is_correct(prompt, fact.sentence.upper())
            if fact.qtype == "number":
                assert ifo.is_correct(prompt, ifo.number_words(int(fact.answer)))
            n += 1


def test_checkers_never_raise():
    rng = random.Random(0)
    alphabet = "aZ09 ,.!?-*•\"'“”\n\t\u00e9\u00df\u0660\u200b\U0001f600ÉDone"
    prompts = [ifo.make_prompt(ifo.instruction(k, 0, ifo.PARAMS.get(k, (None,))[0]), q, True)
               for k in ifo.KINDS for q in (WORD_Q, NUM_Q, YN_Q)] + ["", "?", "Answer in one word.", "\x00"]
    for _ in range(3000):
        response = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        prompt = rng.choice(prompts)
        for fn in (ifo.obeys, ifo.is_correct, ifo.is_preferred):
            assert isinstance(fn(prompt, response), bool)
        assert ifo.format_reward(prompt, response) in (0.0, 1.0)
        assert ifo.group(prompt) in ("seen_kinds", "heldout_kinds", "unknown")
    assert ifo.obeys(None, None) is False and ifo.is_correct(WORD_Q, None) is False  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ shipped files
def test_counts_ids_and_prompt_shape():
    minimum = {"prompts.jsonl": 2000, "eval_prompts.jsonl": 400, "offline_pairs.jsonl": 500, "heldout_pairs.jsonl": 200}
    prefix = {"prompts.jsonl": "if-p", "eval_prompts.jsonl": "if-e", "offline_pairs.jsonl": "if-o",
              "heldout_pairs.jsonl": "if-h"}
    for name, n in minimum.items():
        data = rows(name)
        assert len(data) >= n, name
        keys = {"id", "prompt"} | ({"chosen", "rejected"} if "pairs" in name else set())
        assert all(set(r) == keys for r in data)
        assert len({r["id"] for r in data}) == len(data) and all(r["id"].startswith(prefix[name]) for r in data)
        assert len({r["prompt"] for r in data}) == len(data)
        for r in data:
            assert ifo.kind_of(r["prompt"]) is not None and ifo.fact_of(question(r["prompt"])) is not None
            assert len(r["prompt"].split()) <= 30
        firsts = sum(r["prompt"].endswith(question(r["prompt"])) for r in data)
        assert 0.3 < firsts / len(data) < 0.7, name  # both orders are used
    for name in FILES:
        assert (ASSETS / name).stat().st_size < 400_000


def test_heldout_kinds_only_in_eval_prompts():
    for name in ("prompts.jsonl", "offline_pairs.jsonl", "heldout_pairs.jsonl"):
        assert not {ifo.kind_of(r["prompt"]) for r in rows(name)} & ifo.HELDOUT_KINDS, name
        assert {ifo.kind_of(r["prompt"]) for r in rows(name)} == set(ifo.SEEN_KINDS), name
    kinds = [ifo.kind_of(r["prompt"]) for r in rows("eval_prompts.jsonl")]
    assert set(kinds) == set(ifo.KINDS)
    assert 0.25 <= sum(k in ifo.HELDOUT_KINDS for k in kinds) / len(kinds) <= 0.30


def test_splits_are_disjoint():
    def facts(name):
        return {ifo.fact_of(question(r["prompt"])).key for r in rows(name)}

    def questions(name):
        return {question(r["prompt"]) for r in rows(name)}

    train, evals = facts("prompts.jsonl") | facts("offline_pairs.jsonl"), facts("eval_prompts.jsonl")
    held = facts("heldout_pairs.jsonl")
    assert not train & evals and not held & evals and not held & train
    assert not (questions("prompts.jsonl") | questions("offline_pairs.jsonl")) & questions("eval_prompts.jsonl")
    assert not questions("heldout_pairs.jsonl") & (questions("offline_pairs.jsonl") | questions("eval_prompts.jsonl"))
    assert facts("offline_pairs.jsonl") <= {f.key for f in ifo.BANK}
    offline = {r["prompt"] for r in rows("offline_pairs.jsonl")}
    assert not offline & {r["prompt"] for r in rows("prompts.jsonl")}
    assert not offline & {r["prompt"] for r in rows("heldout_pairs.jsonl")}


@pytest.mark.parametrize("name", ["offline_pairs.jsonl", "heldout_pairs.jsonl"])
def test_pair_sides(name):
    for r in rows(name):
        assert ifo.obeys(r["prompt"], r["chosen"]) and ifo.is_correct(r["prompt"], r["chosen"]), r
        assert not ifo.obeys(r["prompt"], r["rejected"]), r
        assert ifo.is_correct(r["prompt"], r["rejected"]), r  # the pair differs in format, not in facts
        assert r["chosen"] != r["rejected"]


def test_report_matches_files():
    report = json.loads((ASSETS / "build_report.json").read_text())
    for name in ("prompts", "eval_prompts", "offline_pairs", "heldout_pairs"):
        assert report["counts"][name] == len(rows(f"{name}.jsonl"))
    for name in ("offline_pairs", "heldout_pairs"):
        for side in ("chosen", "rejected"):
            assert sum(report["pair_sides"][name][side].values()) == len(rows(f"{name}.jsonl"))
    assert report["heldout_kinds"] == sorted(ifo.HELDOUT_KINDS)


def test_build_reproduces_shipped_files(tmp_path):
    build = load_build_script()
    build.main(tmp_path, seed=0)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
