"""Padding-free packing: many (prompt, response) token sequences in one row, no FLOPs on padding.

A padded batch of sequences with lengths l_1..l_n costs n * max(l) tokens in every linear layer and
n * max(l)^2 in attention; a packed row costs sum(l) and sum(l^2). For one row holding sequences
s_1..s_n back to back (T = sum l_i tokens):

    input_ids    = s_1 ++ s_2 ++ ... ++ s_n                               (1, T)
    position_ids = 0..l_1-1 ++ 0..l_2-1 ++ ...   (restart per sequence: RoPE sees each one alone)
    labels[t]    = input_ids[t + 1] where t+1 is a response token of the same sequence, else -100
                   (the prompt is masked; a sequence's last position never predicts the next one)
    attention    causal inside each sequence, none across sequences (block-diagonal causal)

so every per-token log-prob equals the padded computation's, and per-sequence sums are segment sums
(`packed_sequence_logps`). Chosen and rejected of a DPO pair go into one row (one forward).

Attention, three ways (the caller picks by the model's attention implementation):
* ``varlen_attention``: causal SDPA per sequence, on views of the row (no gather, no padding): runs
  of consecutive sequences of equal length go through one batched SDPA call. Work ~ sum l^2,
  memory O(T). Plugged into Hugging Face models as an attention function (the signature of
  transformers' ``AttentionInterface``), the packing passed as the ``packed=`` keyword. Rows whose
  sequences come sorted by length (``pack_rows``) make long runs, so few calls per layer.
* ``flash_varlen_attention``: the whole row in one kernel call, torch's own varlen flash attention
  (``torch.nn.attention.varlen.varlen_attn``: CUDA, fp16/bf16, no dropout) given the row's
  ``cu_seqlens``. On a GPU the per-run SDPA calls above cost ~45 us of CPU each, so small models
  wait on kernel launches; this makes it one call per layer.
* flash-attention varlen kernels (``cu_seqlens``; Hugging Face's flash_attention_2/3 take
  ``cu_seq_lens_q/k`` and ``max_length_q/k``), where installed.
* ``block_causal_mask``: the explicit (1, 1, T, T) mask; O(T^2) work and memory. The reference the
  others are tested against (transformers >= 4.54 also builds it itself from packed position_ids
  when no attention mask is given, for sdpa/eager/flex).

Pure torch; no model code here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["Packed", "pack", "to_device", "pack_rows", "packed_sequence_logps", "varlen_attention", "flash_varlen_attention",
           "torch_varlen_available", "block_causal_mask"]

Seq = tuple[Sequence[int], Sequence[int]]  # (prompt ids, response ids)


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Indices of sequences grouped into rows of at most `row_tokens` tokens (first-fit decreasing:
    longest first, each into the first row with room). A sequence longer than `row_tokens` gets a
    row of its own. Rows come out longest-sequence first; indices within a row by decreasing length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_tokens - n)
    return rows


@dataclass
class Packed:
    """One packed row of n sequences, T tokens (see the module docstring).

    input_ids, position_ids, labels: (1, T) long.  seq_ids: (T,) long, the sequence of each token.
    cu_seqlens: (n + 1,) int32 start offsets (flash-attention convention), max_len: max l_i.
    runs: (first token, number of sequences, their common length) of each run of consecutive
    sequences of equal length, in row order (what `varlen_attention` batches together).
    label_pos: (R,) long, the row positions whose label is not -100, in order: selecting them
    with it (index_select) instead of a boolean mask keeps the host from waiting on the device."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    seq_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    runs: list[tuple[int, int, int]]
    label_pos: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.cu_seqlens.numel() - 1

    def flash_kwargs(self) -> dict:
        """Keyword arguments of Hugging Face's flash-attention varlen path."""
        cu = self.cu_seqlens
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": self.max_len, "max_length_k": self.max_len}


def to_device(host: torch.Tensor, device=None) -> torch.Tensor:
    """`host` on `device` (None: where it is). To a CUDA device in one copy from pinned memory that
    does not wait for the device, so the host can prepare the next batch meanwhile."""
    if device is None:
        return host
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def pack(seqs: Sequence[Seq], device=None) -> Packed:
    """Packs (prompt ids, response ids) sequences, in the given order, into one row.

    The row's tensors are built on the host in one buffer and reach a CUDA device in one copy from
    pinned memory that does not wait for the device: the next row can be packed while the current
    one runs."""
    if not seqs:
        raise ValueError("pack: no sequences")
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    lengths: list[int] = []
    runs: list[tuple[int, int, int]] = []
    for p, r in seqs:
        p, r = list(p), list(r)
        if not p:
            raise ValueError("pack: a sequence has an empty prompt (its first response token would have no predictor)")
        n = len(p) + len(r)
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, n)
        else:
            runs.append((len(ids), 1, n))
        lengths.append(n)
        ids += p + r
        pos += range(n)
        # position t predicts token t+1: prompt positions but the last one, and the final position, are masked
        labels += [-100] * (len(p) - 1) + r + [-100]
    T, n = len(ids), len(seqs)
    lens = torch.tensor(lengths)
    lab = torch.tensor(labels)
    label_pos = (lab != -100).nonzero().view(-1)
    cu = torch.zeros(n + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lens, 0)
    # one host buffer: ids | positions | labels | sequence of each token | labelled positions | offsets
    host = torch.cat([torch.tensor(ids), torch.tensor(pos), lab, torch.repeat_interleave(torch.arange(n), lens),
                      label_pos, cu])
    parts = to_device(host, device).split([T, T, T, T, label_pos.numel(), n + 1])
    return Packed(input_ids=parts[0].view(1, T), position_ids=parts[1].view(1, T), labels=parts[2].view(1, T),
                  seq_ids=parts[3], cu_seqlens=parts[5].to(torch.int32), max_len=max(lengths), runs=runs,
                  label_pos=parts[4])


def packed_sequence_logps(token_lp: torch.Tensor, labels: torch.Tensor, seq_ids: torch.Tensor, n: int,
                          ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of token log-probs over labelled positions, and their counts, of a packed row.

    sums[i] = sum_{t: seq_ids[t] = i, labels[t] != ignore} token_lp[t];  counts[i] = #{those t}.
    token_lp, labels: (1, T) or (T,); seq_ids (T,). Gradients flow to token_lp."""
    lp, lab = token_lp.reshape(-1), labels.reshape(-1)
    mask = lab != ignore_index
    vals = torch.where(mask, lp, torch.zeros_like(lp))
    sums = torch.zeros(n, dtype=vals.dtype, device=vals.device).index_add(0, seq_ids, vals)
    counts = torch.zeros(n, dtype=torch.long, device=vals.device).index_add(0, seq_ids, mask.long())
    return sums, counts


def _check_packed_call(name: str, packed: Packed | None, attention_mask, query: torch.Tensor) -> Packed:
    """What an attention function over a packed row needs: the packing, no mask, one row. Returns the packing."""
    if packed is None:
        raise ValueError(f"{name} needs packed=<Packed>: the sequence boundaries")
    if attention_mask is not None:
        raise ValueError(f"{name}: pass no attention mask with a packed row")
    if query.shape[0] != 1:
        raise ValueError(f"{name}: a packed row has batch size 1, got {query.shape[0]}")
    return packed


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     scaling: float | None = None, dropout: float = 0.0, packed: Packed | None = None, **kwargs):
    """Causal attention inside each packed sequence (see the module docstring).

    query (1, Hq, T, D), key/value (1, Hk, T, D) with Hq a multiple of Hk (grouped-query attention);
    returns ((1, T, Hq, D), None), the shape and tuple of transformers' attention functions.
    `attention_mask` must be None: the packing is the mask."""
    packed = _check_packed_call("varlen_attention", packed, attention_mask, query)
    hq, hk = query.shape[1], key.shape[1]
    p = dropout if module is None or module.training else 0.0
    outs = []
    for start, count, length in packed.runs:
        # (1, H, count * length, D) -> (count, H, length, D): a view, the row is not copied
        q, k, v = (x[0, :, start:start + count * length].unflatten(1, (count, length)).transpose(0, 1)
                   for x in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=scaling, enable_gqa=hq != hk)
        outs.append(o.transpose(1, 2).reshape(count * length, hq, -1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.unsqueeze(0), None


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_PARAMS: dict = {}


def _parameters(fn) -> frozenset:
    """The parameter names of `fn`, read once (every layer of every forward asks)."""
    if fn not in _PARAMS:
        import inspect

        _PARAMS[fn] = frozenset(inspect.signature(fn).parameters)
    return _PARAMS[fn]


def torch_varlen_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `flash_varlen_attention` can run here: torch has varlen_attn, a CUDA device, fp16/bf16."""
    return (_torch_varlen() is not None and torch.device(device).type == "cuda"
            and dtype in (torch.float16, torch.bfloat16))


def flash_varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                           scaling: float | None = None, dropout: float = 0.0, packed: Packed | None = None,
                           **kwargs):
    """Causal attention inside each packed sequence in one call of torch's varlen flash attention
    (see the module docstring); the same arguments and result as `varlen_attention`. Adapts to the
    signature of the installed torch: causal as ``is_causal=True`` or as ``window_size=(-1, 0)``;
    grouped-query attention through ``enable_gqa`` or by repeating the key/value heads."""
    varlen_attn = _torch_varlen()
    if varlen_attn is None:
        raise RuntimeError("flash_varlen_attention: this torch has no torch.nn.attention.varlen")
    packed = _check_packed_call("flash_varlen_attention", packed, attention_mask, query)
    if dropout and (module is None or module.training):
        raise ValueError("flash_varlen_attention: torch's varlen attention has no dropout")
    params = _parameters(varlen_attn)
    hq, hk = query.shape[1], key.shape[1]
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (T, H, D)
    kw: dict = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if hq != hk:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(hq // hk, dim=1) for x in (k, v))
    if scaling is not None:
        if "scale" in params:
            kw["scale"] = scaling
        elif abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
            raise ValueError("flash_varlen_attention: this torch's varlen_attn takes no scale")
    cu = packed.cu_seqlens  # int32, on the row's device (pack)
    out = varlen_attn(q, k, v, cu, cu, packed.max_len, packed.max_len, **kw)
    return out.unsqueeze(0), None  # (1, T, Hq, D)


def block_causal_mask(cu_seqlens: torch.Tensor, device=None) -> torch.Tensor:
    """(1, 1, T, T) bool mask, True where query t may attend key s: same sequence and s <= t."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
    seq = torch.repeat_interleave(torch.arange(len(lens)), lens)
    t = torch.arange(len(seq))
    mask = (seq[:, None] == seq[None, :]) & (t[None, :] <= t[:, None])
    return mask[None, None].to(device if device is not None else cu_seqlens.device)
