"""MRPO and HPO wiring: additional references scored on their own tokenisation of the same text (score
stage, and training worker for replay pairs), auxiliary rewards and the value head, config keys."""
import math
from pathlib import Path

import pytest
import torch

from selfalign.flows.config import ConfigError, load_config
from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
from selfalign.tasks.lm_logps import collate, load_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "deploy" / "presets" / "demo.yaml"
HOOKS = "selfalign.tasks.toy:checker_reward,selfalign.tasks.toy:readability_reward"


def _llama(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


def _other_tokenizer():
    """A character tokenizer with another vocabulary order and another chat template than the demo's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from selfalign.tasks import toy

    specials = ["[PAD]", "[UNK]", "[EOS]"]
    vocab = {t: i for i, t in enumerate(specials + toy.CHARACTERS[::-1])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    return tok


@pytest.fixture(scope="module")
def other_reference(tmp_path_factory) -> str:
    """A random model with a tokenizer of its own (vocabulary and chat template differ)."""
    tok = _other_tokenizer()
    out = tmp_path_factory.mktemp("other") / "model"
    _llama(len(tok), seed=1).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_reference_with_another_tokenizer_scores_the_same_text_retokenised(tiny_model, other_reference, naive_logp):
    from selfalign.tasks.lm_logps import reference_logps, same_tokenizer

    tok = load_tokenizer(tiny_model)
    other = load_tokenizer(other_reference)
    assert same_tokenizer(tok, load_tokenizer(tiny_model)) and not same_tokenizer(tok, other)
    texts = [("What is 12 + 34?", "46"), ("What is 99 + 1?", "The sum of 99 and 1 is 100. Happy to help!")]
    items = [(p, r, encode_prompt(tok, p), encode_response(tok, r)) for p, r in texts]
    got = reference_logps(other_reference, "", tok, items)
    ref_model = load_model(other_reference, device="cpu")
    want = [naive_logp(ref_model, encode_prompt(other, p), encode_response(other, r)) for p, r in texts]
    assert got == pytest.approx(want, abs=1e-4)
    assert encode_prompt(other, texts[0][0]) != items[0][2]  # really another tokenisation
    # same tokenizer: the policy's own ids are scored, whatever the text says (generated ids are kept)
    odd = [(p, "ignored text", pids, rids) for p, _, pids, rids in items]
    same = reference_logps(tiny_model, "", tok, odd)
    policy = load_model(tiny_model, device="cpu")
    assert same == pytest.approx([naive_logp(policy, pids, rids) for _, _, pids, rids in items], abs=1e-4)


def test_score_stage_stores_mrpo_reference_logps(tiny_model, other_reference, tmp_path):
    from selfalign.flows.config import load_config
    from selfalign.tasks import artifacts
    from selfalign.tasks.lm_logps import reference_logps
    from selfalign.tasks.score import run_score

    tok = load_tokenizer(tiny_model)
    rows = []
    for k, (resp, finish) in enumerate([("46", "stop"), ("12+34=46", "stop"), ("4", "length")]):
        rows.append({"prompt_id": "a", "prompt": "What is 12 + 34?", "k": k, "response": resp,
                     "response_ids": encode_response(tok, resp)[: -1 if finish == "length" else None],
                     "finish_reason": finish, "n_tokens": len(resp) + 1})
    samples = artifacts.write_table(tmp_path / "samples.parquet", rows)
    cfg = load_config(None, {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
                             "data.eval_prompts": "e", "data.offline_pairs": "o", "train.loss": "mrpo",
                             "train.mrpo.references": f"{tiny_model}, {other_reference}"})
    run_score(cfg.score, cfg.model, samples, tiny_model, tiny_model, [], tmp_path / "scores.parquet", log=lambda m: None,
              references=cfg.train.extra_references())
    out = artifacts.read_table(tmp_path / "scores.parquet")
    items = [(r["prompt"], r["response"], encode_prompt(tok, r["prompt"]), r["response_ids"]) for r in rows[:2]]
    other = reference_logps(other_reference, "", tok, items)
    for j, s in enumerate(out[:2]):
        # the first additional reference is the policy's own model: its log-prob is policy_logp
        assert s["mrpo_ref_logps"][0] == pytest.approx(s["policy_logp"], abs=1e-5)
        assert s["mrpo_ref_logps"][1] == pytest.approx(other[j], abs=1e-5)
    assert all(math.isnan(v) for v in out[2]["mrpo_ref_logps"])
    # other losses: no extra column, no extra work
    cfg_dpo = load_config(None, {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
                                 "data.eval_prompts": "e", "data.offline_pairs": "o"})
    run_score(cfg_dpo.score, cfg_dpo.model, samples, tiny_model, tiny_model, [], tmp_path / "scores2.parquet",
              log=lambda m: None, references=cfg_dpo.train.extra_references())
    assert "mrpo_ref_logps" not in artifacts.read_table(tmp_path / "scores2.parquet")[0]


# ------------------------------------------------------------------------------ training worker
def _pair_rows(tok, n=3):
    rows = [{"prompt_id": f"o{i}", "prompt": f"What is {10 + i} + 20?",
             "chosen": f"{10 + i} plus 20 is {30 + i}. Happy to help!", "rejected": f"{30 + i}",
             "ref_chosen_logp": math.nan, "ref_rejected_logp": math.nan} for i in range(n)]
    for r in rows:
        r["prompt_ids"] = encode_prompt(tok, r["prompt"])
        r["chosen_ids"], r["rejected_ids"] = encode_response(tok, r["chosen"]), encode_response(tok, r["rejected"])
    return rows


def test_worker_fills_mrpo_references_of_replay_pairs_only(tiny_model, other_reference):
    from selfalign.tasks.lm_logps import reference_logps
    from selfalign.tasks.train_refs import fill_mrpo_reference_logps

    tok = load_tokenizer(tiny_model)
    rows = _pair_rows(tok)
    rows[1]["mrpo_ref_chosen_logps"], rows[1]["mrpo_ref_rejected_logps"] = [-1.0, -2.0], [-3.0, -4.0]  # generated
    spec = {"mrpo": {"references": [[tiny_model, ""], [other_reference, ""]]}, "dtype": "float32",
            "trust_remote_code": False, "batch_tokens": 4096}
    fill_mrpo_reference_logps(rows, spec, tok, rank=0, world=1, device="cpu")
    assert rows[1]["mrpo_ref_chosen_logps"] == [-1.0, -2.0] and rows[1]["mrpo_ref_rejected_logps"] == [-3.0, -4.0]
    r = rows[0]
    items = [(r["prompt"], r["chosen"], r["prompt_ids"], r["chosen_ids"]), (r["prompt"], r["rejected"], r["prompt_ids"], r["rejected_ids"])]
    for k, path in enumerate([tiny_model, other_reference]):
        want = reference_logps(path, "", tok, items)
        assert [r["mrpo_ref_chosen_logps"][k], r["mrpo_ref_rejected_logps"][k]] == pytest.approx(want, abs=1e-5)


def test_worker_evaluates_weighted_aux_rewards_on_chosen_and_rejected(tiny_model):
    from selfalign.tasks import toy
    from selfalign.tasks.train_refs import fill_aux_rewards

    rows = _pair_rows(load_tokenizer(tiny_model))
    spec = {"hpo": {"rewards": [["selfalign.tasks.toy:checker_reward", 1.0], ["selfalign.tasks.toy:readability_reward", 0.5]]}}
    fill_aux_rewards(rows, spec, rank=0, world=1)
    for r in rows:
        for side in ("chosen", "rejected"):
            want = toy.checker_reward(r["prompt"], r[side]) + 0.5 * toy.readability_reward(r["prompt"], r[side])
            assert r[f"aux_{side}"] == pytest.approx(want)
    assert rows[0]["aux_chosen"] != rows[0]["aux_rejected"]


def test_value_head_reads_the_prompts_last_hidden_state_and_trains_alone(tiny_model):
    from selfalign.tasks.train_worker import Objective, Policy, value_head

    tok = load_tokenizer(tiny_model)
    lm = load_model(tiny_model, device="cpu")
    rows = _pair_rows(tok, 2)
    policy = Policy(lm, fused=True)
    seqs = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    ids, attn, labels = collate(seqs, tok.pad_token_id, "cpu")
    at = torch.tensor([len(r["prompt_ids"]) - 1 for r in rows])
    sums, counts, feats = policy(ids, attn, labels, at)
    # the features are the final hidden states at the prompt's last token, detached from the policy
    with torch.no_grad():
        h = lm.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
    torch.testing.assert_close(feats, h[torch.arange(2), at])
    assert not feats.requires_grad
    head = value_head(feats.shape[1], "cpu")
    values = head(feats).squeeze(-1)
    assert values.tolist() == [0.0, 0.0]  # zero-initialised: the first advantages are the rewards
    Objective({"loss": "hpo", "hpo": {"tau": 0.7}}, world=1).value_loss(values, torch.tensor([1.0, 0.5]),
                                                                  torch.tensor([0.0, 0.25])).backward()
    assert head.weight.grad.abs().sum() > 0 and all(p.grad is None for p in lm.parameters())
    # the same sums as the logits path, with or without features
    torch.testing.assert_close(sums, Policy(lm, fused=False)(ids, attn, labels)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(policy(ids, attn, labels)[0], sums)


# ----------------------------------------------------------------------------------------- config
def test_demo_resolves_with_mrpo_and_hpo_overrides():
    cfg = load_config(DEMO, ["--train.loss=mrpo", "--train.mrpo.references=assets/demo/sft"])
    assert cfg.train.mrpo.reference_list() == [("assets/demo/sft", "")]
    cfg = load_config(DEMO, ["--train.loss=mrpo", "--train.mrpo.references=a, b", "--train.mrpo.tokenizers=,tb"])
    assert cfg.train.mrpo.reference_list() == [("a", ""), ("b", "tb")]
    cfg = load_config(DEMO, ["--train.loss=hpo", f"--train.hpo.rewards={HOOKS}", "--train.hpo.reward_weights=1,0.5"])
    assert cfg.train.hpo.reward_list() == [("selfalign.tasks.toy:checker_reward", 1.0),
                                           ("selfalign.tasks.toy:readability_reward", 0.5)]
    # a group's values are checked whichever loss is selected
    with pytest.raises(ConfigError, match=r"train\.hpo\.tau: 5\.0 must be in \(0, 1\)"):
        load_config(DEMO, ["--train.hpo.tau=5"])


@pytest.mark.parametrize("overrides, needle", [
    (["--train.loss=mrpo"], "train.mrpo.references: []"),
    (["--train.loss=mrpo", "--train.mrpo.references=a,b", "--train.mrpo.tokenizers=t"], "train.mrpo.tokenizers: ['t']"),
    (["--train.loss=mrpo", "--train.mrpo.references=a", "--train.mrpo.convention=other"], "train.mrpo.convention: 'other'"),
    (["--train.loss=mrpo", "--train.mrpo.references=a", "--train.mrpo.alpha=1.5"], "train.mrpo.alpha: 1.5"),
    (["--train.loss=hpo"], "train.hpo.rewards: []"),
    (["--train.loss=hpo", "--train.hpo.rewards=nocolon"], "train.hpo.rewards: 'nocolon'"),
    (["--train.loss=hpo", "--train.hpo.rewards=selfalign.tasks.toy:nope"], "train.hpo.rewards: cannot load 'selfalign.tasks.toy:nope'"),
    (["--train.loss=hpo", f"--train.hpo.rewards={HOOKS}", "--train.hpo.reward_weights=1,2,3"], "train.hpo.reward_weights: [1.0, 2.0, 3.0]"),
    (["--train.loss=hpo", f"--train.hpo.rewards={HOOKS}", "--train.hpo.reward_weights=1,x"], "train.hpo.reward_weights: '1,x'"),
    (["--train.loss=hpo", f"--train.hpo.rewards={HOOKS}", "--train.hpo.tau=1.5"], "train.hpo.tau: 1.5"),
    (["--train.loss=hpo", f"--train.hpo.rewards={HOOKS}", "--train.hpo.nll=median"], "train.hpo.nll: 'median'"),
    (["--train.loss=hpo", f"--train.hpo.rewards={HOOKS}", "--train.hpo.preference=ipo"], "train.hpo.preference: 'ipo'"),
    (["--train.loss=hpo", f"--train.hpo.rewards={HOOKS}", "--train.hpo.eta=0"], "train.hpo.eta: 0.0"),
])
def test_mrpo_and_hpo_keys_are_validated_with_key_and_value(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, overrides)
    assert needle in str(e.value)


def test_worker_takes_mrpo_references_of_replay_pairs_from_the_cache(tiny_model, other_reference, tmp_path, monkeypatch):
    from selfalign.tasks import train_refs

    tok = load_tokenizer(tiny_model)
    spec = {"mrpo": {"references": [[tiny_model, ""], [other_reference, ""]]}, "dtype": "float32",
            "trust_remote_code": False, "batch_tokens": 4096, "ref_cache": str(tmp_path / "cache")}
    first = _pair_rows(tok)
    train_refs.fill_mrpo_reference_logps(first, spec, tok, rank=0, world=1, device="cpu")
    assert len(list((tmp_path / "cache").glob("*.jsonl"))) == 2  # one file per reference model

    def no_forward(*a, **kw):
        raise AssertionError("a reference forward despite the cache")

    monkeypatch.setattr(train_refs, "reference_logps", no_forward)
    again = _pair_rows(tok)
    train_refs.fill_mrpo_reference_logps(again, spec, tok, rank=0, world=1, device="cpu")
    for a, b in zip(first, again):
        assert b["mrpo_ref_chosen_logps"] == a["mrpo_ref_chosen_logps"]
        assert b["mrpo_ref_rejected_logps"] == a["mrpo_ref_rejected_logps"]
