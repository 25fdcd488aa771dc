"""Fused LM head: per-token log-probs of labels straight from hidden states, ``hidden @ weight.T
(+ bias)`` -> log-softmax -> gather, without ever holding more than one chunk of logits. The memory
of each path, the convention and the backend choice are described in logps.py, whose chunking, tile
sizes and backward helpers this module uses.

Small inputs keep their log-softmax for the backward instead of recomputing the logits: when the
(tokens x vocab) float32 block is at most ``DEFAULT_KEEP_BYTES`` and a gradient is wanted. That
saves one of the head's four matmuls (two in the forward and backward of the logits, one for each
gradient) and the second exp pass; at the sizes where memory matters the block is far larger than
the budget and nothing changes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selfalign.kernels.logps import (_auto_chunk, _bwd_tiles,
                                     _check_labels, _lse_and_logp, _run_with_fallback, _softmax_grad_)
from selfalign.kernels.logps_triton import triton_dlogits, triton_linear_fwd

# Largest (tokens x vocab) float32 log-softmax kept from the forward for the backward. At 256 MiB: a
# micro-batch of ~2,000 tokens at a 32k vocabulary, ~500 at 128k.
DEFAULT_KEEP_BYTES = 256 * 2**20


class _LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk, backend, keep):
        hsize = hidden.shape[-1]
        v = weight.shape[0]
        # hidden is (N, H): small next to (N, V), so a reshape copy here is acceptable
        h2 = hidden.reshape(-1, hsize)
        n = h2.shape[0]
        flat_labels = labels.reshape(-1)
        mask = flat_labels != ignore_index
        safe = flat_labels.masked_fill(~mask, 0).to(torch.int64)
        kept = None
        if backend == "triton":
            lse, tgt = triton_linear_fwd(h2.to(weight.dtype), weight, bias, safe)
            lp = tgt - lse
        else:
            lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
            lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
            # keep: every chunk's log-softmax stays in its rows of one (N, V) block, for the backward
            buf = torch.empty((n if keep else min(chunk, n), v), dtype=torch.float32, device=hidden.device)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                z = F.linear(h2[s:e].to(weight.dtype), weight, bias)  # (C, V) in compute dtype
                lse[s:e], lp[s:e] = _lse_and_logp(z, safe[s:e], buf[s:e] if keep else buf)
                del z
            kept = buf if keep else None
            del buf
        out = torch.where(mask, lp, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, bias, safe, mask, lse, kept)
        ctx.chunk, ctx.backend, ctx.v = chunk, backend, v
        return out.view(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, safe, mask, lse, kept = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_h or need_w or need_b):
            return (None,) * 8
        hsize = hidden.shape[-1]
        h2 = hidden.reshape(-1, hsize)
        n, v = h2.shape[0], ctx.v
        cn, vb = _bwd_tiles(n, v, ctx.chunk)
        one_chunk, one_block = cn >= n, vb >= v
        cdt = weight.dtype
        low = cdt in (torch.float16, torch.bfloat16)
        g = torch.where(mask, grad_out.reshape(-1).float(), torch.zeros_like(lse))
        if kept is not None:
            return _backward_from_kept(kept, hidden, weight, bias, safe, g, need_h, need_w, need_b) + (None,) * 5

        grad_h = torch.empty((n, hsize), dtype=hidden.dtype, device=hidden.device) if need_h else None
        if need_w:
            if one_chunk and n > 0:
                # all tokens in each tile: each block of grad_weight is one matmul over all
                # tokens, written once in the weight's dtype (rounded once, like nn.Linear's)
                grad_w = torch.empty((v, hsize), dtype=cdt, device=weight.device)
            else:
                # sums over token chunks: float32 accumulator for 16-bit weights, so the error
                # is that of one bf16 matmul rather than growing with the number of chunks
                grad_w = torch.zeros((v, hsize), dtype=torch.float32 if low else cdt, device=weight.device)
        grad_b = torch.zeros((v,), dtype=torch.float32, device=weight.device) if need_b else None

        for s in range(0, n, cn):
            e = min(s + cn, n)
            hc = h2[s:e].to(cdt)
            gc, lc, sc = g[s:e], lse[s:e], safe[s:e]
            acc_h = None
            if need_h and not one_block:
                # grad_hidden sums over vocabulary blocks: float32 (rows, H) accumulator
                acc_h = grad_h[s:e].zero_() if grad_h.dtype == torch.float32 else \
                    torch.zeros((e - s, hsize), dtype=torch.float32, device=hidden.device)
            for v0 in range(0, v, vb):
                v1 = min(v0 + vb, v)
                wb = weight[v0:v1]
                # recompute this tile's logits instead of having kept them: O(tile) live memory
                z = F.linear(hc, wb, None if bias is None else bias[v0:v1])
                rel = sc - v0
                if ctx.backend == "triton":
                    triton_dlogits(z.unsqueeze(0), z, lc, rel, gc)
                    dz = z
                else:
                    dz = _softmax_grad_(z, lc, rel, gc)
                if need_h:
                    if acc_h is None:
                        grad_h[s:e] = dz @ wb
                    elif not low and acc_h.dtype == cdt:
                        acc_h.addmm_(dz, wb)
                    else:
                        acc_h.add_(dz @ wb)
                if need_w:
                    if grad_w.dtype == cdt and one_chunk:
                        torch.mm(dz.t(), hc, out=grad_w[v0:v1])
                    elif not low:
                        grad_w[v0:v1].addmm_(dz.t(), hc)
                    else:
                        grad_w[v0:v1].add_(dz.t() @ hc)
                if need_b:
                    grad_b[v0:v1].add_(dz.sum(0, dtype=torch.float32))
                del z, dz
            if acc_h is not None and acc_h.data_ptr() != grad_h[s:e].data_ptr():
                grad_h[s:e] = acc_h
        gh = grad_h.view(hidden.shape) if need_h else None
        gw = grad_w.to(weight.dtype) if need_w else None
        gb = grad_b.to(bias.dtype) if need_b else None
        return gh, gw, gb, None, None, None, None, None


def _backward_from_kept(lsm, hidden, weight, bias, safe, g, need_h, need_w, need_b):
    """The backward from the forward's (N, V) float32 log-softmax: dz = g * (onehot(y) - exp(lsm)),
    built in place in ``lsm`` (the backward runs once), then one matmul per gradient."""
    dz = lsm.exp_().mul_(-g[:, None])
    dz.scatter_add_(1, safe[:, None], g[:, None])  # g is 0 on ignored rows
    cdt = weight.dtype
    dzc = dz if dz.dtype == cdt else dz.to(cdt)
    gh = (dzc @ weight).to(hidden.dtype).view(hidden.shape) if need_h else None
    gw = dzc.t() @ hidden.reshape(-1, hidden.shape[-1]).to(cdt) if need_w else None
    gb = dz.sum(0).to(bias.dtype) if need_b else None
    return gh, gw, gb


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    backend: str = "auto",
    keep_bytes: int = DEFAULT_KEEP_BYTES,
) -> torch.Tensor:
    """Fused LM head + log-softmax + gather, never materialising (N, V) logits.

    hidden (B, T, H) or (N, H); weight (V, H) as in ``nn.Linear``; bias (V,) or None; labels the
    leading shape of hidden. With z = hidden @ weight.T + bias (computed in weight's dtype, as the
    LM head would), returns float32 ``out = z[y] - logsumexp(z)`` (0 where y == ignore_index).

    Memory: the (tokens x vocab) working set is bounded by ``chunk_tokens * V`` elements (default
    ``chunk_tokens``: ~``DEFAULT_CHUNK_BYTES`` of float32 per chunk, ``DEFAULT_CHUNK_BYTES_CUDA``
    on CUDA). The forward takes ``chunk_tokens`` rows at a time (the Triton forward needs no
    chunk at all). Saved for backward: hidden, weight, bias, labels and the per-row logsumexp
    (N floats) -- never logits.

    Backward: the logits are recomputed tile by tile, a tile being (token rows x vocab columns)
    of at most ``chunk_tokens * V`` elements (shape chosen by ``_bwd_tiles``). Per tile, with
    g = upstream gradient (0 on ignored rows) and lse from the forward:
        dz = g * (onehot(y) - exp(z - lse))           (only the tile's columns)
        grad_hidden[rows] += dz @ W[cols]             grad_weight[cols] += dz^T @ h[rows]
        grad_bias[cols] += sum_rows(dz)
    Sums that span several tiles accumulate in float32 for 16-bit inputs (an (rows, H) buffer for
    hidden; a (V, H) buffer for the weight, only when the tokens need more than one chunk).
    Hidden of another dtype than weight is cast chunk by chunk to weight's dtype; its gradient
    comes back in its own dtype.

    backend: "auto" | "torch" | "triton". The Triton path uses a fused matmul + online-logsumexp
    kernel for the forward and, in the backward, cuBLAS matmuls around a Triton in-place dlogits
    kernel (see the module docstring). "auto" takes it on CUDA for 16-bit weights, and for
    float32 only when tf32 matmuls are allowed (exact fp32 tl.dot is slower than cuBLAS).
    """
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden (..., H) and weight (V, H) disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (V,), got {tuple(bias.shape)}")
    _check_labels(hidden.shape[:-1], labels, "hidden.shape[:-1]")
    n = math.prod(hidden.shape[:-1])
    chunk = _auto_chunk(max(n, 1), weight.shape[0], chunk_tokens, hidden.device)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    keep = wants_grad and 0 < n * weight.shape[0] * 4 <= keep_bytes

    def call(be):
        return _LinearTokenLogps.apply(hidden, weight, bias, labels, ignore_index, chunk, be, keep and be != "triton")

    return _run_with_fallback("linear_token_logps", backend, hidden.device, weight.dtype, call)
