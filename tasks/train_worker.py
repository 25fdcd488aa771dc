"""DeepSpeed training worker: one process per rank, launched by the train stage with torchrun or the
`deepspeed` launcher. `main` is setup -> train -> save; a step is `train_step` over
`micro_batch_loss`. The loss dispatch (`Objective`) is in train_objective; references, the guard,
checkpoints, LoRA and the rendezvous are in train_refs, train_guard, train_ckpt, lora and train_nodes.
It owns its loop (HF Trainer/accelerate mis-detect ranks on CPU gloo runs):

    policy <- pi_{r-1};  reference = pi_{r-1} (frozen, never loaded: its log-probs come with the pairs)
    for each step: loss = mean_over_pairs L(S_policy(y_w), S_policy(y_l), S_ref(y_w), S_ref(y_l), ...)

S_policy comes from the model's final hidden states through the fused LM-head kernel
(`kernels/logps_fused.py::linear_token_logps`): full (tokens x vocab) logits never exist in training
(models that post-process their logits, see `lm_logps.fused_head_ok`, keep the logits path).
Reference log-probs of generated pairs were computed by the score stage; only replay pairs need
them, and they are computed here before the first update, when the policy still equals the reference
(MRPO's additional references likewise, each with its own model and tokenizer). HPO's auxiliary
rewards are evaluated here on every pair's chosen and rejected response, and its value head is
trained alongside the policy (outside the DeepSpeed engine, so that its loss never enters the
policy's gradient clipping). Rank 0 writes one JSON line of TRL-named metrics per optimiser step.
Every `checkpoint_every` steps the worker saves a DeepSpeed checkpoint (plus the step, RNG and loss
state) and, started again, resumes from the latest; a NaN or inf loss stops it (exit 3) before
anything of that step is saved, and so does a NaN or inf gradient on any rank (`GradGuard`), before
the optimizer steps of the policy and of the value head.
With LoRA (`spec["lora"]`, peft) only the adapters train; the reference is the same model with its
adapter disabled, never a second copy; checkpoints hold the trainable state only, and the round's
model is saved with the adapter merged (the adapter alone beside it).

Usage: python -m selfalign.tasks.train_worker <spec.json>   (under torchrun / deepspeed)"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from selfalign.kernels.logps import sequence_logps
from selfalign.kernels.packing import pack, to_device
from selfalign.tasks import artifacts
from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
from selfalign.tasks.lm_logps import (collate, fused_head_ok, load_model, packed_logps, packing_path,
                                      response_token_logps)
from selfalign.tasks.lora import lora_reference, save_lora, wrap_lora
from selfalign.tasks.train_ckpt import client_state, resume, save_checkpoint, truncate_metrics
from selfalign.tasks.train_guard import FAULT_NAN_STEP, GradGuard, NonFiniteLoss
from selfalign.tasks.train_objective import Objective, RowColumns
from selfalign.tasks.train_nodes import init_process_group
from selfalign.tasks.train_refs import fill_aux_rewards, fill_mrpo_reference_logps, fill_reference_logps, open_cache


class Policy(torch.nn.Module):
    """What DeepSpeed trains: the causal LM, mapping a collated batch to per-sequence summed log-probs
    and token counts, plus (HPO, `value_at` given) the detached final hidden states at the positions
    `value_at` of the first rows: the features of the value head V(x) (see `value_head`).

    fused=True: the base model's final hidden states go through the fused LM-head kernel (never full
    logits); tied input/output embeddings are one Parameter, so its gradient gets both uses. Under
    ZeRO-3 the head weight is partitioned and DeepSpeed gathers a module's parameters around that
    module's own forward, which the fused path bypasses: the weight is registered as an external
    parameter of this module, so it is gathered for this module's forward and backward (DeepSpeed
    0.19 would also discover it on first access; the explicit registration does not rely on that).
    tests/test_train.py checks that ZeRO-3 with a partitioned head trains the same model as ZeRO-2.
    fused=False: the model's own logits (for models that post-process their logits)."""

    def __init__(self, lm, fused: bool, zero3: bool = False, packing: str = ""):
        super().__init__()
        self.lm, self.fused, self.packing = lm, fused, packing
        head = lm.get_output_embeddings()
        if zero3 and fused:
            import deepspeed

            for p in (head.weight, head.bias):
                if p is not None:
                    deepspeed.zero.register_external_parameter(self, p)

    def forward(self, ids=None, attn=None, labels=None, value_at=None, packed=None):
        if packed is not None:  # one padding-free row (`packing` is its attention path); value_at: row positions
            sums, counts, hidden = packed_logps(self.lm, packed, self.fused, self.packing, hidden=value_at is not None)
            return (sums, counts) if value_at is None else (sums, counts, hidden[0, value_at].detach())
        tok_lp, hidden = response_token_logps(self.lm, ids, attn, labels, self.fused, hidden=value_at is not None)
        sums, counts = sequence_logps(tok_lp, labels)
        if value_at is None:
            return sums, counts
        return sums, counts, hidden[torch.arange(len(value_at), device=hidden.device), value_at].detach()


def value_head(hidden_size: int, device) -> torch.nn.Linear:
    """HPO's value network V(x): a float32 linear layer on the final hidden state of the prompt's
    last token (detached: the policy's features are read, not trained, by its loss), zero-initialised
    so that the first advantages are the auxiliary rewards themselves. It has its own optimizer,
    outside the DeepSpeed engine: a fresh head's large early gradients must not take over the global
    gradient-norm clipping of the policy."""
    head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32, device=device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


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


def _index_stream(n: int, total: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < total:
        out.extend(torch.randperm(n, generator=g).tolist())
    return out[:total]


def die_with_parent_or_exit() -> None:
    """torchrun starts each worker in a session of its own, so killing the run's process group
    (or the launcher alone) would leave the worker training beside a rerun: Linux sends it SIGKILL
    when its parent goes."""
    if sys.platform.startswith("linux"):
        import signal

        from selfalign.tasks.procs import die_with_parent

        die_with_parent(signal.SIGKILL)
        if os.getppid() == 1:  # the parent went before the call
            os._exit(1)


@dataclass
class Run:
    """What set-up hands to the training loop and the save: the engine and its model, the pairs with
    every number their loss reads, and this rank's share of the steps."""
    spec: dict
    rank: int
    world: int
    tok: Any
    rows: list[dict]
    cols: RowColumns
    engine: Any  # DeepSpeedEngine around Policy
    lora: Any  # the peft model, or None
    packing: str  # the packed rows' attention path ("": padded batches)
    objective: Objective
    guard: GradGuard
    policy_params: list[torch.nn.Parameter]
    vhead: torch.nn.Linear | None  # HPO's value head and its optimizer
    vopt: torch.optim.Optimizer | None
    n_micro: int  # micro-batches per step on this rank
    steps: int
    stream: list[int]  # the pairs' order: step s takes stream[s * batch_size:(s + 1) * batch_size]


def main(spec_path: str) -> None:
    die_with_parent_or_exit()
    run = setup(json.loads(Path(spec_path).read_text()))
    train(run)
    save(run)
    dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def setup(spec: dict) -> Run:
    """The process group, the model (LoRA-wrapped if asked), the pairs with their reference
    log-probs (and MRPO's, HPO's numbers), the DeepSpeed engine and the guard."""
    import deepspeed

    on_gpu = torch.cuda.is_available()
    init_process_group("nccl" if on_gpu else "gloo")
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # processes on this node (torchrun and local: LOCAL_WORLD_SIZE; the deepspeed launcher: LOCAL_SIZE)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
    if on_gpu:
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(spec["threads"] or max(1, (os.cpu_count() or 1) // local_world))
    torch.manual_seed(spec["seed"])

    tok = load_tokenizer(spec["model"], spec["trust_remote_code"])
    device_name = f"cuda:{local_rank}" if on_gpu else "cpu"
    model = load_model(spec["model"], spec["dtype"], spec["trust_remote_code"], device=device_name)
    rows = load_pairs(spec, tok)
    lora = wrap_lora(model, spec["lora"]) if spec.get("lora") else None
    if lora is not None and rank == 0:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"train: LoRA r={spec['lora']['r']} alpha={spec['lora']['alpha']} on {spec['lora']['target_modules']}: "
              f"{n_train} trainable parameters of {n_all} ({100 * n_train / n_all:.2f}%)", flush=True)
    with lora_reference(lora):  # the adapter disabled: the start-of-round model, whose cache this is
        fill_reference_logps(model, rows, tok.pad_token_id, rank, world, spec["batch_tokens"], spec["packing"],
                              cache=open_cache(spec, spec["model"], rank, world, device_name))
    if spec["loss"] == "mrpo":
        fill_mrpo_reference_logps(rows, spec, tok, rank, world, device_name)
    if spec["loss"] == "hpo":
        fill_aux_rewards(rows, spec, rank, world)

    hidden_size = model.get_output_embeddings().weight.shape[1]  # before ZeRO-3 partitions it
    packing = packing_path(model) if spec["packing"] else ""
    policy = Policy(model, fused_head_ok(model), zero3=spec["zero_stage"] == 3, packing=packing)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=spec["weight_decay"])
    engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer, config=_ds_config(spec, world))
    vhead = vopt = None
    if spec["loss"] == "hpo":
        vhead = value_head(hidden_size, engine.device)
        vopt = torch.optim.AdamW(vhead.parameters(), lr=spec["hpo"]["value_lr"], weight_decay=0.0)
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    policy_params = [p for _, p in named]
    if vhead is not None:
        named += [(f"value_head.{n}", p) for n, p in vhead.named_parameters()]
    B, mb = spec["batch_size"], spec["micro_batch_size"]
    n_micro = max(1, math.ceil(len(range(rank, B, world)) / mb))
    steps = spec["max_steps"] or max(1, math.ceil(spec["epochs"] * len(rows) / B))
    # The pairs' numbers go to the device once: a micro-batch selects its rows there (a tensor built
    # from a Python list per micro-batch is a copy from pageable memory that waits for the device).
    return Run(spec=spec, rank=rank, world=world, tok=tok, rows=rows, cols=RowColumns(rows, spec["loss"], engine.device),
               engine=engine, lora=lora, packing=packing, objective=Objective(spec, world),
               guard=GradGuard(named, engine.device, rank, world, n_micro), policy_params=policy_params,
               vhead=vhead, vopt=vopt, n_micro=n_micro, steps=steps,
               stream=_index_stream(len(rows), steps * B, spec["seed"]))


def load_pairs(spec: dict, tok) -> list[dict]:
    """The round's pairs with token ids: the prompt's (chat template) and, for pairs stored as text
    only, the responses'."""
    rows = artifacts.read_table(Path(spec["pairs"]))
    if not rows:
        raise SystemExit("train: the round has no pairs")
    prompt_cache: dict[str, list[int]] = {}
    for r in rows:
        r["prompt_ids"] = prompt_cache.setdefault(r["prompt"], encode_prompt(tok, r["prompt"]))
        if not r["chosen_ids"]:
            r["chosen_ids"] = encode_response(tok, r["chosen"])
            r["rejected_ids"] = encode_response(tok, r["rejected"])
    return rows


def train(run: Run) -> None:
    """Steps from the latest checkpoint (or the first) to the last: one JSON line of metrics per step
    on rank 0, a checkpoint every `checkpoint_every` steps."""
    spec, engine = run.spec, run.engine
    start = resume(engine, spec, run.objective, run.vhead, run.vopt)
    saved = start  # the last good checkpoint's step (0: none)
    if run.rank == 0:
        truncate_metrics(Path(spec["metrics"]), start)
    metrics_f = open(spec["metrics"], "a") if run.rank == 0 else None
    every = spec.get("checkpoint_every", 0)
    kept = lambda: (f"the last good checkpoint (step {saved}) stays in {spec['checkpoints']} for a rerun"
                    if saved else "no checkpoint was saved yet")
    names = run.objective.metric_names()
    stream_dev = to_device(torch.tensor(run.stream, dtype=torch.long), engine.device)
    t0 = time.time()
    for step in range(start, run.steps):
        stats, grad_norm = train_step(run, step, stream_dev, kept)
        if metrics_f:
            rec = {"step": step + 1, **dict(zip(names, stats.tolist())),
                   "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                   "learning_rate": float(engine.get_lr()[0]),
                   "seconds": time.time() - t0}
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            if (step + 1) % max(1, run.steps // 5) == 0 or step + 1 == run.steps:
                print(f"train: step {step + 1}/{run.steps} loss {rec['loss']:.4f} "
                      f"margin {rec['rewards/margins']:+.4f} acc {rec['rewards/accuracies']:.2f}", flush=True)
        if every and (step + 1) % every == 0 and step + 1 < run.steps:
            save_checkpoint(engine, spec, step + 1, client_state(step + 1, run.objective, run.vhead, run.vopt), run.rank)
            saved = step + 1


def train_step(run: Run, step: int, stream_dev: torch.Tensor, kept) -> tuple[torch.Tensor, Any]:
    """One optimiser step over this rank's share of the step's pairs; returns the step's metrics
    (averaged over micro-batches and ranks) and the gradient norm. Within a step the host runs ahead
    of the device: it reads back only before the optimizer steps (GradGuard.check) and at the end."""
    spec, engine, guard = run.spec, run.engine, run.guard
    B, mb = spec["batch_size"], spec["micro_batch_size"]
    own_norm = spec["zero_stage"] == 0 and spec["dtype"] != "bfloat16"  # DeepSpeed reports no norm there
    step_idx = stream_dev[step * B:(step + 1) * B][run.rank::run.world]
    host_idx = run.stream[step * B:(step + 1) * B][run.rank::run.world]
    stats = torch.zeros(len(run.objective.metric_names()), dtype=torch.float64, device=engine.device)
    losses = []
    guard.begin(step)
    for k, m in enumerate(range(0, len(step_idx), mb)):
        guard.micro(k)
        loss, micro_stats = micro_batch_loss(run, step_idx[m:m + mb], [run.rows[i] for i in host_idx[m:m + mb]], step)
        losses.append(loss.detach())
        engine.backward(loss)
        if m + mb >= len(step_idx):  # the step's last backward: the optimizers step next
            if own_norm:
                step_norm = torch.nn.utils.get_total_norm([p.grad for p in run.policy_params if p.grad is not None],
                                                          foreach=True)
            guard.check(run.steps, kept(), torch.stack(losses))
        engine.step()
        stats += micro_stats
    stats /= run.n_micro
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is None and own_norm:
        grad_norm = step_norm
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        raise NonFiniteLoss(f"train: non-finite gradient norm {float(grad_norm)} at step {step + 1}/{run.steps}; "
                            f"the round's model is not written; {kept()}")
    if run.vopt is not None:
        if run.world > 1:
            for p in run.vhead.parameters():
                dist.all_reduce(p.grad)
                p.grad /= run.world
        run.vopt.step()
        run.vopt.zero_grad()
    if run.world > 1:
        dist.all_reduce(stats)
        stats /= run.world
    return stats, grad_norm


def micro_batch_loss(run: Run, idx: torch.Tensor, batch: list[dict], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one micro-batch of pairs (`idx`: their rows, on the device) and its metrics, in
    `Objective.metric_names` order. HPO's value head takes its own backward here."""
    spec, objective = run.spec, run.objective
    n = len(batch)
    seqs = [(r["prompt_ids"], r["chosen_ids"]) for r in batch] + [(r["prompt_ids"], r["rejected_ids"]) for r in batch]
    if run.packing:  # the micro-batch's chosen and rejected sequences in one padding-free row
        packed = pack(seqs, run.engine.device)
        inputs, kw = (), {"packed": packed}
        prompt_end = packed.cu_seqlens[:n].long()
    else:
        inputs, kw = collate(seqs, run.tok.pad_token_id, run.engine.device), {}
        prompt_end = torch.zeros(n, dtype=torch.long, device=run.engine.device)
    if objective.name == "hpo":
        # V(x) from the chosen sequences' last prompt position (the prompt is shared)
        value_at = prompt_end + run.cols.get("prompt_len", idx) - 1
        logps, counts, feats = run.engine(*inputs, value_at=value_at, **kw)
        values = run.vhead(feats.float()).squeeze(-1)
    else:
        logps, counts = run.engine(*inputs, **kw)
    chosen, rejected = logps[:n], logps[n:]
    chosen_len, rejected_len = counts[:n].to(chosen.dtype), counts[n:].to(chosen.dtype)
    ref_chosen, ref_rejected = objective.references(run.cols, idx, chosen.dtype)
    extra: list[torch.Tensor] = []
    if objective.name == "hpo":
        aux_c, aux_r = run.cols.get("aux_chosen", idx), run.cols.get("aux_rejected", idx)
        losses, rw_c, rw_r = objective(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len,
                                       aux_c, aux_r, values.detach())
        v_loss = objective.value_loss(values, aux_c, aux_r)
        (v_loss / run.n_micro).backward()  # the head's own graph: features are detached
        extra = [v_loss.detach(), aux_c.mean(), aux_r.mean(), values.detach().mean()]
    else:
        losses, rw_c, rw_r = objective(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)
    loss = losses.mean()
    if spec.get("rpo_alpha"):
        # NLL of the chosen responses, token mean over the micro-batch (TRL's rpo_alpha): keeps the
        # likelihood of what was chosen from falling, which plain DPO lets happen.
        nll = -chosen.sum() / chosen_len.sum()
        loss = loss + spec["rpo_alpha"] * nll
        extra.append(nll.detach())
    if int(os.environ.get(FAULT_NAN_STEP, 0)) == step + 1:
        loss = loss * math.nan
    stats = torch.stack([x.detach().double() for x in (loss, rw_c.mean(), rw_r.mean(), (rw_c - rw_r).mean(),
                         (rw_c > rw_r).float().mean(), chosen.mean(), rejected.mean(), *extra)])
    return loss, stats


def save(run: Run) -> None:
    """The round's model (LoRA: merged, the adapter beside it) and HPO's value head, from rank 0."""
    _save(run.engine, run.spec, run.tok, run.rank, run.lora)
    if run.vhead is not None and run.rank == 0:
        _save_value_head(run.vhead, Path(run.spec["metrics"]).with_name("value_head.safetensors"))


def _save(engine, spec: dict, tok, rank: int, lora=None) -> None:
    import deepspeed

    out = Path(spec["output"])
    lm = engine.module.lm  # the Hugging Face model inside Policy
    # ZeRO-3 shards the weights: gather them for the save (a no-op context for stages 0-2).
    ctx = (deepspeed.zero.GatheredParameters(list(lm.parameters()), modifier_rank=None) if spec["zero_stage"] == 3
           else nullcontext())
    with ctx:
        if rank == 0:
            if lora is not None:
                save_lora(lora, out, tok, spec["lora"]["adapter_output"])
            else:
                lm.save_pretrained(out, safe_serialization=True)
                tok.save_pretrained(out)


def _save_value_head(vhead, path: Path) -> None:
    """HPO's trained value head (`weight`, `bias`) beside the metrics; the next round starts a fresh one."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({n: p.detach().cpu().contiguous() for n, p in vhead.named_parameters()}, str(tmp))
    os.replace(tmp, path)


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
