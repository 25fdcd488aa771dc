import math

import pytest
import torch

from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
from selfalign.tasks.lm_logps import collate, load_model, logps_of, token_budget_batches
from selfalign.tasks.score import pair_accuracy


def test_batched_scores_equal_one_sequence_at_a_time(tiny_model, naive_logp):
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, device="cpu")
    texts = [("What is 12 + 34?", "46"), ("What is 99 + 1?", "The sum of 99 and 1 is 100. Happy to help!"),
             ("What is 5 + 5?", "um ok 10"), ("What is 12 + 34?", "12+34=46")]
    seqs = [(encode_prompt(tok, p), encode_response(tok, r)) for p, r in texts]
    want = [naive_logp(model, p, r) for p, r in seqs]
    for budget in (32, 10_000):  # one sequence per batch vs everything padded together
        got = logps_of(model, seqs, tok.pad_token_id, batch_tokens=budget)
        assert got == pytest.approx(want, abs=1e-4)
    assert all(w < 0 for w in want)


def test_response_includes_eos_and_prompt_is_masked(tiny_model):
    tok = load_tokenizer(tiny_model)
    r = encode_response(tok, "46")
    assert r[-1] == tok.eos_token_id and len(r) == 3
    p = encode_prompt(tok, "What is 12 + 34?")
    ids, attn, labels = collate([(p, r)], tok.pad_token_id, "cpu")
    labelled = labels[0][labels[0] != -100].tolist()
    assert labelled == r  # every response token including EOS, no prompt token
    assert attn.sum().item() == len(p) + len(r)


def test_token_budget_batches_cover_everything_once_and_respect_budget():
    lengths = [5, 50, 7, 49, 3, 20, 20, 1]
    batches = token_budget_batches(lengths, 60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 60


def test_pair_accuracy():
    assert pair_accuracy([1.0, 2.0, -1.0], [0.0, 3.0, -2.0]) == pytest.approx(2 / 3)
    assert math.isnan(pair_accuracy([], []))


# ----------------------------------------------------------------- fused LM head and MRPO references
def _llama(vocab: int, tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie))


@pytest.mark.parametrize("tie", [False, True])
def test_fused_head_equals_the_logits_path_values_and_gradients(tie, monkeypatch):
    from selfalign.tasks import lm_logps
    from selfalign.tasks.lm_logps import forward_logps, fused_head_ok

    model = _llama(61, tie)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    assert fused_head_ok(model)
    seqs = [([1, 2, 3], [4, 5, 6, 7]), ([8, 9], [10, 11, 12, 13, 14, 60]), ([3] * 5, [2])]
    batch = collate(seqs, 0, "cpu")
    weights = torch.tensor([1.0, -2.0, 0.5])
    got = {}
    for fused in (True, False):
        model.zero_grad()
        if fused:  # the fused path must not compute full logits at all
            monkeypatch.setattr(lm_logps, "token_logps", lambda *a, **k: pytest.fail("full logits in the fused path"))
        sums, counts = forward_logps(model, *batch, fused=fused)
        monkeypatch.undo()
        (sums * weights).sum().backward()
        got[fused] = sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(got[True][0], got[False][0], atol=1e-5, rtol=1e-5)
    assert got[True][1].tolist() == [4, 6, 1]
    for name, g in got[False][2].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got[True][2][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_fused_head_is_refused_when_the_model_post_processes_logits():
    from selfalign.tasks.lm_logps import fused_head_ok

    model = _llama(61, False)
    model.config.final_logit_softcapping = 30.0
    assert not fused_head_ok(model)


def test_fused_head_check_ignores_dropout_and_keeps_the_mode():
    from transformers import GPT2Config, GPT2LMHeadModel

    from selfalign.tasks.lm_logps import fused_head_ok

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.5, embd_pdrop=0.5))
    model.train()
    assert fused_head_ok(model) and model.training
