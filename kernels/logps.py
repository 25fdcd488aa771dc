"""Per-token log-probabilities of labels: the hot path of scoring and training. The reference and
the chunked path from logits are here, with the chunking, tile sizes and backend choice that the
fused LM head (logps_fused.py) shares; the Triton kernels are in logps_triton.py.

Convention. Labels are aligned with positions (the caller has already shifted: ``labels[..., t]`` is
predicted by ``logits[..., t, :]``). For a row of logits z in R^V and a label y,

    logp(y | z) = z_y - logsumexp(z) = z_y - (m + log sum_v exp(z_v - m)),   m = max_v z_v.

Positions whose label equals ``ignore_index`` contribute exactly 0 and receive exactly zero gradient.
Outputs are float32 whatever the input dtype; gradients come back in each input's dtype.

With upstream gradient g (one scalar per position) the gradient with respect to the logits is

    d/dz_v = g * (1[v = y] - softmax(z)_v) = g * (1[v = y] - exp(z_v - logsumexp(z))),

so a backward pass needs only the saved per-row logsumexp (N floats), never the softmax itself.

Functions, by how much (tokens x vocab) memory they touch (N = tokens, V = vocab, C = chunk rows):

* ``token_logps_reference``: naive, materialises log_softmax: a full (N, V) float32 tensor (plus
  autograd's copy). The definition the others are tested against.
* ``token_logps``: from given logits. Works chunk by chunk over flattened tokens, upcasting one (C, V)
  chunk at a time to float32, so bf16 logits never get a full float32 copy. Its backward writes the
  (N, V) gradient (in the logits' dtype: autograd needs it) and nothing else of that size.
* ``linear_token_logps`` (logps_fused.py): fused LM head: ``hidden @ weight.T (+ bias)`` -> log-softmax -> gather,
  never holding more than one chunk (C * V elements) of logits; the backward recomputes the logits
  tile by tile (token rows x vocab columns, C * V elements at most) from the saved hidden states
  and weight instead of keeping them. Peak extra memory is O(C * V) plus the gradients of hidden
  (N, H) and weight (V, H) (and a float32 (V, H) accumulator for 16-bit weights when N is large).
  Below a size budget (``DEFAULT_KEEP_BYTES`` of float32 N * V) and when a gradient is wanted, it
  keeps the forward's log-softmax instead, which saves a matmul of the backward.
* ``sequence_logps``: per-sequence sums and counts of the token log-probs.

Backends (``backend=`` argument of ``token_logps`` and ``linear_token_logps``): ``"torch"`` (chunked
PyTorch, any device), ``"triton"`` (kernels below; CUDA tensors, or CPU tensors under the Triton
interpreter), ``"auto"`` (Triton on CUDA tensors when ``import triton`` works, except the fused
kernel on float32 weights without tf32, where cuBLAS is faster; torch otherwise; if a Triton launch
raises under "auto", a warning is logged and that function uses torch from then on). The path
taken is logged once per (function, backend, device) at INFO through
``logging.getLogger("selfalign.kernels.logps")``.

What the Triton path covers:

* ``linear_token_logps``: the forward is one fused Triton kernel (tiled matmul with an online
  logsumexp epilogue; logits exist only as a register tile, rounded to the weight dtype as
  ``F.linear`` would). The backward is NOT a Triton matmul: it recomputes each tile's logits with
  a cuBLAS matmul (torch), turns them into dlogits in place with a Triton kernel (one pass, no
  float32 copy of bf16 tiles), and forms grad_hidden / grad_weight with cuBLAS matmuls.
* ``token_logps``: the forward is a Triton row kernel (online logsumexp + gather over strided
  rows); the backward is a Triton kernel writing the gradient straight into the (N, V) buffer.

Triton interpreter (CPU tests): ``TRITON_INTERPRET=1`` must be in the environment before triton is
first imported in the process, not merely before the first launch: triton.language's own helpers
(``tl.cdiv``, ``tl.sum``, ...) are ``@triton.jit`` functions decorated at import, and compiled ones
cannot be called from an interpreted kernel. Two interpreter defects are worked around inside the
kernels (constexpr switches, inactive on GPU): its ``tl.dot`` multiplies bf16 bit patterns
(triton-lang/triton#11584), so bf16 operands are upcast first, and its fp32->bf16 downcast rounds
wrongly, so bf16 rounding is done by bit arithmetic.
"""
from __future__ import annotations

import logging
import math

import torch

from selfalign.kernels.logps_triton import (interpret_mode, triton_available, triton_dlogits, triton_row_fwd)

log = logging.getLogger("selfalign.kernels.logps")

__all__ = [
    "token_logps_reference",
    "token_logps",
    "sequence_logps",
    "triton_available",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CHUNK_BYTES_CUDA",
]

# Size budget of one float32 (tokens x vocab) working block when chunk_tokens is not given.
# CPU: 64 MiB (128 tokens at a 128k vocabulary, 512 at 32k). CUDA: 256 MiB, because every block
# boundary costs a pass over an accumulator (see _bwd_tiles) and small matmuls waste the GPU;
# still a small fraction of the full logits at the sizes where chunking matters.
DEFAULT_CHUNK_BYTES = 64 * 2**20
DEFAULT_CHUNK_BYTES_CUDA = 256 * 2**20

_BACKENDS = ("auto", "torch", "triton")


# --------------------------------------------------------------------------------------------
# reference and small helpers
# --------------------------------------------------------------------------------------------


def token_logps_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Naive reference: ``log_softmax(logits.float())[..., labels]``, 0 where labels == ignore_index.

    out[i] = z_i[y_i] - logsumexp(z_i)  if y_i != ignore_index else 0   (float32)

    Materialises a full (..., V) float32 log_softmax (and autograd keeps it): use it for tests and
    small inputs only.
    """
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    out = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    # where, not a product: a masked position must give 0 and a zero gradient even if its
    # log-prob is -inf (0 * -inf is nan).
    return torch.where(mask, out, torch.zeros_like(out))


def sequence_logps(token_lp: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-token log-probs over labelled positions, and the number of those positions.

    sums[b] = sum_t token_lp[b, t] * 1[labels[b, t] != ignore_index],  counts[b] = sum_t 1[...].
    """
    mask = labels != ignore_index
    return (token_lp * mask).sum(-1), mask.sum(-1)


def _round_rows(c: int, limit: int) -> int:
    # matmul tiles are 64-128 rows: 130 rows would run as 256 with half the work wasted
    c = max(1, min(c, limit))
    if c < limit and c > 128:
        c -= c % 128
    return c


def _auto_chunk(n_rows: int, vocab: int, chunk_tokens: int | None, device: torch.device) -> int:
    """Token rows per chunk: chunk_tokens if given, else the default byte budget over 4 * V."""
    if chunk_tokens is not None:
        if int(chunk_tokens) < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        return max(1, min(int(chunk_tokens), n_rows))
    budget = DEFAULT_CHUNK_BYTES_CUDA if device.type == "cuda" else DEFAULT_CHUNK_BYTES
    return _round_rows(budget // (4 * max(vocab, 1)), n_rows)


def _bwd_tiles(n: int, v: int, chunk: int) -> tuple[int, int]:
    """(token rows, vocab columns) of one backward tile, holding at most chunk * V elements.

    The weight gradient sums over tokens and the hidden gradient over the vocabulary, so every
    token chunk boundary costs a read-modify-write of the (V, H) accumulator and every vocabulary
    block boundary one of an (rows, H) accumulator. Pure token chunks of ~100 rows at V = 128k
    made the backward 5x slower than the unfused one on an H100 (the (V, H) float32 accumulator
    rewritten ~60 times). Tiles of about sqrt(budget) on each side, or all tokens at once when
    they fit (then grad_weight needs no accumulator at all), keep that traffic small.
    """
    budget = max(1, chunk * v)
    if n * v <= budget:
        return max(n, 1), v
    r = max(1, int(budget**0.5))
    if n <= 2 * r:
        cn = n
    elif v <= 2 * r:
        return _round_rows(budget // v, n), v
    else:
        cn = _round_rows(r, n)
    return cn, _round_rows(budget // cn, v)


def _check_labels(rows_shape: torch.Size, labels: torch.Tensor, what: str) -> None:
    if tuple(labels.shape) != tuple(rows_shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {what} {tuple(rows_shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """A (B, T, V) view of (..., V) logits with unit stride along V, without a copy where possible.

    Callers often pass slices such as ``logits[:, :-1]``, which cannot be flattened to (N, V)
    without copying the whole tensor; keeping two leading dims lets us walk them without a copy.
    """
    if x.dim() < 2:
        raise ValueError(f"expected logits of shape (..., T, V), got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()  # rare (transposed logits); a copy cannot be avoided for row access
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 3:
        return x
    try:
        return x.view(-1, x.shape[-2], x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-2], x.shape[-1])


def _row_chunks(x3: torch.Tensor, chunk: int):
    """Yield (first_row, block) over the flattened rows of a (B, T, V) tensor, in order.

    Each block is a 2-D view of at most ``chunk`` rows (never a copy). Chunks run across the batch
    boundary when the rows can be viewed as (B*T, V); otherwise they stay within one batch row.
    """
    b, t, v = x3.shape
    try:
        flat = x3.view(b * t, v)
    except RuntimeError:
        flat = None
    if flat is not None:
        for s in range(0, b * t, chunk):
            yield s, flat[s : s + chunk]
    else:
        for i in range(b):
            for s in range(0, t, chunk):
                yield i * t + s, x3[i, s : s + chunk]


_logged: set = set()


def _log_path(fn: str, backend: str, device: torch.device, detail: str = "") -> None:
    key = (fn, backend, device.type)
    if key not in _logged:
        _logged.add(key)
        log.info("%s: %s path on %s%s", fn, backend, device.type, detail)


# --------------------------------------------------------------------------------------------
# backend selection (triton imported lazily: the module imports without it)
# --------------------------------------------------------------------------------------------

_auto_disabled: set = set()  # functions whose Triton path failed once under backend="auto"


def _resolve_backend(backend: str, device: torch.device, fn: str, dtype: torch.dtype) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type == "cuda" and fn not in _auto_disabled and triton_available():
            if fn == "linear_token_logps" and dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
                # full-precision fp32 tl.dot runs without tensor cores: ~3x slower than cuBLAS
                # fp32 on an H100, so the fused kernel only pays for 16-bit (or tf32) inputs
                return "torch"
            return "triton"
        return "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' but triton is not importable")
    if device.type != "cuda" and not interpret_mode():
        raise RuntimeError(
            f"backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 (set before triton is imported)"
        )
    return "triton"


def _lse_and_logp(z: torch.Tensor, idx: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row logsumexp and log-prob of column ``idx`` of a (C, V) block, float32.

    One fused ``log_softmax`` into ``buf`` (a reused float32 (>= C, V) buffer), then
    lse = z[idx] - log_softmax(z)[idx]. ``torch.logsumexp`` makes several passes over the block
    and allocates its temporaries on every call: on CPU it cost about as much as the LM-head
    matmul that produced the block, the fused log_softmax a small fraction of it.
    """
    lsm = buf[: z.shape[0]]
    torch.log_softmax(z.float(), dim=-1, out=lsm)  # .float() is a no-op for float32 blocks
    at = idx[:, None]
    lp = lsm.gather(-1, at).squeeze(-1)
    return z.gather(-1, at).squeeze(-1).float() - lp, lp


def _softmax_grad_(z: torch.Tensor, lse: torch.Tensor, rel: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dz = g * (onehot(y) - exp(z - lse)) for a (C, Vb) tile, in place (z is returned).

    ``rel`` is each row's label minus the tile's first vocabulary column: rows whose label lies
    outside the tile get no one-hot term. For 16-bit z one float32 tile is allocated.
    """
    zf = z if z.dtype == torch.float32 else z.float()
    zf.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    hit = (rel >= 0) & (rel < z.shape[1])
    # scatter with a clamped index and a zero value off-tile: no host sync (unlike nonzero)
    zf.scatter_add_(1, rel.clamp(0, z.shape[1] - 1)[:, None], torch.where(hit, g, torch.zeros_like(g))[:, None])
    if zf is not z:
        z.copy_(zf)
    return z


# --------------------------------------------------------------------------------------------
# token_logps: from logits
# --------------------------------------------------------------------------------------------


class _TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, chunk, backend):
        x3 = _as_3d(logits)
        n, v = x3.shape[0] * x3.shape[1], x3.shape[2]
        flat_labels = labels.reshape(-1)
        mask = flat_labels != ignore_index
        safe = flat_labels.masked_fill(~mask, 0).to(torch.int64)
        if backend == "triton":
            lse, tgt = triton_row_fwd(x3, safe)
            lp = tgt - lse
        else:
            lse = torch.empty(n, dtype=torch.float32, device=logits.device)
            lp = torch.empty(n, dtype=torch.float32, device=logits.device)
            buf = torch.empty((min(chunk, n), v), dtype=torch.float32, device=logits.device)
            for s, blk in _row_chunks(x3, chunk):
                e = s + blk.shape[0]
                lse[s:e], lp[s:e] = _lse_and_logp(blk, safe[s:e], buf)
            del buf
        out = torch.where(mask, lp, torch.zeros_like(lse))
        ctx.save_for_backward(logits, safe, mask, lse)
        ctx.chunk, ctx.backend = chunk, backend
        return out.view(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, safe, mask, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        x3 = _as_3d(logits)
        n, v = x3.shape[0] * x3.shape[1], x3.shape[2]
        g = torch.where(mask, grad_out.reshape(-1).float(), torch.zeros_like(lse))
        # the gradient itself is (N, V) in the logits' dtype: autograd needs it; nothing else is
        grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
        if ctx.backend == "triton":
            triton_dlogits(x3, grad, lse, safe, g)
        else:
            for s, blk in _row_chunks(x3, ctx.chunk):
                e = s + blk.shape[0]
                # bf16 - fp32 promotes to a fresh fp32 chunk: no separate upcast copy
                p = blk - lse[s:e, None]
                p.exp_().neg_()
                p.scatter_add_(1, safe[s:e, None], torch.ones_like(p[:, :1]))
                p.mul_(g[s:e, None])
                grad[s:e].copy_(p)
        return grad.view(logits.shape), None, None, None, None


def _run_with_fallback(fn_name: str, backend_req: str, device: torch.device, dtype: torch.dtype, call):
    backend = _resolve_backend(backend_req, device, fn_name, dtype)
    if backend == "triton" and backend_req == "auto":
        try:
            out = call("triton")
            _log_path(fn_name, "triton", device)
            return out
        except Exception as exc:  # compile failure on an unsupported GPU, etc.
            _auto_disabled.add(fn_name)
            log.warning("%s: Triton path failed (%s: %s); using the torch path from now on",
                        fn_name, type(exc).__name__, exc)
            backend = "torch"
    _log_path(fn_name, backend, device)
    return call(backend)


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token log-probs from logits, same values as ``token_logps_reference``, memory-bounded.

    logits (..., V) any float dtype, labels (...) integer (aligned, ignore_index masked).
    Returns float32 (...):  out = z[y] - logsumexp(z), computed over flattened tokens in chunks of
    ``chunk_tokens`` rows (default: enough rows for ~``DEFAULT_CHUNK_BYTES`` of float32, or
    ``DEFAULT_CHUNK_BYTES_CUDA`` on CUDA), each chunk
    upcast to float32 on its own. No second full (N, V) float tensor is allocated in the forward;
    the backward allocates only the (N, V) gradient, in the logits' dtype. Non-contiguous leading
    dims (e.g. ``logits[:, :-1]``) are walked without copying.
    Autograd: d out / d z_v = 1[v = y] - softmax(z)_v on labelled rows, 0 on ignored rows.
    """
    _check_labels(logits.shape[:-1], labels, "logits.shape[:-1]")
    rows = math.prod(logits.shape[:-1])
    chunk = _auto_chunk(max(rows, 1), logits.shape[-1], chunk_tokens, logits.device)

    def call(be):
        return _TokenLogps.apply(logits, labels, ignore_index, chunk, be)

    return _run_with_fallback("token_logps", backend, logits.device, logits.dtype, call)
