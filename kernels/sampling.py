"""Sampling kernels for the CPU vLLM worker: top-p (nucleus) filtering without sorting the
vocabulary, and drawing a token by inverse CDF without per-token noise (`sample_inverse_cdf`, at the
end of this module).

Rule (the one vLLM and HF transformers implement with a sort). For a row of logits z in R^V, already
divided by the temperature, and probabilities q = softmax(z), a token v is kept iff the probability
mass of the tokens ranked strictly above it is below p:

    keep(v)  <=>  sum_{u : q_u > q_v} q_u < p.

The left side is non-increasing in q_v, so the kept set is {v : q_v >= t} for a single threshold t:
the smallest probability x with f(x) = sum_{u : q_u > x} q_u < p. Removed tokens get logit -inf.

* Ties at the boundary are all kept: every token whose probability equals t's survives. A sort-based
  version keeps an arbitrary subset of such a tie (the ones its sort happens to place first), so
  on tied rows this one keeps a superset of theirs; on rows without such a tie the sets are equal.
* At least one token is always kept (the most probable ones: f(max q) = 0). p <= 0 acts as the
  smallest positive p: only the most probable token(s) survive.
* Rows with p >= 1 are returned untouched (no softmax is computed for them). Tokens already at
  -inf have probability 0 and stay at -inf. Rows without a finite softmax (every logit -inf, a
  +inf or NaN logit) are returned untouched: there is no distribution to cut.
* Probabilities and per-bucket sums are float32 (the precision of vLLM's float32 cumsum); bucket
  totals are combined in float64.

Algorithm. Probabilities are in [0, 1], and non-negative float32 numbers order like their int32 bit
patterns (< 2^30 here). So t is found by a radix select over those bit patterns, with histograms of
probability mass instead of a sort:

1. Fast path: ``topk`` of the ``fast_k`` (64) largest probabilities of a row (a partial selection,
   far cheaper than a sort). Where their mass reaches p, t is among them: the last one whose mass
   strictly before it, in descending order, is < p. This is the usual case: SmolLM2-135M-Instruct
   sampling at temperature 0.7 has a p = 0.9 nucleus of 2 tokens (median), 59 (99th percentile).
   Rows whose k largest cannot reach p (k * max q < p: flat rows) skip the topk.
2. Other rows: a mass histogram of bits >> 18 (4065 buckets of 1/32 octave; one ``scatter_add_``
   pass over the row) gives each bucket's mass strictly above it; t lies in the first bucket whose
   mass above is < p. That bucket's members are gathered (``nonzero``) and split on bits 8..17, the
   chosen sub-bucket's on bits 0..7, which pins t's bit pattern exactly. Only level 1 touches the
   whole row.

Rows are processed in blocks of ``chunk_elements`` (2^20, 4 MB of float32) elements: each step is
a pass over the block, which then stays in cache, while the fixed cost of each step's small tensor
operations is shared by enough rows.

Cost on one thread, float32, p = 0.9 (README, benchmarks): 64 x 32000 logits take 7 ms peaked and
14 ms near-uniform, against 143 ms for vLLM's sort-based ``apply_top_k_top_p_pytorch``.
"""
from __future__ import annotations

import torch

__all__ = ["top_p_filter", "top_p_threshold", "sample_inverse_cdf", "DEFAULT_FAST_K", "DEFAULT_CHUNK_ELEMENTS",
           "DEFAULT_SAMPLE_BLOCK"]

# Candidates of the fast path (module docstring: a trained model's p = 0.9 nucleus is almost always
# smaller); rows whose nucleus is larger fall through to the histogram search.
DEFAULT_FAST_K = 64
# Rows per block of work: V-element rows, at most this many elements (at least one row). Every step
# makes a pass over the block, so a block that stays in cache between passes is several times
# faster; each step also costs a few dozen small tensor operations, which a block of a few rows pays
# for little work. On a 2-core AMD EPYC (L2 1 MB, L3 32 MB), one thread, medians of 10, 2^20
# against 2^18: the draw 7.0 vs 10.0 ms (256 x 32000) and 6.6 vs 10.0 (64 x 128256); top-p on
# near-uniform rows 67 vs 99 ms (64 x 128256), about the same at 256 x 32000 (78 vs 77). 2^19, 2^21
# and 2^22 were no better overall.
DEFAULT_CHUNK_ELEMENTS = 1 << 20

# Radix levels over the bit patterns of probabilities in [0, 1] (< 2^30): (shift, bits).
_LEVELS = ((18, 12), (8, 10), (0, 8))


def _check(logits: torch.Tensor, top_p: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"top_p_filter: logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise ValueError(f"top_p_filter: logits must be float32, got {logits.dtype}")
    if top_p.shape != (logits.shape[0],):
        raise ValueError(f"top_p_filter: top_p must have shape ({logits.shape[0]},) to match the logits' "
                         f"rows, got {tuple(top_p.shape)}")
    if top_p.is_floating_point() and torch.isnan(top_p).any():
        row = int(torch.isnan(top_p).nonzero()[0])
        raise ValueError(f"top_p_filter: top_p of row {row} is NaN")


def _bucket_above(hist: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Mass strictly above each bucket: base (mass above the whole range) + the buckets after it."""
    hist = hist.double()
    suffix = hist.flip(-1).cumsum(-1).flip(-1)  # mass of bucket j and every bucket after it
    return suffix - hist + base.unsqueeze(1)


def _threshold_fast(probs: torch.Tensor, p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(found, threshold bits) from the k largest probabilities of each row."""
    vals, _ = probs.topk(k, dim=-1, sorted=True)
    cum = vals.double().cumsum(-1)
    above = cum - vals.double()  # mass strictly before each candidate, in descending order
    found = cum[:, -1] >= p
    # The last candidate with mass above < p; ties in front of it have the same value.
    last = (above < p.unsqueeze(1)).sum(-1).clamp(min=1) - 1
    t = vals.gather(1, last.unsqueeze(1)).squeeze(1)
    return found, t.view(torch.int32)


def _threshold_radix(probs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Threshold bit patterns by a radix select over the bit patterns of `probs` (contiguous,
    each < 2^30): bits 18..29 (4065 buckets, 1/32 of an octave each), then 8..17, then 0..7.
    Level 1 touches every element; later levels only the members of the bucket chosen so far."""
    rows, vocab = probs.shape
    bits = probs.view(torch.int32)
    pcol = p.unsqueeze(1)

    def choose(hist: torch.Tensor, base: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first bucket whose mass above is < p (the last bucket's is `base` < p), and that mass."""
        above = _bucket_above(hist, base)
        b = (above >= pcol).sum(-1).clamp(max=(1 << width) - 1)
        return b, above.gather(1, b.unsqueeze(1)).squeeze(1)

    (shift, width), *finer = _LEVELS
    digit = (bits >> shift).long()
    hist = torch.zeros(rows, 1 << width, dtype=torch.float32, device=probs.device).scatter_add_(1, digit, probs)
    b, base = choose(hist, torch.zeros(rows, dtype=torch.float64, device=probs.device), width)
    t = b.to(torch.int32) << shift
    # The chosen bucket's members, flat: their row, bit pattern and probability.
    flat = (digit == b.unsqueeze(1)).view(-1).nonzero().squeeze(1)
    r = flat.div(vocab, rounding_mode="floor")
    mbits, mvals = bits.view(-1).index_select(0, flat), probs.view(-1).index_select(0, flat)
    for shift, width in finer:
        digit = (mbits >> shift) & ((1 << width) - 1)
        hist = torch.zeros(rows << width, dtype=torch.float32, device=probs.device)
        hist.index_add_(0, (r << width) + digit, mvals)
        b, base = choose(hist.view(rows, 1 << width), base, width)
        t = t | (b.to(torch.int32) << shift)
        if shift:
            keep = digit == b.to(torch.int32)[r]
            r, mbits, mvals = r[keep], mbits[keep], mvals[keep]
    return t


def top_p_threshold(probs: torch.Tensor, top_p: torch.Tensor, fast_k: int = DEFAULT_FAST_K) -> torch.Tensor:
    """The smallest kept probability of each row, as float32 (the rule in the module docstring).

    `probs`: (B, V) float32 probabilities, each row a distribution (non-negative, finite);
    `top_p`: (B,) values in (0, 1] (smaller values act as the smallest positive p). `fast_k`: the
    candidates of the topk fast path (0: histogram search for every row)."""
    rows, vocab = probs.shape
    probs = probs.contiguous()
    p = top_p.to(device=probs.device, dtype=torch.float64).clamp(min=torch.finfo(torch.float64).tiny)
    t = torch.empty(rows, dtype=torch.int32, device=probs.device)
    todo = torch.ones(rows, dtype=torch.bool, device=probs.device)
    k = min(fast_k, vocab)
    if rows and k > 0:
        # k candidates hold at most k * max: rows where that is < p (flat ones) skip the topk.
        hopeful = (probs.amax(-1).double() * k >= p).nonzero().squeeze(1)
        if hopeful.numel() == rows:
            found, t = _threshold_fast(probs, p, k)
            todo = ~found
        elif hopeful.numel():
            found, tf = _threshold_fast(probs.index_select(0, hopeful), p.index_select(0, hopeful), k)
            t[hopeful] = tf
            todo[hopeful[found]] = False
    if bool(todo.all()):
        t = _threshold_radix(probs, p)
    elif bool(todo.any()):
        idx = todo.nonzero().squeeze(1)
        t[idx] = _threshold_radix(probs.index_select(0, idx), p.index_select(0, idx))
    return t.view(torch.float32)


def _filter_rows(x: torch.Tensor, p: torch.Tensor, fast_k: int) -> None:
    """Top-p of the rows of `x` in place (p < 1 in every row)."""
    probs = torch.softmax(x, dim=-1)
    bad = ~torch.isfinite(probs[:, 0])  # NaN in one element is NaN in all: no distribution
    if bool(bad.any()):
        probs[bad] = 0.0
    t = top_p_threshold(probs, p, fast_k)
    if bool(bad.any()):
        t[bad] = 0.0  # keep everything
    x.masked_fill_(probs < t.unsqueeze(1), float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor, *, fast_k: int = DEFAULT_FAST_K,
                 inplace: bool = False, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Logits with the tokens outside each row's top-p nucleus set to -inf.

    `logits`: (B, V) float32, already divided by the temperature; `top_p`: (B,) per-row p (a
    tensor, any float dtype). Rows with p >= 1 are untouched; see the module docstring for the rule,
    ties and edge cases. With `inplace` the logits tensor itself is modified and returned. Rows are
    processed `chunk_elements // V` at a time (at least one)."""
    _check(logits, top_p)
    out = logits if inplace else logits.clone()
    rows, vocab = out.shape
    p = top_p.to(device=out.device, dtype=torch.float64)
    active = (p < 1).nonzero().squeeze(1)
    if active.numel() == 0 or vocab == 0:
        return out
    step = max(1, chunk_elements // vocab)
    whole = active.numel() == rows and out.is_contiguous()
    for first in range(0, active.numel(), step):
        if whole:  # a view of `out`, filtered in place
            _filter_rows(out[first:first + step], p[first:first + step], fast_k)
        else:
            idx = active[first:first + step]
            x = out.index_select(0, idx)
            _filter_rows(x, p.index_select(0, idx), fast_k)
            out.index_copy_(0, idx, x)
    return out


# Tokens per block of `sample_inverse_cdf`'s two-level search.
DEFAULT_SAMPLE_BLOCK = 256


def sample_inverse_cdf(logits: torch.Tensor, u: torch.Tensor, *, block: int = DEFAULT_SAMPLE_BLOCK,
                       chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """One token per row of `logits`, drawn from softmax(logits) by inverse CDF with the row's
    uniform number `u`: the first token v (in vocabulary order) whose cumulative probability
    exceeds u * (total probability). Returns int64 token ids of shape (B,).

    `logits`: (B, V) float32, already divided by the temperature and filtered (-inf: never drawn);
    `u`: (B,) numbers in [0, 1) (float64 resolves tokens down to 2^-53 of the mass; a float32 u only
    to 2^-24). For u uniform on [0, 1) the token is distributed as softmax(logits), like vLLM's
    Gumbel-max draw; it needs one random number per row instead of one per token of the vocabulary.

    Cost: a softmax (its vectorised exp is the main cost) and one pass of float32 sums over blocks
    of `block` tokens, then a search over the block totals (float64 running sums) and within the
    chosen block only. Rows are processed `chunk_elements // V` at a time, so each block of rows is
    summed while it is still in cache. On one thread 256 x 32000 logits take ~6 ms, against ~39 ms
    for vLLM's CPU `fused_gumbel_argmax` (a log and an exp per token).

    Rows with no distribution (every logit -inf, a NaN or +inf logit) get the argmax of their logits,
    which for +inf is the first +inf token."""
    if logits.dim() != 2:
        raise ValueError(f"sample_inverse_cdf: logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise ValueError(f"sample_inverse_cdf: logits must be float32, got {logits.dtype}")
    rows, vocab = logits.shape
    if u.shape != (rows,):
        raise ValueError(f"sample_inverse_cdf: u must have shape ({rows},) to match the logits' rows, "
                         f"got {tuple(u.shape)}")
    if vocab == 0:
        raise ValueError("sample_inverse_cdf: the vocabulary is empty")
    if block < 1:
        raise ValueError(f"sample_inverse_cdf: block must be >= 1, got {block}")
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return out
    u = u.to(device=logits.device, dtype=torch.float64)
    block = min(block, vocab)
    full, tail = divmod(vocab, block)
    nblk = full + (tail > 0)
    step = max(1, chunk_elements // vocab)
    sums = torch.empty(min(step, rows), nblk, dtype=torch.float32, device=logits.device)
    offsets = torch.arange(block, device=logits.device)
    for first in range(0, rows, step):
        x = logits[first:first + step]
        r = x.shape[0]
        q, bs = torch.softmax(x, -1, dtype=torch.float32), sums[:r]
        torch.sum(q[:, :full * block].view(r, full, block), -1, out=bs[:, :full])
        if tail:
            bs[:, full] = q[:, full * block:].sum(-1)
        cum = bs.double().cumsum_(-1)
        total = cum[:, -1:]
        target = u[first:first + r].unsqueeze(1) * total
        # The block: the first whose running sum exceeds the target (rounding can leave none: the last).
        j = torch.searchsorted(cum, target, right=True).clamp_(max=nblk - 1)
        before = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(target))
        cols = j * block + offsets
        inside = cols < vocab  # the tail block is shorter
        members = q.gather(1, cols.clamp(max=vocab - 1)).masked_fill_(~inside, 0.0)
        run = members.double().cumsum_(-1)
        i = torch.searchsorted(run, target - before, right=True)
        # Rounding between the block's total and its running sum can step past its last token with
        # mass: take that token instead (a token of zero mass is never drawn).
        last = torch.where(members > 0, offsets, -1).amax(-1, keepdim=True)
        i = torch.minimum(i, last.clamp(min=0))
        tok = (j * block + i).squeeze(1)
        bad = ~(torch.isfinite(total) & (total > 0)).squeeze(1)
        if bool(bad.any()):
            tok = torch.where(bad, x.argmax(-1), tok)
        out[first:first + r] = tok
    return out
