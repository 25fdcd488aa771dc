import math

import pytest
import torch

from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
from selfalign.tasks.score import collate, load_model, logps_of, pair_accuracy, token_budget_batches


def naive_logp(model, prompt_ids, response_ids) -> float:
    """One sequence at a time, no padding, the textbook formula."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    n = len(prompt_ids)
    return sum(logp[n - 1 + t, tok].item() for t, tok in enumerate(response_ids))


def test_batched_scores_equal_one_sequence_at_a_time(tiny_model):
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
