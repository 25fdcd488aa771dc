"""The Triton kernels of kernels/logps.py (its docstring says what they cover): the fused linear +
log-softmax forward, the row log-softmax forward and the in-place dlogits backward, built on first use,
and their launchers. Imported by kernels/logps.py and logps_fused.py only; triton itself is imported inside the builders."""
from __future__ import annotations

import os

import torch

_triton_ok: bool | None = None


def triton_available() -> bool:
    """Whether ``import triton`` works (checked once)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_ok = True
        except Exception:  # ImportError, or a broken install raising something else
            _triton_ok = False
    return _triton_ok


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# --------------------------------------------------------------------------------------------
# Triton kernels, built on first use (triton.jit reads TRITON_INTERPRET when it decorates; the
# cache is keyed by the mode so a mode change never reuses the wrong kind of kernel)
# --------------------------------------------------------------------------------------------

_kernel_cache: dict = {}


def _kernels():
    mode = interpret_mode()
    if mode in _kernel_cache:
        return _kernel_cache[mode]
    import triton
    import triton.language as tl

    # Sizes that change with every batch are not specialised on (Triton would compile a variant
    # for each of N % 16 == 0, N == 1, ...: a second or so each, paid again and again by short
    # trainings whose micro-batches have ever-new token counts).
    @triton.jit(do_not_specialize=["N", "SPLITS"])
    def fused_linear_lse_fwd(
        H, W, Bias, Lab, PartLse, PartTgt,
        N, V, K, SPLITS,
        stride_hn, stride_hk, stride_wv, stride_wk,
        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        ROUND_LOGITS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Program (pid_m, pid_s): rows [pid_m*BLOCK_M, +BLOCK_M) against the pid_s-th slice of
        # vocab tiles. Logits z = h @ W^T (+ b) exist only as a (BLOCK_M, BLOCK_N) fp32 tile; the
        # tile feeds an online logsumexp (running max m, running sum s of exp(z - m)) and picks
        # z[label] when the label falls in the tile. Per-slice results (lse_s = m + log s, and
        # the target logit or 0) are combined on the host: lse = logsumexp_s(lse_s),
        # target = sum_s(target_s). Splitting the vocabulary gives enough programs to fill the
        # GPU when there are few token blocks.
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rm < N
        rm64 = rm.to(tl.int64)
        labels = tl.load(Lab + rm64, mask=row_ok, other=0)

        n_tiles = tl.cdiv(V, BLOCK_N)
        per_split = tl.cdiv(n_tiles, SPLITS)
        t_begin = pid_s * per_split
        t_end = tl.minimum(t_begin + per_split, n_tiles)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_i = tl.zeros([BLOCK_M], tl.float32)
        tgt = tl.zeros([BLOCK_M], tl.float32)
        for t in range(t_begin, t_end):
            rn = t * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = rn < V
            rn64 = rn.to(tl.int64)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                h = tl.load(H + rm64[:, None] * stride_hn + rk[None, :] * stride_hk,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(W + rn64[:, None] * stride_wv + rk[None, :] * stride_wk,
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST_DOT:
                    # interpreter only: its tl.dot multiplies bf16 bit patterns (triton-lang/triton
                    # #11584); bf16 products are exact in fp32, so this matches the GPU result
                    h = h.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                b = tl.load(Bias + rn64, mask=col_ok, other=0.0).to(tl.float32)
                acc = acc + b[None, :]
            # round the tile to the storage dtype, as F.linear would: the values then match an
            # unfused LM head, and the backward (which recomputes 16-bit logits with cuBLAS)
            # sees a logsumexp consistent with its own logits
            if ROUND_LOGITS == 1:
                acc = acc.to(H.dtype.element_ty).to(tl.float32)
            elif ROUND_LOGITS == 2:
                # bf16 round-to-nearest-even by bit arithmetic: the interpreter's float downcast
                # does not carry the rounding increment correctly (off by up to an ulp)
                bits = acc.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                acc = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
            # padded vocab columns must not enter the sum
            acc = tl.where(col_ok[None, :], acc, float("-inf"))
            # every tile has >= 1 real column, so the tile max is finite and m_new is too
            m_new = tl.maximum(m_i, tl.max(acc, axis=1))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
            m_i = m_new
            hit = rn[None, :] == labels[:, None]
            tgt += tl.sum(tl.where(hit, acc, 0.0), axis=1)
        # an empty slice (t_begin >= n_tiles) leaves m=-inf, s=0: lse_s = -inf, ignored by the combine
        lse = m_i + tl.log(s_i)
        out = pid_s.to(tl.int64) * N + rm64
        tl.store(PartLse + out, lse, mask=row_ok)
        tl.store(PartTgt + out, tgt, mask=row_ok)

    @triton.jit(do_not_specialize=["T", "stride_b", "stride_t"])
    def row_lse_fwd(X, Lab, Lse, Tgt, T, V, stride_b, stride_t, BLOCK_V: tl.constexpr):
        # One program per row of (B, T, V) logits addressed through (b, t) strides, so a
        # non-contiguous slice such as logits[:, :-1] needs no copy. Online logsumexp over
        # BLOCK_V-wide tiles in fp32, whatever the storage dtype.
        row = tl.program_id(0).to(tl.int64)
        base = X + (row // T) * stride_b + (row % T) * stride_t
        label = tl.load(Lab + row)
        m = tl.full([1], float("-inf"), tl.float32)
        s = tl.zeros([1], tl.float32)
        tg = tl.zeros([1], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # guard rows whose values so far are all -inf (exp(-inf - -inf) would be nan)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_use) + tl.sum(tl.exp(x - m_use), axis=0)
            m = m_new
            tg += tl.sum(tl.where(cols == label, x, 0.0), axis=0)
        lse = m + tl.log(s)
        one = tl.arange(0, 1)
        tl.store(Lse + row + one, lse)
        tl.store(Tgt + row + one, tg)

    @triton.jit(do_not_specialize=["T", "stride_b", "stride_t", "stride_out"])
    def dlogits(Z, DZ, Lse, Lab, G, T, V, stride_b, stride_t, stride_out,
                BF16_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
        # dz_v = g * (1[v = y] - exp(z_v - lse)) for one row; g is already 0 on ignored rows.
        # May run in place (DZ == Z): each element is read before it is written by the same
        # program. Computes in fp32 and stores in DZ's dtype.
        row = tl.program_id(0).to(tl.int64)
        src = Z + (row // T) * stride_b + (row % T) * stride_t
        dst = DZ + row * stride_out
        label = tl.load(Lab + row)
        lse = tl.load(Lse + row)
        g = tl.load(G + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            z = tl.load(src + cols, mask=ok, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            d = g * (tl.where(cols == label, 1.0, 0.0) - p)
            if BF16_BITS:  # interpreter: exact RNE first, so its downcast only drops zero bits
                bits = d.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                d = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
            tl.store(dst + cols, d.to(DZ.dtype.element_ty), mask=ok)

    ks = {"fused_linear_lse_fwd": fused_linear_lse_fwd, "row_lse_fwd": row_lse_fwd, "dlogits": dlogits,
          "triton": triton}
    _kernel_cache[mode] = ks
    return ks


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 matmuls follow torch's own setting, so "triton" and "torch" agree: tf32 only when the
    # user allowed it for cuBLAS. 16-bit inputs ignore this (always full-precision products).
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _round_mode(dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return 0
    if dtype == torch.bfloat16 and interpret_mode():
        return 2
    return 1


def _fwd_config(dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":  # interpreter: small tiles keep numpy work per program small
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    # measured on an H100 (bf16, N 8192, H 4096, V 128k): 17 ms against 21-35 ms for the other
    # tiles tried; cuBLAS takes 11.5 ms for the bare matmul
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _row_block(vocab: int, device: torch.device) -> int:
    cap = 4096 if device.type == "cuda" else 128
    return max(16, min(cap, 1 << (max(vocab, 1) - 1).bit_length()))


def triton_linear_fwd(h2: torch.Tensor, weight: torch.Tensor, bias, safe: torch.Tensor):
    """Per-row (lse, target logit) of h2 @ weight.T (+ bias) through the fused kernel."""
    ks = _kernels()
    triton = ks["triton"]
    n, k = h2.shape
    v = weight.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=h2.device)
    tgt = torch.empty(n, dtype=torch.float32, device=h2.device)
    if n == 0:
        return lse, tgt
    cfg = _fwd_config(weight.dtype, h2.device)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    m_blocks = triton.cdiv(n, bm)
    v_tiles = triton.cdiv(v, bn)
    # ~2 programs per SM; more vocab slices only when the token blocks alone cannot fill the GPU
    splits = max(1, min(v_tiles, triton.cdiv(2 * _num_sms(h2.device), m_blocks)))
    part_lse = torch.empty((splits, n), dtype=torch.float32, device=h2.device)
    part_tgt = torch.empty((splits, n), dtype=torch.float32, device=h2.device)
    b_arg = bias if bias is not None else weight  # dummy pointer, never read when HAS_BIAS=False
    ks["fused_linear_lse_fwd"][(m_blocks, splits)](
        h2, weight, b_arg, safe, part_lse, part_tgt,
        n, v, k, splits,
        h2.stride(0), h2.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(weight.dtype),
        UPCAST_DOT=interpret_mode() and weight.dtype != torch.float32,
        ROUND_LOGITS=_round_mode(weight.dtype),
        **cfg,
    )
    if splits == 1:
        return part_lse[0], part_tgt[0]
    return torch.logsumexp(part_lse, dim=0), part_tgt.sum(0)


def triton_row_fwd(x3: torch.Tensor, safe: torch.Tensor):
    ks = _kernels()
    b, t, v = x3.shape
    n = b * t
    lse = torch.empty(n, dtype=torch.float32, device=x3.device)
    tgt = torch.empty(n, dtype=torch.float32, device=x3.device)
    if n:
        ks["row_lse_fwd"][(n,)](x3, safe, lse, tgt, t, v, x3.stride(0), x3.stride(1),
                                BLOCK_V=_row_block(v, x3.device))
    return lse, tgt


def triton_dlogits(z3: torch.Tensor, out2: torch.Tensor, lse, safe, g) -> None:
    ks = _kernels()
    b, t, v = z3.shape
    n = b * t
    if n:
        ks["dlogits"][(n,)](z3, out2, lse, safe, g, t, v, z3.stride(0), z3.stride(1), out2.stride(0),
                            BF16_BITS=_round_mode(out2.dtype) == 2, BLOCK_V=_row_block(v, z3.device))


# --------------------------------------------------------------------------------------------
# torch chunk primitives
# --------------------------------------------------------------------------------------------


