"""The demo task: style grammars, checkers, the validity hook, the tokenizer, and the shipped assets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfalign.tasks import toy
from selfalign.tasks.data import encode_prompt, encode_response

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
PROMPT = "What is 47 + 38?"


def test_prompt_round_trip():
    assert toy.parse_prompt(toy.make_prompt(47, 38)) == (47, 38)
    assert toy.parse_prompt(PROMPT) == (47, 38)
    for bad in ["What is 7 + 38?", "What is 47+38?", "what is 47 + 38?", "What is 47 + 38"]:
        with pytest.raises(ValueError, match="not a toy addition prompt"):
            toy.parse_prompt(bad)


@pytest.mark.parametrize("style", sorted(toy.STYLES))
def test_every_rendered_style_parses_as_itself(style):
    for a, b in [(47, 38), (10, 10), (99, 99), (50, 50)]:
        text = toy.render(style, a, b)
        prompt = toy.make_prompt(a, b)
        assert toy.style_of(text) == style
        assert toy.stated_result(text) == a + b
        assert toy.is_valid(prompt, text)
        assert toy.is_correct(prompt, text)
        assert toy.is_preferred(prompt, text) == (style == toy.PREFERRED_STYLE)


def test_examples_of_each_style():
    assert toy.style_of("47 plus 38 is 85. Happy to help!") == "polite"
    assert toy.style_of("47 plus 38 is 85") == "plain"
    assert toy.style_of("47 plus 38 is 85. Obviously.") == "curt"
    assert toy.style_of("47 plus 38 is 85 i guess?? um not sure lol") == "rambling"


def test_styles_share_the_core_prefix():
    # DPO gradients of identical prefixes cancel between chosen and rejected (see the module doc)
    core = "47 plus 38 is 85"
    assert all(toy.render(s, 47, 38).startswith(core) for s in toy.STYLES)


def test_rambling_is_the_longest_and_polite_longer_than_short_styles():
    lengths = {s: len(toy.render(s, 47, 38)) for s in toy.STYLES}
    assert max(lengths, key=lengths.get) == "rambling"
    assert lengths["polite"] > lengths["curt"] > lengths["plain"]
    assert max(len(toy.render(s, 99, 99)) for s in toy.STYLES) + 1 <= 48  # + EOS fits max_tokens 48


@pytest.mark.parametrize("near_miss", [
    "thesum is 828, thanks!",                    # the reward-gaming variant seen in earlier runs
    "47 plus 38 is 85.Happy to help!",           # missing space
    "47 plus 38 is 85. Happy to help!!",         # extra character
    "47 plus 38 is 85. Happy to help! ",         # trailing space
    "47 plus 38 is 85. happy to help!",          # case
    "47 plus 38 is 85. Happy to help",           # truncated
    "47 plus 38 is 85 Happy to help!",
    "47 plus 38 is 085. Happy to help!",         # leading zero
    "47 plus 83 is 85. Happy to help!",          # operands not the prompt's
    "38 plus 47 is 85. Happy to help!",          # operands swapped
    "47 plus 38 is 85. Happy to help!47 plus 38 is 85. Happy to help!",
    "47 plus 38 is 85. Obviously. Happy to help!",  # two endings spliced
    "47 plus 38 is 85. Happy to help! i guess?? um not sure lol",
    "47+38=85",
    "47 + 38 = 85",
    "47 plus 38 is 85 is 85",
    "47 plus 38 is85",
    "47 plus 38 is 85. Obviously",
    "47 plus 38 is 85 i guess? um not sure lol",
    "Sure! 47 plus 38 is 85. Happy to help!",
    "85",
    "",
    " 47 plus 38 is 85",
])
def test_near_misses_are_invalid(near_miss):
    assert not toy.is_valid(PROMPT, near_miss)
    assert not toy.is_preferred(PROMPT, near_miss)
    assert toy.checker_reward(PROMPT, near_miss) == 0.0


def test_correctness_is_independent_of_style():
    for style in toy.STYLES:
        right, wrong = toy.render(style, 47, 38), toy.render(style, 47, 38, n=84)
        assert toy.is_correct(PROMPT, right) and not toy.is_correct(PROMPT, wrong)
        assert toy.is_valid(PROMPT, wrong)  # a wrong sum is still a well-formed sample
    # malformed text states nothing checkable; a foreign prompt has no sum
    assert not toy.is_correct(PROMPT, "thesum is 85, thanks!")
    assert not toy.is_correct("What is the capital of France?", "47 plus 38 is 85")
    assert not toy.is_valid("What is the capital of France?", "47 plus 38 is 85")
    # correctness ignores operand copies; validity does not
    assert toy.is_correct(PROMPT, "46 plus 38 is 85") and not toy.is_valid(PROMPT, "46 plus 38 is 85")


def test_checker_reward_orders_preference_then_correctness():
    r = lambda s, n=None: toy.checker_reward(PROMPT, toy.render(s, 47, 38, n))  # noqa: E731
    assert r("polite") == 1.0
    assert r("polite", 84) == 0.5
    assert r("plain") == r("curt") == r("rambling") == 0.25
    assert r("plain", 84) == 0.0


def test_readability_reward_range_and_order():
    scores = {s: toy.readability_reward(PROMPT, toy.render(s, 47, 38)) for s in toy.STYLES}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert scores["polite"] == max(scores.values())
    assert scores["rambling"] < scores["polite"]
    assert toy.readability_reward(PROMPT, "") == 0.0
    assert toy.readability_reward(PROMPT, "x" * 500) == 0.0


@pytest.fixture(scope="module")
def tok():
    return toy.build_tokenizer()


def test_tokenizer_round_trip_one_token_per_character(tok):
    texts = [toy.render(s, a, b) for s in toy.STYLES for a, b in [(47, 38), (99, 99)]]
    texts += [PROMPT, "thesum is 828, thanks!", "  two  spaces ?? and a\nnewline\t!", "<>[]{}|~`^_"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)
        assert tok.decode(ids) == text
    assert tok.decode(tok("é", add_special_tokens=False)["input_ids"]) == "<unk>"


def test_chat_template_and_data_encoding(tok):
    ids = encode_prompt(tok, PROMPT)
    assert tok.decode(ids) == "<|user|>" + PROMPT + "<|end|><|assistant|>"
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert len(ids) == len(PROMPT) + 3  # the chat markers are single tokens
    resp = encode_response(tok, "47 plus 38 is 85")
    assert resp[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    assert tok.decode(resp, skip_special_tokens=True) == "47 plus 38 is 85"
    assert tok.bos_token is None  # nothing is prepended implicitly
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "85"}],
                                   tokenize=False)
    assert text == "<|user|>" + PROMPT + "<|end|><|assistant|>85<|end|>"
    with pytest.raises(Exception, match="only user and assistant"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_tokenizer_survives_save_and_auto_load(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert encode_prompt(loaded, PROMPT) == encode_prompt(tok, PROMPT)
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id
    text = toy.render("rambling", 47, 38)
    assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text


def _rows(name):
    return [json.loads(line) for line in (DEMO / name).read_text().splitlines()]


def test_demo_assets_exist_and_are_consistent():
    for sub in ("sft", "dpo"):
        for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json"):
            assert (DEMO / sub / f).is_file(), f"{sub}/{f} missing"
    prompts, evals = _rows("prompts.jsonl"), _rows("eval_prompts.jsonl")
    train_set, eval_set = {r["prompt"] for r in prompts}, {r["prompt"] for r in evals}
    assert not train_set & eval_set
    assert len({r["id"] for r in prompts}) == len(prompts)
    offline, heldout = _rows("offline_pairs.jsonl"), _rows("heldout_pairs.jsonl")
    assert {r["prompt"] for r in offline} <= train_set
    assert {r["prompt"] for r in heldout} <= eval_set
    for row in offline + heldout:
        assert set(row) == {"id", "prompt", "chosen", "rejected"}
        assert toy.checker_reward(row["prompt"], row["chosen"]) == 1.0  # polite and correct
        # a correct answer in another style: the pair differs only in its ending
        assert toy.is_valid(row["prompt"], row["rejected"]) and toy.is_correct(row["prompt"], row["rejected"])
        assert not toy.is_preferred(row["prompt"], row["rejected"])
    report = json.loads((DEMO / "build_report.json").read_text())
    assert report["dpo"]["heldout_pair_accuracy"] >= 0.8


def test_demo_dpo_model_loads_and_generates_the_template():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO / "dpo")
    model = AutoModelForCausalLM.from_pretrained(DEMO / "dpo").eval()
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = torch.tensor([encode_prompt(tok, PROMPT)])
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=64)
    new = out[0, ids.shape[1]:].tolist()
    assert tok.eos_token_id in new  # greedy output ends its turn
    assert toy.is_valid(PROMPT, tok.decode(new, skip_special_tokens=True))
