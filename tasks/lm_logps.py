"""Log-probs of responses under a causal language model, the library scoring and training share:
loading a model (safetensors only), token-budget batches, padding-free packed rows with their
attention path (`packing_path`), the fused LM head where the model allows it (`fused_head_ok`), and
summed response log-probs of many sequences (`logps_of`), also under MRPO references with another
tokenizer (`reference_logps`)."""
from __future__ import annotations

import logging
import math
import weakref
from contextlib import contextmanager
from typing import Callable, Sequence

import torch

from selfalign.kernels.logps import sequence_logps, token_logps
from selfalign.kernels.logps_fused import linear_token_logps
from selfalign.kernels.packing import (Packed, flash_varlen_attention, pack, pack_rows, packed_sequence_logps,
                                       to_device, torch_varlen_available, varlen_attention)
from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
from selfalign.tasks.transformers_compat import attn_implementation

Seq = tuple[Sequence[int], Sequence[int]]  # (prompt ids, response ids)
log_paths = logging.getLogger("selfalign.tasks.lm_logps")  # which attention and LM-head path a model takes


def load_model(path: str, dtype: str = "float32", trust_remote_code: bool = False, device: str | None = None):
    from transformers import AutoModelForCausalLM

    # safetensors only: a pickled checkpoint (pytorch_model.bin) is refused, not unpickled
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True)
    model.eval()
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def token_budget_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that (longest length in the batch) x (batch size) stays within
    `batch_tokens`; sorted by length so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, longest = [], [], 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if cur and new_longest * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, new_longest = [], lengths[i]
        cur.append(i)
        longest = new_longest
    if cur:
        batches.append(cur)
    return batches


def collate(seqs: Sequence[Seq], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and shifted labels (-100 on prompt and padding)."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[b, :n] = torch.tensor(list(p) + list(r))
        attn[b, :n] = 1
        # labels[t] is the token predicted at position t, i.e. input t+1
        labels[b, len(p) - 1 : n - 1] = torch.tensor(list(r))
    ids, attn, labels = to_device(torch.stack([ids, attn, labels]), device)
    return ids, attn, labels


# Config attributes of architectures whose logits are not plain lm_head(last hidden state).
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_fused_ok: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def fused_head_ok(model) -> bool:
    """Whether the causal LM's logits are exactly ``lm_head(decoder(x).last_hidden_state)``, so the
    fused LM-head kernel can replace them. False for models that post-process logits (soft-capping,
    logit scaling) or whose output layer is not a linear layer. Checked once per model object against
    the model's own logits on a short input, and the path taken is logged."""
    if model in _fused_ok:
        return _fused_ok[model]
    head = model.get_output_embeddings()
    cfg = model.config
    why = ""
    if not isinstance(head, torch.nn.Linear):
        why = f"output layer is {type(head).__name__}, not Linear"
    elif any(getattr(cfg, k, None) not in (None, 0, 1, 0.0, 1.0) for k in _LOGIT_POSTPROCESSING):
        why = "the model post-processes its logits"
    else:
        device = next(model.parameters()).device
        ids = (torch.arange(8, device=device) * 7 % head.weight.shape[0]).unsqueeze(0)
        training = model.training
        model.eval()  # dropout would make two passes differ
        want = model(input_ids=ids, use_cache=False).logits.float()
        got = head(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state).float()
        model.train(training)
        tol = 1e-4 if head.weight.dtype == torch.float32 else 5e-2
        if not torch.allclose(got, want, rtol=tol, atol=tol):
            why = f"lm_head(decoder(x)) differs from the model's logits by {(got - want).abs().max().item():.3g}"
    _fused_ok[model] = not why
    log_paths.info("log-probs of %s: %s", type(model).__name__,
                   "fused LM head (no full logits)" if not why else f"full logits ({why})")
    return not why


def response_token_logps(model, ids, attn, labels, fused: bool, hidden: bool = False):
    """Per-token log-probs of the labels (0 on masked positions) and, if `hidden`, the final hidden
    states (B, T, H). fused=True: the base model's final hidden states go through the fused LM-head
    kernel with the output layer's weight (tied to the input embedding or not, it is the same
    Parameter), so no (tokens x vocab) logits are ever held; fused=False: the model's own logits,
    through the chunked log-softmax. Both give the same numbers (see tests/test_score.py)."""
    if fused:
        h = model.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        return linear_token_logps(h, head.weight, labels, bias=head.bias), (h if hidden else None)
    out = model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=hidden)
    return token_logps(out.logits, labels), (out.hidden_states[-1] if hidden else None)


def forward_logps(model, ids, attn, labels, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts of a collated batch of a Hugging Face
    causal LM. fused=None: the fused LM head wherever ``fused_head_ok(model)``."""
    if fused is None:
        fused = fused_head_ok(model)
    tok_lp, _ = response_token_logps(model, ids, attn, labels, fused)
    return sequence_logps(tok_lp, labels)


# Attention over a packed row (kernels/packing.py), by the model's attention implementation:
#   flash_varlen  sdpa/eager models on a CUDA device in fp16/bf16, where torch has varlen_attn: the
#           whole row in one flash-attention call per layer (registered as below);
#   varlen  sdpa/eager models: our per-sequence causal SDPA, registered with transformers'
#           AttentionInterface and switched on for the packed forward only (work ~ sum of l^2);
#   flash   flash_attention_2/3 models: their own varlen kernels, given the cu_seqlens;
#   mask    otherwise: transformers builds the block-diagonal causal mask from the restarting
#           position ids (no attention mask passed; O(T^2) per row).
_VARLEN = "selfalign_varlen"
_ATTENTION = {"varlen": (_VARLEN, varlen_attention), "flash_varlen": ("selfalign_flash_varlen", flash_varlen_attention)}
_packing_path: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


@contextmanager
def packed_attention(model, packed: Packed, path: str):
    """The extra forward keyword arguments for `packed` under attention `path` (see above)."""
    if path == "flash":
        yield packed.flash_kwargs()
        return
    if path not in _ATTENTION:
        yield {}
        return
    from transformers import AttentionInterface

    name, fn = _ATTENTION[path]
    AttentionInterface.register(name, fn)
    impl = attn_implementation(model)
    model.set_attn_implementation(name)  # no mask is built for it: the packing is the mask
    try:
        yield {"packed": packed}
    finally:
        model.set_attn_implementation(impl)


def packed_logps(model, packed: Packed, fused: bool, path: str, hidden: bool = False):
    """Summed response log-probs and response token counts of every sequence of a packed row (in
    packing order), and, if `hidden`, the final hidden states (1, T, H). The LM head runs on the
    response positions only (the fused kernel on their hidden states; the logits path slices them)."""
    base = model.get_decoder() if fused else model
    with packed_attention(model, packed, path) as kw:
        out = base(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                   output_hidden_states=hidden and not fused, **kw)
    sel = packed.label_pos if packed.label_pos is not None else (packed.labels[0] != -100).nonzero().view(-1)
    labels, seq_ids = packed.labels[0].index_select(0, sel), packed.seq_ids.index_select(0, sel)
    if fused:
        h = out.last_hidden_state
        head = model.get_output_embeddings()
        tok_lp = linear_token_logps(h[0].index_select(0, sel), head.weight, labels, bias=head.bias)
    else:
        h = out.hidden_states[-1] if hidden else None
        tok_lp = token_logps(out.logits[0].index_select(0, sel), labels)
    sums, counts = packed_sequence_logps(tok_lp, labels, seq_ids, packed.n)
    return sums, counts, (h if hidden else None)


@torch.no_grad()
def packing_path(model) -> str:
    """The attention path for packed rows (see `packed_attention`), or "" when packing would change
    the model's numbers (then callers pad). Checked once per model object: a packed row of two short
    sequences must give each one's hidden states alone, to 1e-4 (float32) / 5e-2 (16-bit); the path
    taken is logged."""
    if model in _packing_path:
        return _packing_path[model]
    impl = attn_implementation(model)
    first = "flash" if impl.startswith("flash_attention") else "varlen" if impl in ("sdpa", "eager") else "mask"
    device = next(model.parameters()).device
    candidates = (first, "mask")
    if (first == "varlen" and torch_varlen_available(device, next(model.parameters()).dtype)
            and not getattr(model.config, "attention_dropout", 0.0)):  # it has no dropout
        candidates = ("flash_varlen", "varlen", "mask")
    vocab = model.get_input_embeddings().weight.shape[0]
    seqs = [([(7 * i + 3) % vocab for i in range(3)], [(5 * i + 1) % vocab for i in range(4)]),
            ([(11 * i + 2) % vocab for i in range(2)], [(3 * i + 4) % vocab for i in range(7)])]
    packed = pack(seqs, device)
    training = model.training
    model.eval()
    decoder = model.get_decoder()
    want = [decoder(input_ids=torch.tensor([list(p) + list(r)], device=device), use_cache=False).last_hidden_state[0]
            for p, r in seqs]
    want = torch.cat(want).float()
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    chosen, why = "", []
    for path in dict.fromkeys(candidates):
        try:
            with packed_attention(model, packed, path) as kw:
                got = decoder(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                              **kw).last_hidden_state[0].float()
        except (TypeError, ValueError, RuntimeError) as e:  # a forward without position ids or kwargs
            why.append(f"{path}: {type(e).__name__}: {e}")
            continue
        err = (got - want).abs().max().item()
        if err <= tol * (1 + want.abs().max().item()):
            chosen = path
            break
        why.append(f"{path}: differs by {err:.3g}")
    model.train(training)
    _packing_path[model] = chosen
    log_paths.info("packed sequences in %s (%s attention): %s", type(model).__name__, impl,
                   f"{chosen} path" if chosen else f"padding instead ({'; '.join(why)})")
    return chosen


@torch.inference_mode()
def logps_of(model, seqs: Sequence[Seq], pad_id: int, batch_tokens: int = 16384,
             progress: Callable[[int, int], None] | None = None, fused: bool | None = None,
             packing: bool = False, part: tuple[int, int] | None = None) -> list[float]:
    """Summed response log-prob of every (prompt, response) under `model`, in input order.
    packing=False: padded batches of at most `batch_tokens` (longest x count), sorted by length;
    packing=True: rows of at most `batch_tokens` real tokens, no padding (where `packing_path`
    allows it for this model). part=(w, n): only batches w, w+n, ... of that plan; the others'
    sequences are None."""
    device = next(model.parameters()).device
    fused = fused_head_ok(model) if fused is None else fused
    path = packing_path(model) if packing else ""
    lengths = [len(p) + len(r) for p, r in seqs]
    out = [math.nan] * len(seqs)
    batches = pack_rows(lengths, batch_tokens) if path else token_budget_batches(lengths, batch_tokens)
    if part is not None:
        out = [None] * len(seqs)
        batches = batches[part[0]::part[1]]
        seqs_total = sum(map(len, batches))
    done = 0

    def collect(batch: list[int], sums: torch.Tensor) -> None:  # waits for that batch only
        nonlocal done
        for i, v in zip(batch, sums.float().tolist()):
            out[i] = v
        done += len(batch)
        if progress:
            progress(done, len(seqs) if part is None else seqs_total)

    prev = None
    for batch in batches:
        if path:
            sums, _, _ = packed_logps(model, pack([seqs[i] for i in batch], device), fused, path)
        else:
            sums, _ = forward_logps(model, *collate([seqs[i] for i in batch], pad_id, device), fused=fused)
        if prev is not None:  # on a GPU this batch is queued before the host waits for the previous one
            collect(*prev)
        prev = (batch, sums)
    if prev is not None:
        collect(*prev)
    return out


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers give the same ids for every text and chat (same class, serialised
    fast tokenizer, chat template and EOS). Anything else counts as different, which only costs a
    re-tokenisation of the text."""
    if type(a) is not type(b) or a.chat_template != b.chat_template or a.eos_token_id != b.eos_token_id:
        return False
    return bool(a.is_fast and b.is_fast and a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str())


# (prompt text, response text, the policy's prompt ids, the policy's response ids)
Item = tuple[str, str, Sequence[int], Sequence[int]]


def reference_logps(model_path: str, tokenizer_path: str, policy_tok, items: Sequence[Item], *,
                    dtype: str = "float32", trust_remote_code: bool = False, batch_tokens: int = 16384,
                    device: str | None = None, progress: Callable[[int, int], None] | None = None,
                    packing: bool = False, part: tuple[int, int] | None = None) -> list[float]:
    """Summed response log-probs of `items` under an additional (MRPO) reference model.

    A reference with the policy's tokenizer scores the policy's own ids (for generated samples: the
    exact ids the policy sampled). A reference with another tokenizer (`tokenizer_path`, or the one
    saved with the model) scores the same *text*, re-tokenised with its own tokenizer and chat
    template: token ids of one vocabulary are never fed to another. Sums over different
    tokenisations of one text are comparable, since both are log-probs of that text."""
    tok = load_tokenizer(tokenizer_path or model_path, trust_remote_code)
    if same_tokenizer(tok, policy_tok):
        seqs: list[Seq] = [(pids, rids) for _, _, pids, rids in items]
    else:
        prompts: dict[str, list[int]] = {}
        seqs = []
        for prompt, response, _, _ in items:
            if prompt not in prompts:
                prompts[prompt] = encode_prompt(tok, prompt)
            seqs.append((prompts[prompt], encode_response(tok, response)))
    model = load_model(model_path, dtype, trust_remote_code, device)
    out = logps_of(model, seqs, tok.pad_token_id, batch_tokens, progress, packing=packing, part=part)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out
