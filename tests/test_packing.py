"""Padding-free packing (kernels/packing.py) against the padded computation: layout, segment sums,
varlen attention vs the explicit block-diagonal mask, and Hugging Face models end to end (values and
gradients, float32, 1e-5), through the same functions scoring and training use."""
import math

import pytest
import torch
import torch.nn.functional as F

from selfalign.kernels.packing import (block_causal_mask, pack, pack_rows, packed_sequence_logps,
                                       varlen_attention)
from selfalign.tasks.transformers_compat import attn_implementation

# Odd lengths on purpose: a one-token prompt, a one-token response (EOS only), lengths around 2^k.
SHAPES = [(1, 1), (3, 5), (1, 7), (9, 2), (4, 13), (6, 1), (2, 31), (5, 33), (17, 16)]


def _seqs(shapes, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (p,), generator=g).tolist(), torch.randint(0, vocab, (r,), generator=g).tolist())
            for p, r in shapes]


def test_pack_layout_restarts_positions_and_masks_prompts_and_boundaries():
    seqs = [([10, 11], [12, 13, 14]), ([20], [21]), ([30, 31, 32], [33])]
    p = pack(seqs)
    assert p.input_ids.tolist() == [[10, 11, 12, 13, 14, 20, 21, 30, 31, 32, 33]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3]]
    # position t predicts token t+1 of the same sequence; a sequence's last position predicts nothing
    assert p.labels.tolist() == [[-100, 12, 13, 14, -100, 21, -100, -100, -100, 33, -100]]
    assert p.seq_ids.tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert p.cu_seqlens.tolist() == [0, 5, 7, 11] and p.max_len == 5 and p.n == 3
    assert p.runs == [(0, 1, 5), (5, 1, 2), (7, 1, 4)]
    assert pack([([1], [2, 3]), ([4, 5], [6]), ([7], [8])]).runs == [(0, 2, 3), (6, 1, 2)]


def test_pack_rows_respects_the_budget_and_keeps_every_sequence_once():
    lengths = [7, 3, 9, 1, 5, 5, 12, 2, 8]
    rows = pack_rows(lengths, 12)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows)
    assert len(rows) == math.ceil(sum(lengths) / 12)  # first-fit decreasing is tight here
    assert pack_rows([20, 3], 10) == [[0], [1]]  # longer than a row: a row of its own


def test_packed_sequence_logps_are_segment_sums_with_gradients():
    p = pack(_seqs(SHAPES, 50))
    lp = torch.randn(p.input_ids.shape[1], dtype=torch.float64, requires_grad=True)
    sums, counts = packed_sequence_logps(lp, p.labels, p.seq_ids, p.n)
    want = torch.stack([lp[p.cu_seqlens[i]:p.cu_seqlens[i + 1]][p.labels[0, p.cu_seqlens[i]:p.cu_seqlens[i + 1]] != -100].sum()
                        for i in range(p.n)])
    torch.testing.assert_close(sums, want)
    assert counts.tolist() == [r for _, r in SHAPES]
    g = torch.randn(p.n, dtype=torch.float64)
    (grad,) = torch.autograd.grad(sums, lp, g)
    torch.testing.assert_close(grad, torch.where(p.labels[0] != -100, g[p.seq_ids], torch.zeros_like(lp)))


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_varlen_attention_equals_the_block_diagonal_mask_values_and_gradients(heads):
    hq, hk = heads
    p = pack(_seqs(SHAPES, 50))
    assert any(count > 1 for _, count, _ in p.runs)  # equal consecutive lengths share one call
    T, d = p.input_ids.shape[1], 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, T, d, generator=g, dtype=torch.float64, requires_grad=True) for h in (hq, hk, hk))
    out, _ = varlen_attention(None, q, k, v, None, scaling=0.3, packed=p)
    mask = block_causal_mask(p.cu_seqlens)
    rep = hq // hk
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, want)
    up = torch.randn_like(want)
    got_g = torch.autograd.grad(out, (q, k, v), up)
    want_g = torch.autograd.grad(want, (q, k, v), up)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)


def _reference_varlen(signature: str):
    """A stand-in for torch.nn.attention.varlen.varlen_attn (CUDA-only) with the semantics its
    docstring gives, in either of its signatures: causal as `is_causal` or as `window_size`."""
    def attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, gqa):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        if k.shape[1] != q.shape[1]:
            assert gqa, "fewer key/value heads without enable_gqa"
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1))
        return torch.cat(outs)

    if signature == "is_causal":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, None, is_causal, False)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, tuple(window_size) == (-1, 0),
                          enable_gqa)
    return varlen_attn


@pytest.mark.parametrize("signature", ["is_causal", "window_size"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_flash_varlen_attention_passes_the_packing_to_torch_varlen(monkeypatch, signature, heads):
    """The plumbing around torch's varlen kernel (layout, cu_seqlens, causality, GQA, scale) against
    the block-diagonal mask, with a stand-in kernel on CPU; tests/test_gpu.py runs the real one."""
    from selfalign.kernels import packing

    monkeypatch.setattr(packing, "_torch_varlen", lambda: _reference_varlen(signature))
    hq, hk = heads
    p = pack(_seqs(SHAPES, 50))
    T, d = p.input_ids.shape[1], 8
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, T, d, generator=g, dtype=torch.float64, requires_grad=True) for h in (hq, hk, hk))
    scale = d ** -0.5 if signature == "is_causal" else 0.3  # the older signature takes no scale
    out, _ = packing.flash_varlen_attention(None, q, k, v, None, scaling=scale, packed=p)
    want, _ = varlen_attention(None, q, k, v, None, scaling=scale, packed=p)
    assert out.shape == want.shape == (1, T, hq, d)
    torch.testing.assert_close(out, want)
    up = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
        torch.testing.assert_close(a, b)
    if signature == "is_causal":
        with pytest.raises(ValueError, match="takes no scale"):
            packing.flash_varlen_attention(None, q, k, v, None, scaling=0.3, packed=p)


def test_flash_varlen_path_only_on_cuda_in_half_precision():
    from selfalign.kernels.packing import torch_varlen_available

    assert not torch_varlen_available("cpu", torch.bfloat16)
    assert not torch_varlen_available("cuda", torch.float32)  # flash attention has no float32


# ---------------------------------------------------------------- Hugging Face models, end to end

def _llama(vocab=61, kv_heads=2, attn="sdpa", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).float()


def _padded(model, seqs, fused):
    from selfalign.tasks.lm_logps import collate, forward_logps

    return forward_logps(model, *collate(seqs, 0, "cpu"), fused=fused)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("attn,kv_heads", [("sdpa", 2), ("eager", 4)])
def test_packed_forward_equals_padded_values_and_gradients(fused, attn, kv_heads):
    from selfalign.tasks.lm_logps import packed_logps, packing_path

    model = _llama(kv_heads=kv_heads, attn=attn)
    assert packing_path(model) == "varlen"
    seqs = _seqs(SHAPES, 61)
    model.train()  # dropout is 0 in Llama: training mode must not change the numbers
    want, want_n = _padded(model, seqs, fused)
    want_g = torch.autograd.grad(want.sum() + (want * torch.arange(len(seqs))).sum() / 7, list(model.parameters()))
    sums, counts, _ = packed_logps(model, pack(seqs), fused, "varlen")
    assert attn_implementation(model) == attn  # switched for the packed forward only
    got_g = torch.autograd.grad(sums.sum() + (sums * torch.arange(len(seqs))).sum() / 7, list(model.parameters()))
    assert counts.tolist() == want_n.tolist()
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_transformers_mask_path_equals_varlen():
    """The fallback path (no attention mask, restarting position ids: transformers builds the
    block-diagonal mask itself) gives the same numbers."""
    from selfalign.tasks.lm_logps import packed_logps

    model = _llama().eval()
    p = pack(_seqs(SHAPES, 61))
    with torch.no_grad():
        a, _, _ = packed_logps(model, p, True, "varlen")
        b, _, _ = packed_logps(model, p, True, "mask")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chosen_and_rejected_of_a_pair_in_one_row_train_like_padding():
    """The training worker's Policy on one packed row of a micro-batch ([chosen..., rejected...])
    gives the padded DPO loss and gradients, and HPO's value features at the prompts' ends."""
    from selfalign.kernels.losses import dpo_loss
    from selfalign.tasks.lm_logps import collate, packing_path
    from selfalign.tasks.train_worker import Policy

    model = _llama()
    prompts = _seqs([(5, 0), (2, 0), (7, 0)], 61, seed=3)
    chosen, rejected = _seqs([(0, 9), (0, 1), (0, 20)], 61, seed=4), _seqs([(0, 4), (0, 15), (0, 3)], 61, seed=5)
    seqs = [(p, c) for (p, _), (_, c) in zip(prompts, chosen)] + [(p, r) for (p, _), (_, r) in zip(prompts, rejected)]
    value_at = torch.tensor([len(p) - 1 for p, _ in prompts])
    ref = torch.tensor([-30.0, -2.0, -70.0, -14.0, -40.0, -9.0])

    def loss_and_grads(policy, *args, **kw):
        logps, _, feats = policy(*args, **kw)
        losses, _, _ = dpo_loss(logps[:3], logps[3:], ref[:3], ref[3:], beta=0.1)
        return losses.mean(), feats, torch.autograd.grad(losses.mean(), list(model.parameters()))

    model.train()
    want, want_f, want_g = loss_and_grads(Policy(model, fused=True), *collate(seqs, 0, "cpu"), value_at=value_at)
    p = pack(seqs)
    got, got_f, got_g = loss_and_grads(Policy(model, fused=True, packing=packing_path(model)), packed=p,
                                       value_at=p.cu_seqlens[:3].long() + value_at)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_f, want_f, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_logps_of_packed_equals_padded_on_the_demo_tokenizer(tiny_model):
    from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
    from selfalign.tasks.lm_logps import load_model, logps_of

    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, device="cpu")
    seqs = [(encode_prompt(tok, f"What is {a} + {b}?"), encode_response(tok, "x" * n))
            for a, b, n in [(1, 2, 0), (30, 4, 17), (5, 66, 3), (7, 8, 41), (12, 13, 1)]]
    want = logps_of(model, seqs, tok.pad_token_id, batch_tokens=256)
    for budget in (1, 40, 4096):  # a row per sequence, a few per row, all in one row
        got = logps_of(model, seqs, tok.pad_token_id, batch_tokens=budget, packing=True)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_packing_path_falls_back_to_padding_when_packing_changes_the_numbers():
    """A model that cannot take a packed row (here: its forward drops position ids and other
    keyword arguments) is detected by the probe and scored padded, with the same numbers."""
    from selfalign.tasks import lm_logps

    model = _llama(attn="sdpa", seed=1)
    decoder = model.get_decoder()
    inner = decoder.forward

    def no_packing(input_ids=None, use_cache=False, **ignored):
        return inner(input_ids=input_ids, use_cache=use_cache)

    decoder.forward = no_packing
    assert lm_logps.packing_path(model) == ""
    seqs = _seqs(SHAPES[:4], 61)
    with torch.no_grad():
        want = _padded(model, seqs, True)[0].tolist()
    assert lm_logps.logps_of(model, seqs, 0, packing=True) == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "hpo"])
def test_training_stage_packed_trains_the_padded_model(tiny_model, tmp_path, replay_pairs, loss):
    """The real DeepSpeed worker with train.packing on and off: same losses, same weights."""
    from safetensors.torch import load_file

    from selfalign.flows.config import load_config
    from selfalign.tasks.train import run_train

    extra = {"train.hpo.rewards": "selfalign.tasks.toy:checker_reward"} if loss == "hpo" else {}
    runs = {}
    for packing in (True, False):
        cfg = load_config(None, {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
                                 "data.eval_prompts": "e", "data.offline_pairs": "o", "run.dir": str(tmp_path),
                                 "train.lr": 1e-3, "train.max_steps": 3, "train.batch_size": 4,
                                 "train.micro_batch_size": 2, "train.loss": loss, "train.packing": packing} | extra)
        name = f"{loss}_{packing}"
        out = tmp_path / name / "model"
        out.parent.mkdir()
        runs[packing] = (run_train(cfg.train, cfg.model, tiny_model, replay_pairs(name), out, seed=0, log=lambda m: None),
                         load_file(out / "model.safetensors"))
    (steps_p, w_p), (steps_d, w_d) = runs[True], runs[False]
    for a, b in zip(steps_p, steps_d):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    for k in w_d:
        torch.testing.assert_close(w_p[k], w_d[k], atol=1e-5, rtol=1e-4)


def test_pack_lists_the_labelled_positions_and_packed_logps_reads_them():
    from selfalign.kernels.packing import pack

    seqs = [([5, 6, 7], [8, 9]), ([1], [2, 3, 4]), ([4, 4], [])]
    p = pack(seqs)
    assert p.label_pos.tolist() == (p.labels[0] != -100).nonzero().view(-1).tolist() == [2, 3, 5, 6, 7]
    assert p.labels[0, p.label_pos].tolist() == [8, 9, 2, 3, 4]
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 5, 9, 11]
    assert p.input_ids.shape == p.position_ids.shape == p.labels.shape == (1, 11)
    assert p.seq_ids.tolist() == [0] * 5 + [1] * 4 + [2] * 2


@pytest.mark.parametrize("fused", [True, False])
def test_packed_logps_without_the_position_list_selects_by_mask(fused):
    """A Packed made elsewhere, without label_pos, gives the same sums through the boolean mask."""
    import dataclasses

    from selfalign.tasks.lm_logps import packed_logps

    model = _llama().eval()
    p = pack(_seqs(SHAPES, 61))
    with torch.no_grad():
        a, na, _ = packed_logps(model, p, fused, "varlen")
        b, nb, _ = packed_logps(model, dataclasses.replace(p, label_pos=None), fused, "varlen")
    assert na.tolist() == nb.tolist()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_private_read_of_transformers_is_checked_for_this_version():
    """tasks/transformers_compat.py reads one private attribute of transformers; it is checked for
    the versions in CHECKED. A new transformers fails here until it is checked and added."""
    import transformers

    from selfalign.tasks.transformers_compat import CHECKED

    version = ".".join(transformers.__version__.split(".")[:2])
    assert version in CHECKED, f"transformers {transformers.__version__}: check tasks/transformers_compat.py"
    model = _llama(kv_heads=1, attn="eager")
    assert attn_implementation(model) == "eager"
    model.set_attn_implementation("sdpa")
    assert attn_implementation(model) == "sdpa"
