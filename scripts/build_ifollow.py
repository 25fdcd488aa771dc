"""Builds the verifiable instruction-following task's data (``selfalign.tasks.demos.ifollow``) in
assets/ifollow/: prompts, evaluation prompts, offline and held-out preference pairs, and a build report.

    python scripts/build_ifollow.py [--seed 0] [--out assets/ifollow]

Pure Python, no model: it runs in about a second and rewrites the same bytes for the same seed.
  1. Splits: the bank's fact keys (facts that give each other away share a key), per category, are
     shuffled and cut 65% train / 20% eval / 15% pair-holdout, so the three sets of questions are disjoint.
  2. Prompts: for each kind in turn (so kinds are balanced), a question type the kind fits, a fact of
     that type (groups weighted: of numeric questions 35% facts, 65% sums, differences, products), one of its
     wordings, one of the kind's phrasings and parameters, and the order (instruction first or last).
     prompts.jsonl: training facts, seen kinds. eval_prompts.jsonl: eval facts, seen kinds and
     ``HELDOUT_KINDS`` (about 29%). offline_pairs.jsonl: training facts, seen kinds, prompts not in
     prompts.jsonl. heldout_pairs.jsonl: pair-holdout facts, seen kinds.
  3. Pair sides are written by templates (``sides``): the chosen side is the fact's right answer
     formatted to obey the instruction (e.g. "Paris.", "42", "the capital of france is paris.",
     "- Paris\\n- The capital of France is Paris."); the rejected side is the same right answer in a
     failure typical of a small instruct model: a full sentence, "The answer is ...", the number in
     words, a capitalised word, a comma, the phrase in the wrong place, one bullet too many or too few,
     a numbered list, "Done" first... Among the templates valid for the prompt (chosen: obeys and is
     correct; rejected: does not obey and is correct) one is drawn by the seeded RNG. Both sides are
     correct, so a pair teaches the format, not facts.
  4. Self-check: every chosen side obeys and is correct, every rejected side is correct and does not
     obey, no held-out kind in training prompts or pairs, the splits are disjoint, ids are unique and
     prompts are short; any failure stops the build with an error.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "assets" / "ifollow"


def _load():
    try:
        from selfalign.tasks.demos import ifollow
    except ImportError:  # not installed: load the module from the checkout
        spec = importlib.util.spec_from_file_location("_ifollow", ROOT / "tasks" / "demos" / "ifollow.py")
        ifollow = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = ifollow
        spec.loader.exec_module(ifollow)
    return ifollow


ifo = _load()

SPLITS = (("train", 0.65), ("eval", 0.20), ("pair_holdout", 0.15))
PER_KIND = {"prompts": 220, "eval_seen": 28, "eval_heldout": 64, "offline_pairs": 55, "heldout_pairs": 22}
QTYPE_WEIGHTS = {"word": 0.45, "number": 0.35, "yesno": 0.20}
# Within a question type, fact groups by weight, then a fact uniformly: the few hand-written numeric facts
# are not drowned by the thousands of sums, and products (121 facts) are not drowned by the sums (2,401).
GROUP_WEIGHTS = {"word": {"facts": 1.0}, "number": {"facts": 0.35, "add": 0.25, "sub": 0.2, "mul": 0.2},
                 "yesno": {"facts": 0.6, "numeric": 0.4}}
GROUP_OF = {"add": "add", "sub": "sub", "mul": "mul", "parity": "numeric", "compare": "numeric"}
MAX_PROMPT_WORDS = 30  # about 40 SmolLM2 tokens

TEMPLATES = {  # what each pair-side template writes (names in build_report.json)
    "answer": "the bare answer", "answer_period": "the answer and a period", "digits": "the number in digits",
    "digits_period": "digits and a period", "answer_lower": "the answer in lower case",
    "answer_bang": "the answer and !", "sentence": "a full sentence stating the answer",
    "sentence_lower": "the full sentence in lower case", "sentence_upper": "the full sentence in capitals",
    "the_answer_is": '"The answer is X."', "the_answer_is_lower": '"the answer is x."',
    "the_answer_is_upper": '"THE ANSWER IS X."', "answer_upper": "the answer in capitals",
    "answer_is_the_answer": '"X is the answer."', "it_is": '"It is X."', "in_words": "the number in words",
    "comma_sentence": '"Yes, <sentence>" with a comma', "answer_capitalised": "the answer capitalised",
    "answer_quoted": "the answer in double quotes", "sentence_quoted": "the sentence in double quotes",
    "single_quotes": "the answer in single quotes", "partly_quoted": 'The answer is "X". (quotes not around all)',
    "phrase_answer": "the phrase then the answer", "phrase_answer_sentence": "the phrase, answer and sentence",
    "sure_phrase": '"Sure! " before the phrase', "answer_phrase": "the answer then the phrase",
    "sentence_phrase": "the sentence then the phrase", "phrase_first": "the phrase before the sentence",
    "phrase_then_more": "the phrase, then one more sentence", "long_sentence": '"The answer to your question is X."',
    "sentence_more": "the sentence and one more", "sure_comma": '"Sure, the answer is X."',
    "of_course": '"X, of course."', "bullets": "N dash bullets: the answer, the sentence, a closing line",
    "answer_is_bullets": "N dash bullets starting with \"The answer is X.\"", "one_more_bullet": "N+1 bullets",
    "one_less_bullet": "N-1 bullets", "numbered": "a numbered list instead of bullets",
    "bullets_then_text": "N bullets then a line of plain text", "answer_done": '"X. Done."',
    "sentence_done": '"<sentence> Done."', "answer_finished": '"X. Finished."', "done_first": '"Done. <sentence>"',
    "sentence_bang": "the sentence ending in !", "bang_then_sentence": '"X! <sentence>" (ends with a period)',
}


def sides(kind: str, param, fact) -> tuple[dict[str, str], dict[str, str]]:
    """(chosen, rejected) candidate responses by template name, before filtering with the checkers."""
    a, s, yn = fact.answer, fact.sentence, fact.qtype == "yesno"
    a_in = a.lower() if yn else a  # inside a sentence: "The answer is yes."
    the = f"The answer is {a_in}."
    has_letters = any(c.isalpha() for c in a)
    comma = ""
    if yn:  # "Yes. The sun is a star." -> "Yes, the sun is a star."
        body = s.split(". ", 1)[1]
        first, _, rest = body.partition(" ")
        comma = f"{a}, {first.lower() if first in ('The', 'A', 'An', 'It') else first} {rest}"
    lines = [f"- {a}", f"- {s}", "- I hope this helps.", "- That is all."]
    if kind == "one_word":
        return ({"answer": a, "answer_period": a + "."},
                {"sentence": s, "the_answer_is": the, "answer_is_the_answer": f"{a} is the answer.",
                 "it_is": f"It is {a}."})
    if kind == "number_only":
        words = ifo.number_words(int(a))
        return ({"digits": a, "digits_period": a + "."},
                {"sentence": s, "the_answer_is": the, "in_words": words[0].upper() + words[1:] + ".",
                 "answer_is_the_answer": f"{a} is the answer."})
    if kind == "yes_no":
        return ({"answer_period": a + ".", "answer": a, "answer_lower": a.lower(), "answer_bang": a + "!"},
                {"comma_sentence": comma, "sentence": s, "the_answer_is": the})
    if kind in ("lowercase", "uppercase"):
        case = str.lower if kind == "lowercase" else str.upper
        rejected = {"sentence": s, "the_answer_is": the}
        if has_letters:
            rejected["answer_capitalised"] = a[0].upper() + a[1:] + "."
        return ({f"sentence_{kind[:-4]}": case(s), f"the_answer_is_{kind[:-4]}": case(the),
                 f"answer_{kind[:-4]}": case(a) + "."}, rejected)
    if kind == "quoted":
        return ({"answer_quoted": f'"{a}"', "sentence_quoted": f'"{s}"'},
                {"answer_period": a + ".", "sentence": s, "single_quotes": f"'{a}'",
                 "partly_quoted": f'The answer is "{a_in}".'})
    if kind == "starts_with":
        return ({"phrase_answer": f"{param} {a_in}.", "phrase_answer_sentence": f"{param} {a_in}. {s}"},
                {"sentence": s, "answer_period": a + ".", "sure_phrase": f"Sure! {param} {a_in}."})
    if kind == "ends_with":
        return ({"answer_phrase": f"{a}. {param}.", "sentence_phrase": f"{s} {param}."},
                {"sentence": s, "phrase_first": f"{param}. {s}",
                 "phrase_then_more": f"{s} {param}. Let me know if you have more questions."})
    if kind == "max_words":
        return ({"answer_period": a + ".", "it_is": f"It is {a_in}.", "the_answer_is": the, "sentence": s},
                {"long_sentence": f"The answer to your question is {a_in}.",
                 "sentence_more": f"{s} I hope this helps you."})
    if kind == "no_commas":
        rejected = {"sure_comma": f"Sure, the answer is {a_in}.", "of_course": f"{a}, of course."}
        if yn:
            rejected["comma_sentence"] = comma
        return {"sentence": s, "the_answer_is": the, "answer_period": a + "."}, rejected
    if kind == "bullets":
        n = param
        alt = [f"- The answer is {a_in}.", f"- {s}", "- That is all."]
        numbered = [f"{i + 1}. {x[2:]}" for i, x in enumerate(lines[:n])]
        return ({"bullets": "\n".join(lines[:n]), "answer_is_bullets": "\n".join(alt[:n])},
                {"one_more_bullet": "\n".join(lines[:n + 1]), "one_less_bullet": "\n".join(lines[:n - 1]),
                 "sentence": s, "numbered": "\n".join(numbered),
                 "bullets_then_text": "\n".join(lines[:n]) + "\nLet me know if you need more."})
    if kind == "then_done":
        return ({"answer_done": f"{a}. Done.", "sentence_done": f"{s} Done."},
                {"sentence": s, "answer_finished": f"{a}. Finished.", "done_first": f"Done. {s}"})
    if kind == "exclaim":
        return ({"answer_bang": a + "!", "sentence_bang": s[:-1] + "!"},
                {"sentence": s, "answer_period": a + ".", "bang_then_sentence": f"{a}! {s}"})
    raise ValueError(f"no templates for kind {kind!r}")


def split_facts(rng: random.Random) -> dict[str, str]:
    """Fact key -> split, stratified by each key's first category so every category is in every split."""
    by_cat: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for fact in ifo.BANK:
        if fact.key not in seen:
            seen.add(fact.key)
            by_cat[fact.category].append(fact.key)
    out: dict[str, str] = {}
    for cat in sorted(by_cat):
        keys = sorted(by_cat[cat])
        rng.shuffle(keys)
        cut1 = round(len(keys) * SPLITS[0][1])
        cut2 = cut1 + round(len(keys) * SPLITS[1][1])
        for i, key in enumerate(keys):
            out[key] = SPLITS[0][0] if i < cut1 else SPLITS[1][0] if i < cut2 else SPLITS[2][0]
    return out


class Sampler:
    def __init__(self, rng: random.Random, split_of: dict[str, str]):
        self.rng = rng
        self.pools: dict[tuple[str, str, str], list] = defaultdict(list)
        for fact in ifo.BANK:
            self.pools[split_of[fact.key], fact.qtype, GROUP_OF.get(fact.category, "facts")].append(fact)

    def prompt(self, split: str, kind: str, used: set[str]) -> tuple[str, object, object]:
        """A new prompt (not in `used`) of this kind on a fact of this split: (prompt, param, fact)."""
        rng = self.rng
        for _ in range(1000):
            qtypes = sorted(ifo.QTYPES_OF[kind])
            qtype = rng.choices(qtypes, weights=[QTYPE_WEIGHTS[q] for q in qtypes])[0]
            groups = sorted(GROUP_WEIGHTS[qtype])
            grp = rng.choices(groups, weights=[GROUP_WEIGHTS[qtype][g] for g in groups])[0]
            fact = rng.choice(self.pools[split, qtype, grp])
            question = rng.choice(fact.questions)
            param = rng.choice(ifo.PARAMS[kind]) if kind in ifo.PARAMS else None
            instr = ifo.instruction(kind, rng.randrange(len(ifo.PHRASINGS[kind])), param)
            prompt = ifo.make_prompt(instr, question, instruction_first=rng.random() < 0.5)
            if prompt not in used:
                used.add(prompt)
                return prompt, param, fact
        raise RuntimeError(f"could not draw a new {kind} prompt on {split} facts")


def _rows_for(sampler, split, kinds, per_kind, used, prefix, pairs, how):
    rows = []
    for _ in range(per_kind):
        for kind in kinds:
            prompt, param, fact = sampler.prompt(split, kind, used)
            row = {"prompt": prompt}
            if pairs:
                chosen, rejected = sides(kind, param, fact)
                ok_c = [n for n, r in chosen.items() if ifo.obeys(prompt, r) and ifo.is_correct(prompt, r)]
                ok_r = [n for n, r in rejected.items() if not ifo.obeys(prompt, r) and ifo.is_correct(prompt, r)]
                if not ok_c or not ok_r:
                    raise RuntimeError(f"no valid pair side for {prompt!r}: chosen {ok_c}, rejected {ok_r}")
                c, r = sampler.rng.choice(ok_c), sampler.rng.choice(ok_r)
                row |= {"chosen": chosen[c], "rejected": rejected[r]}
                how["chosen"][c] += 1
                how["rejected"][r] += 1
            rows.append(row)
    sampler.rng.shuffle(rows)
    return [{"id": f"{prefix}{i + 1:05d}", **row} for i, row in enumerate(rows)]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"build_ifollow self-check failed: {msg}")


def build(seed: int = 0) -> tuple[dict[str, list[dict]], dict]:
    """All files' rows and the report, checked."""
    rng = random.Random(seed)
    split_of = split_facts(rng)
    sampler = Sampler(rng, split_of)
    seen, held = list(ifo.SEEN_KINDS), sorted(ifo.HELDOUT_KINDS)
    hows = {name: {"chosen": Counter(), "rejected": Counter()} for name in ("offline_pairs", "heldout_pairs")}
    train_used: set[str] = set()
    files = {"prompts": _rows_for(sampler, "train", seen, PER_KIND["prompts"], train_used, "if-p", False, None)}
    eval_used: set[str] = set()
    evals = (_rows_for(sampler, "eval", seen, PER_KIND["eval_seen"], eval_used, "if-e", False, None)
             + _rows_for(sampler, "eval", held, PER_KIND["eval_heldout"], eval_used, "if-e", False, None))
    rng.shuffle(evals)
    files["eval_prompts"] = [dict(r, id=f"if-e{i + 1:05d}") for i, r in enumerate(evals)]
    files["offline_pairs"] = _rows_for(sampler, "train", seen, PER_KIND["offline_pairs"], train_used, "if-o", True,
                                       hows["offline_pairs"])
    files["heldout_pairs"] = _rows_for(sampler, "pair_holdout", seen, PER_KIND["heldout_pairs"], set(), "if-h", True,
                                       hows["heldout_pairs"])
    # ---- self-check
    facts = {name: {ifo.fact_of(ifo.parse(r["prompt"])[2]).key for r in rows} for name, rows in files.items()}
    _check(not facts["eval_prompts"] & (facts["prompts"] | facts["offline_pairs"] | facts["heldout_pairs"]),
           "eval facts overlap training or pair facts")
    _check(not facts["heldout_pairs"] & (facts["prompts"] | facts["offline_pairs"]),
           "held-out pair facts seen in training")
    _check(not {r["prompt"] for r in files["offline_pairs"]} & {r["prompt"] for r in files["prompts"]},
           "offline pair prompts repeat training prompts")
    for name, rows in files.items():
        _check(len({r["id"] for r in rows}) == len(rows) and len({r["prompt"] for r in rows}) == len(rows),
               f"{name}: duplicate ids or prompts")
        for r in rows:
            kind = ifo.kind_of(r["prompt"])
            _check(kind is not None and ifo.fact_of(ifo.parse(r["prompt"])[2]) is not None,
                   f"unparsed {r['prompt']!r}")
            _check(name == "eval_prompts" or kind not in ifo.HELDOUT_KINDS, f"{name}: held-out kind in {r['prompt']!r}")
            _check(len(r["prompt"].split()) <= MAX_PROMPT_WORDS, f"long prompt {r['prompt']!r}")
            if "chosen" in r:
                _check(ifo.obeys(r["prompt"], r["chosen"]) and ifo.is_correct(r["prompt"], r["chosen"]), f"chosen {r}")
                _check(not ifo.obeys(r["prompt"], r["rejected"]) and ifo.is_correct(r["prompt"], r["rejected"]),
                       f"rejected {r}")
    n_held = sum(ifo.kind_of(r["prompt"]) in ifo.HELDOUT_KINDS for r in files["eval_prompts"])
    _check(0.25 <= n_held / len(files["eval_prompts"]) <= 0.30, "held-out kinds share of eval prompts")
    report = {
        "seed": seed,
        "task": "selfalign.tasks.demos.ifollow",
        "splits": {name: frac for name, frac in SPLITS},
        "split_fact_keys": dict(sorted(Counter(split_of.values()).items())),
        "counts": {name: len(rows) for name, rows in files.items()},
        "heldout_kinds": held,
        "heldout_share_of_eval": round(n_held / len(files["eval_prompts"]), 4),
        "kinds": {name: dict(sorted(Counter(ifo.kind_of(r["prompt"]) for r in rows).items()))
                  for name, rows in files.items()},
        "question_types": {name: dict(sorted(Counter(ifo.fact_of(ifo.parse(r["prompt"])[2]).qtype
                                                     for r in rows).items())) for name, rows in files.items()},
        "categories": {name: dict(sorted(Counter(ifo.fact_of(ifo.parse(r["prompt"])[2]).category
                                                 for r in rows).items())) for name, rows in files.items()},
        "instruction_first": {name: sum(r["prompt"].endswith(ifo.parse(r["prompt"])[2]) for r in rows)
                              for name, rows in files.items()},
        "max_prompt_words": max(len(r["prompt"].split()) for rows in files.values() for r in rows),
        "pair_sides": {
            "how": "templates (scripts/build_ifollow.py: sides): chosen = the right answer formatted to obey; "
                   "rejected = the same right answer in a typical failure; among the templates valid for the "
                   "prompt one is drawn by the seeded RNG. Every chosen obeys and is correct; every rejected "
                   "is correct and does not obey.",
            **{name: {side: dict(sorted(c.items())) for side, c in how.items()} for name, how in hows.items()},
            "templates": TEMPLATES,
        },
    }
    return files, report


def main(out: Path = DEFAULT_OUT, seed: int = 0) -> dict:
    files, report = build(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    rep = main(args.out, args.seed)
    print(json.dumps(rep["counts"]), f"held-out share of eval {rep['heldout_share_of_eval']}")
