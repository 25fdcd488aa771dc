"""Score stage: the DPO implicit reward of every sample,
    score(x, y) = S_policy(y | x) - S_reference(y | x),
with S the summed log-prob of the response tokens (prompt masked, end-of-turn token counted), no beta
and no length normalisation (ALGORITHMS.md §2.4). The same pass scores the held-out offline pairs, so
the round knows how well this reward ranks pairs a human labelled (the guard reads it)."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from selfalign.kernels.logps import sequence_logps, token_logps
from selfalign.tasks import artifacts
from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer

Seq = tuple[Sequence[int], Sequence[int]]  # (prompt ids, response ids)


def load_model(path: str, dtype: str = "float32", trust_remote_code: bool = False, device: str | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
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
    return ids.to(device), attn.to(device), labels.to(device)


def forward_logps(model, ids, attn, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts of a collated batch."""
    logits = model(input_ids=ids, attention_mask=attn).logits
    return sequence_logps(token_logps(logits, labels), labels)


@torch.inference_mode()
def logps_of(model, seqs: Sequence[Seq], pad_id: int, batch_tokens: int = 16384,
             progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Summed response log-prob of every (prompt, response) under `model`, in input order."""
    device = next(model.parameters()).device
    out = [math.nan] * len(seqs)
    done = 0
    for batch in token_budget_batches([len(p) + len(r) for p, r in seqs], batch_tokens):
        sums, _ = forward_logps(model, *collate([seqs[i] for i in batch], pad_id, device))
        for i, v in zip(batch, sums.float().tolist()):
            out[i] = v
        done += len(batch)
        if progress:
            progress(done, len(seqs))
    return out


def pair_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float:
    """Fraction of pairs whose chosen response gets the higher implicit reward."""
    if not chosen_scores:
        return math.nan
    return sum(c > r for c, r in zip(chosen_scores, rejected_scores)) / len(chosen_scores)


def run_score(cfg, samples_path: Path, policy: str, reference: str, heldout: list[dict[str, str]],
              out_path: Path, log=print) -> dict[str, Any]:
    """Adds `policy_logp`, `ref_logp`, `score` to every finished sample (NaN for truncated ones,
    which the pair stage drops anyway) and scores the held-out pairs with the same reward."""
    t0 = time.time()
    samples = artifacts.read_table(samples_path)
    tok = load_tokenizer(policy, cfg.model.trust_remote_code)
    prompt_ids = {}
    def pids(prompt: str) -> list[int]:
        if prompt not in prompt_ids:
            prompt_ids[prompt] = encode_prompt(tok, prompt)
        return prompt_ids[prompt]

    live = [i for i, s in enumerate(samples) if s["finish_reason"] == "stop"]
    seqs: list[Seq] = [(pids(samples[i]["prompt"]), samples[i]["response_ids"]) for i in live]
    for h in heldout:
        seqs.append((pids(h["prompt"]), encode_response(tok, h["chosen"])))
        seqs.append((pids(h["prompt"]), encode_response(tok, h["rejected"])))

    result = {}
    for name, path in (("policy", policy), ("ref", reference)):
        model = load_model(path, cfg.model.dtype, cfg.model.trust_remote_code)
        every = max(1, len(seqs) // 4)
        def progress(done, total, name=name):
            if done == total or done // every != (done - 1) // every:
                log(f"score[{name}]: {done}/{total} sequences")
        result[name] = logps_of(model, seqs, tok.pad_token_id, cfg.score.batch_tokens, progress)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    for s in samples:
        s["policy_logp"] = s["ref_logp"] = s["score"] = math.nan
    for j, i in enumerate(live):
        s = samples[i]
        s["policy_logp"], s["ref_logp"] = result["policy"][j], result["ref"][j]
        s["score"] = s["policy_logp"] - s["ref_logp"]
    artifacts.write_table(out_path, samples)

    n = len(live)
    rewards = [p - r for p, r in zip(result["policy"][n:], result["ref"][n:])]
    acc = pair_accuracy(rewards[0::2], rewards[1::2])
    stats = {"score/seconds": time.time() - t0, "score/sequences": len(seqs),
             "eval/pair_accuracy": acc, "score/heldout_pairs": len(heldout)}
    log(f"score: {len(seqs)} sequences in {stats['score/seconds']:.1f}s; "
        f"implicit reward ranks {acc:.3f} of {len(heldout)} held-out pairs correctly")
    return stats
