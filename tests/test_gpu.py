"""CUDA paths: DeepSpeed ZeRO training on the GPU (NCCL) and scoring on the GPU against the CPU.
Skipped without CUDA (CI); run where a GPU is available."""
import math

import pytest

from selfalign.flows.config import load_config

pytestmark = pytest.mark.gpu


def _cfg(model, run_dir, **over):
    base = {"model.policy": model, "model.reference": model, "data.prompts": "p", "data.eval_prompts": "e",
            "data.offline_pairs": "o", "run.dir": str(run_dir), "train.lr": 1e-3, "train.max_steps": 6,
            "train.batch_size": 4, "train.micro_batch_size": 2}
    return load_config(None, base | over)


@pytest.mark.parametrize("zero_stage, dtype", [(2, "float32"), (3, "bfloat16")])
def test_deepspeed_training_on_cuda(tiny_model, tmp_path, replay_pairs, zero_stage, dtype):
    from selfalign.tasks.train import run_train

    cfg = _cfg(tiny_model, tmp_path, **{"train.zero_stage": zero_stage, "model.dtype": dtype})
    steps = run_train(cfg.train, cfg.model, tiny_model, replay_pairs(), tmp_path / "model", seed=0, log=print)
    assert len(steps) == 6
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-2 if dtype == "bfloat16" else 1e-4)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (tmp_path / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_zero_stage_on_one_gpu_trains_like_zero2(tiny_model, tmp_path, replay_pairs, dtype):
    """The default (auto) on one GPU is ZeRO-0 (bf16: DeepSpeed's bf16 optimizer, which sums the
    micro-batches' gradients in fp32). fp32: the same losses and gradient norms as ZeRO-2 at every
    step. bf16: the same first step within bf16 rounding (later steps drift apart at this learning
    rate), and both train."""
    from selfalign.tasks.train import run_train

    runs, said = {}, []
    for stage in ("auto", 2):
        cfg = _cfg(tiny_model, tmp_path / str(stage), **{"train.zero_stage": stage, "model.dtype": dtype})
        runs[stage] = run_train(cfg.train, cfg.model, tiny_model, replay_pairs(str(stage)), tmp_path / str(stage) / "model", seed=0,
                                log=said.append)
    assert any("ZeRO-0 (auto)" in m for m in said), said
    auto, z2 = runs["auto"], runs[2]
    assert len(auto) == len(z2) == 6 and all(math.isfinite(a["grad_norm"]) for a in auto)
    compared = zip(auto, z2) if dtype == "float32" else [(auto[0], z2[0])]
    tol = 1e-5 if dtype == "float32" else 2e-2
    for a, b in compared:
        assert a["loss"] == pytest.approx(b["loss"], abs=tol)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=tol)
    assert auto[-1]["loss"] < auto[0]["loss"] and z2[-1]["loss"] < z2[0]["loss"]


def test_cuda_scores_match_cpu(tiny_model):
    import torch

    from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
    from selfalign.tasks.lm_logps import load_model, logps_of

    tok = load_tokenizer(tiny_model)
    seqs = [(encode_prompt(tok, f"What is {a} + 11?"), encode_response(tok, "x" * a)) for a in range(10, 40, 3)]
    cpu = logps_of(load_model(tiny_model, device="cpu"), seqs, tok.pad_token_id)
    gpu = logps_of(load_model(tiny_model, device="cuda"), seqs, tok.pad_token_id)
    assert torch.cuda.is_available()
    assert gpu == pytest.approx(cpu, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_flash_varlen_attention_equals_per_sequence_sdpa_on_cuda(heads):
    """torch's varlen flash attention through our wrapper equals the per-sequence SDPA path (bf16
    values and gradients)."""
    import torch

    from selfalign.kernels.packing import flash_varlen_attention, pack, varlen_attention

    if not hasattr(torch.nn.attention, "varlen"):
        pytest.importorskip("torch.nn.attention.varlen")
    hq, hk = heads
    g = torch.Generator().manual_seed(0)
    seqs = [(list(range(p)), list(range(r))) for p, r in [(3, 40), (17, 16), (5, 100), (9, 2), (33, 31), (1, 64)]]
    p = pack(seqs, "cuda")
    T, d = p.input_ids.shape[1], 64
    q, k, v = (torch.randn(1, h, T, d, generator=g).to("cuda", torch.bfloat16).requires_grad_() for h in (hq, hk, hk))
    out, _ = flash_varlen_attention(None, q, k, v, None, scaling=d ** -0.5, packed=p)
    want, _ = varlen_attention(None, q, k, v, None, scaling=d ** -0.5, packed=p)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    up = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


def test_bf16_cuda_model_packs_through_torch_varlen(tiny_model):
    import torch

    from selfalign.tasks.lm_logps import load_model, packing_path

    if not hasattr(torch.nn.attention, "varlen"):
        pytest.importorskip("torch.nn.attention.varlen")
    assert packing_path(load_model(tiny_model, "bfloat16", device="cuda")) == "flash_varlen"
    assert packing_path(load_model(tiny_model, "float32", device="cuda")) == "varlen"
