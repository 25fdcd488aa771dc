"""DeepSpeed training worker: one process per rank, launched by the train stage with torchrun or the
`deepspeed` launcher. It owns its loop (HF Trainer/accelerate mis-detect ranks on CPU gloo runs):

    policy <- pi_{r-1};  reference = pi_{r-1} (frozen, never loaded: its log-probs come with the pairs)
    for each step: loss = mean_over_pairs DPO(S_policy(y_w), S_policy(y_l), S_ref(y_w), S_ref(y_l))

Reference log-probs of generated pairs were computed by the score stage; only replay pairs need
them, and they are computed here before the first update, when the policy still equals the reference.
Rank 0 writes one JSON line of TRL-named metrics per optimiser step.

Usage: python -m selfalign.tasks.train_worker <spec.json>   (under torchrun / deepspeed)"""
from __future__ import annotations

import json
from contextlib import nullcontext
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from selfalign.kernels.losses import PAIR_LOSSES, AlphaDPOState, alpha_dpo_loss, simpo_loss
from selfalign.tasks import artifacts
from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
from selfalign.tasks.score import collate, forward_logps, load_model, logps_of


class NonFiniteLoss(RuntimeError):
    pass


class Objective:
    """The configured preference loss over one micro-batch's per-sequence sums and token counts
    (losses that need averages derive them from the same sums: no second forward). Holds the
    alpha-DPO running statistics between steps; the batch statistics are gathered across ranks."""

    def __init__(self, spec: dict, world: int):
        self.name, self.spec, self.world = spec["loss"], spec, world
        self.state = AlphaDPOState() if self.name == "alpha_dpo" else None

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.detach().contiguous())
        return torch.cat(parts)

    def __call__(self, pc, pr, rc, rr, nc, nr):
        s, name = self.spec, self.name
        if name == "alpha_dpo":
            losses, cr, rj, self.state = alpha_dpo_loss(
                pc, pr, rc, rr, nc, nr, state=self.state, beta=s["beta"], gamma_beta_ratio=s["gamma_beta_ratio"],
                alpha=s["alpha"], label_smoothing=s["label_smoothing"], mode=s["alpha_mode"],
                gather=self._gather if self.world > 1 else None)
            return losses, cr, rj
        if name == "simpo":
            return simpo_loss(pc, pr, nc, nr, beta=s["beta"], gamma_beta_ratio=s["gamma_beta_ratio"],
                              label_smoothing=s["label_smoothing"])
        fn = PAIR_LOSSES[name]
        if name in ("ipo", "sigmoid_norm"):
            return fn(pc, pr, rc, rr, nc, nr, beta=s["beta"])
        if name in ("dpo", "cdpo", "robust", "aot") or (name == "exo_pair" and s["label_smoothing"] > 0):
            return fn(pc, pr, rc, rr, beta=s["beta"], label_smoothing=s["label_smoothing"])
        return fn(pc, pr, rc, rr, beta=s["beta"])


def _ds_config(spec: dict, world: int) -> dict:
    mb = spec["micro_batch_size"]
    return {
        "train_batch_size": spec["batch_size"],
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": spec["batch_size"] // (mb * world),
        "gradient_clipping": spec["grad_clip"],
        "zero_optimization": {"stage": spec["zero_stage"]},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no JIT-compiled C++ op needed
        "bf16": {"enabled": spec["dtype"] == "bfloat16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _fill_reference_logps(model, rows: list[dict], pad_id: int, rank: int, world: int, batch_tokens: int) -> None:
    """Reference log-probs for rows that lack them (replay pairs), computed with the untouched
    start-of-round weights; ranks split the work and exchange the results."""
    missing = [i for i, r in enumerate(rows) if not math.isfinite(r["ref_chosen_logp"])]
    mine = missing[rank::world]
    seqs = [s for i in mine for s in ((rows[i]["prompt_ids"], rows[i]["chosen_ids"]), (rows[i]["prompt_ids"], rows[i]["rejected_ids"]))]
    model.eval()
    vals = logps_of(model, seqs, pad_id, batch_tokens) if seqs else []
    model.train()
    local = {i: (vals[2 * j], vals[2 * j + 1]) for j, i in enumerate(mine)}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        for part in gathered:
            local.update(part)
    for i, (c, r) in local.items():
        rows[i]["ref_chosen_logp"], rows[i]["ref_rejected_logp"] = c, r


def _index_stream(n: int, total: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < total:
        out.extend(torch.randperm(n, generator=g).tolist())
    return out[:total]


def main(spec_path: str) -> None:
    import deepspeed

    spec = json.loads(Path(spec_path).read_text())
    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(spec["threads"] or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(spec["seed"])

    tok = load_tokenizer(spec["model"], spec["trust_remote_code"])
    model = load_model(spec["model"], spec["dtype"], spec["trust_remote_code"],
                       device=f"cuda:{local_rank}" if on_gpu else "cpu")
    rows = artifacts.read_table(Path(spec["pairs"]))
    prompt_cache: dict[str, list[int]] = {}
    for r in rows:
        r["prompt_ids"] = prompt_cache.setdefault(r["prompt"], encode_prompt(tok, r["prompt"]))
        if not r["chosen_ids"]:
            r["chosen_ids"] = encode_response(tok, r["chosen"])
            r["rejected_ids"] = encode_response(tok, r["rejected"])
    if not rows:
        raise SystemExit("train: the round has no pairs")
    _fill_reference_logps(model, rows, tok.pad_token_id, rank, world, spec["batch_tokens"])

    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=_ds_config(spec, world))
    B, mb = spec["batch_size"], spec["micro_batch_size"]
    steps = spec["max_steps"] or max(1, math.ceil(spec["epochs"] * len(rows) / B))
    stream = _index_stream(len(rows), steps * B, spec["seed"])
    objective = Objective(spec, world)
    metrics_f = open(spec["metrics"], "a") if rank == 0 else None
    device = engine.device
    t0 = time.time()
    for step in range(steps):
        step_idx = stream[step * B:(step + 1) * B][rank::world]
        acc = torch.zeros(7, dtype=torch.float64)
        for m in range(0, len(step_idx), mb):
            batch = [rows[i] for i in step_idx[m:m + mb]]
            seqs = [(r["prompt_ids"], r["chosen_ids"]) for r in batch] + [(r["prompt_ids"], r["rejected_ids"]) for r in batch]
            logps, counts = forward_logps(engine, *collate(seqs, tok.pad_token_id, device))
            pc, pr = logps[:len(batch)], logps[len(batch):]
            nc, nr = counts[:len(batch)].to(pc.dtype), counts[len(batch):].to(pc.dtype)
            rc = torch.tensor([r["ref_chosen_logp"] for r in batch], dtype=pc.dtype, device=device)
            rr = torch.tensor([r["ref_rejected_logp"] for r in batch], dtype=pc.dtype, device=device)
            losses, cr, rj = objective(pc, pr, rc, rr, nc, nr)
            loss = losses.mean()
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"train: non-finite loss {loss.item()} at step {step + 1}; "
                                    "the round's model is not written")
            engine.backward(loss)
            engine.step()
            acc += torch.tensor([loss.item(), cr.mean().item(), rj.mean().item(), (cr - rj).mean().item(),
                                 (cr > rj).float().mean().item(), pc.mean().item(), pr.mean().item()],
                                dtype=torch.float64)
        acc /= max(1, math.ceil(len(step_idx) / mb))
        if world > 1:
            dist.all_reduce(acc)
            acc /= world
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise NonFiniteLoss(f"train: non-finite gradient norm at step {step + 1}")
        if metrics_f:
            names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                     "logps/chosen", "logps/rejected"]
            rec = {"step": step + 1, **dict(zip(names, acc.tolist())),
                   "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                   "seconds": time.time() - t0}
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
                print(f"train: step {step + 1}/{steps} loss {rec['loss']:.4f} "
                      f"margin {rec['rewards/margins']:+.4f} acc {rec['rewards/accuracies']:.2f}", flush=True)

    _save(engine, spec, tok, rank)
    dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def _save(engine, spec: dict, tok, rank: int) -> None:
    import deepspeed

    out = Path(spec["output"])
    params = list(engine.module.parameters())
    # ZeRO-3 shards the weights: gather them for the save (a no-op context for stages 0-2).
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if spec["zero_stage"] == 3 else nullcontext()
    with ctx:
        if rank == 0:
            engine.module.save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it; LOCAL_RANK is used
    try:
        main(ap.parse_args().spec)
    except NonFiniteLoss as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(3)
