"""DPO training throughput: pairs per second, our train stage vs TRL's DPOTrainer.

  ours      tasks/train.py::run_train, the real stage: the DeepSpeed worker started by the stage (ZeRO `auto`:
            stage 0 on 1 process), train.packing on: a micro-batch's chosen and rejected sequences in one
            padding-free row, fused LM head; reference log-probs come with the pairs (computed by
            the score stage's code here, untimed), so no reference forward
  padded    the same stage with train.packing=false
  baseline  trl.DPOTrainer (sigmoid loss) with a reference model, its default: a reference forward
            every step; gradient checkpointing off (TRL's default is on: it would cost TRL ~20%
            more), constant learning rate, no bf16 (CPU), TRL's own fused LM head

Same random-init Llama policy, same reference model (another random init, so the first loss is not
ln 2), same pairs (exactly --pairs of them: every optimiser step sees all of them, so step 1 covers
the same pairs on both sides whatever the order), batch, micro-batch, steps, lr, beta, threads.
TRL tokenises the same texts in conversational form; the benchmark checks that it gets exactly
our token ids. The first-step losses must agree to 1e-4.

Throughput is steady state: steps 2..N of each run (step 1 is the warm-up), --pairs * (N - 1) /
(time of step N - time of step 1), from each side's own per-step clock. Each repetition starts
fresh processes; sides alternate. Last line: JSON, ratio = ours / baseline.

    .venv/bin/python bench/train_vs_trl.py            # 4 layers, hidden 256, vocab 32k, 4 pairs x 4 steps
    .venv/bin/python bench/train_vs_trl.py --quick    # a smoke run
TRL is a bench-only dependency: pip install -e '.[bench]'.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def make_pairs(work: Path, args) -> tuple[str, str, Path, Path]:
    """Policy and reference models, our pair table (with reference log-probs) and TRL's dataset."""
    from selfalign.tasks import artifacts
    from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
    from selfalign.tasks.lm_logps import load_model, logps_of

    policy = common.build_model(work / "policy", args)
    reference = common.build_model(work / "reference", args, seed=args.seed + 100)
    tok = load_tokenizer(policy)
    n = args.pairs
    prompts = common.texts(n, *common.span(args.prompt_len), args.vocab, args.seed + 1)
    chosen = common.texts(n, *common.span(args.response_len), args.vocab, args.seed + 2)
    rejected = common.texts(n, *common.span(args.response_len), args.vocab, args.seed + 3)
    rows = []
    for i in range(n):
        rows.append({"source": "generated", "prompt_id": f"p{i}", "prompt": prompts[i], "chosen": chosen[i],
                     "rejected": rejected[i], "chosen_ids": encode_response(tok, chosen[i]),
                     "rejected_ids": encode_response(tok, rejected[i])})
    ref = load_model(reference, args.dtype, device=args.device)
    seqs = [(encode_prompt(tok, r["prompt"]), r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
    vals = logps_of(ref, seqs, tok.pad_token_id, packing=True)  # what the score stage stores
    for i, r in enumerate(rows):
        r["ref_chosen_logp"], r["ref_rejected_logp"] = vals[2 * i], vals[2 * i + 1]
    pairs = work / "pairs.parquet"
    artifacts.write_table(pairs, rows)
    trl_data = work / "trl.jsonl"
    with open(trl_data, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n")
    print(f"  {n} pairs: {sum(len(p) + len(r) for p, r in seqs)} tokens per optimiser step (prompt + response, both sides)")
    return policy, reference, pairs, trl_data


def run_ours(args, policy: str, pairs: Path, out: Path, packing: bool) -> dict:
    from selfalign.flows.config import load_config
    from selfalign.tasks.train import run_train

    cfg = load_config(None, {
        "model.policy": policy, "model.reference": policy, "model.dtype": args.dtype, "data.prompts": "p",
        "data.eval_prompts": "e", "data.offline_pairs": "o", "run.dir": str(out.parent),
        "train.lr": args.lr, "train.beta": args.beta, "train.max_steps": args.steps, "train.batch_size": args.pairs,
        "train.micro_batch_size": args.micro_batch, "train.threads": args.threads, "train.packing": packing})
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = run_train(cfg.train, cfg.model, policy, pairs, out, seed=args.seed, log=lambda m: None)
    t = [s["seconds"] for s in steps]
    return {"first_loss": steps[0]["loss"], "timed_s": t[-1] - t[0], "steps": len(steps)}


def trl_worker(spec_path: str) -> None:
    """One TRL run (in its own process, like ours): prints a JSON line with per-step times."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from selfalign.tasks.data import encode_prompt, encode_response

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(spec["reference"], dtype=dtype)
    tok = AutoTokenizer.from_pretrained(spec["policy"])
    data = load_dataset("json", data_files=spec["data"], split="train")
    cfg = DPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["pairs"] // spec["micro_batch"], max_steps=spec["steps"],
        learning_rate=spec["lr"], beta=spec["beta"], loss_type=["sigmoid"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=spec["device"] == "cpu", bf16=spec["dtype"] == "bfloat16", max_length=None, gradient_checkpointing=False,
        seed=spec["seed"], disable_tqdm=True, dataloader_num_workers=0)

    times, losses = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=data, processing_class=tok,
                         callbacks=[Clock()])
    same_ids = all(
        ex["prompt_ids"] == encode_prompt(tok, raw["prompt"][0]["content"])
        and ex["chosen_ids"] == encode_response(tok, raw["chosen"][0]["content"])
        and ex["rejected_ids"] == encode_response(tok, raw["rejected"][0]["content"])
        for ex, raw in zip(trainer.train_dataset, data))
    trainer.train()
    print(json.dumps({"first_loss": losses[0], "timed_s": times[-1] - times[0], "steps": len(times),
                      "same_ids": same_ids}))


def run_trl(args, policy: str, reference: str, data: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec = {"policy": policy, "reference": reference, "data": str(data), "out": str(out), "pairs": args.pairs,
            "micro_batch": args.micro_batch, "steps": args.steps, "lr": args.lr, "beta": args.beta,
            "dtype": args.dtype, "threads": args.threads, "seed": args.seed,
            "device": args.device}
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(out / "datasets"))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--trl-worker", str(spec_path)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"TRL run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if not res["same_ids"]:
        raise SystemExit("TRL tokenised the pairs differently from ours: the sides would not train on the same data")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(ap)
    ap.add_argument("--pairs", type=int, default=4, help="pairs in the data set = pairs per optimiser step")
    ap.add_argument("--micro-batch", type=int, default=2, help="pairs per forward")
    ap.add_argument("--steps", type=int, default=4, help="optimiser steps per run (the first is not timed)")
    ap.add_argument("--prompt-len", default="16,64", help="min,max prompt words")
    ap.add_argument("--response-len", default="32,512", help="min,max response words")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-padded", action="store_true", help="skip our padded run (train.packing=false)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (smoke test)")
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return
    if args.quick:
        args.layers, args.hidden, args.vocab, args.reps, args.steps = 2, 64, 1000, 1, 2
        args.prompt_len, args.response_len, args.no_padded = "2,8", "4,24", True
    if args.pairs % args.micro_batch:
        raise SystemExit("--pairs must be a multiple of --micro-batch")

    common.resolve_device(args)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"# train_vs_trl: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, "
              f"{args.threads or torch.get_num_threads()} threads, device {common.device_name(args.device)}; "
              f"{args.pairs} pairs per step, micro-batch "
              f"{args.micro_batch}, {args.steps} steps (prompts {args.prompt_len}, responses {args.response_len} "
              f"words); load average {common.load_average():.1f}", flush=True)
        policy, reference, pairs, trl_data = make_pairs(work, args)
        results: dict[str, list[dict]] = {}
        n = [0]

        def side(name, fn):
            def run():
                n[0] += 1
                results.setdefault(name, []).append(fn(work / f"{name}_{n[0]}"))
            return run

        sides = {"ours": side("ours", lambda d: run_ours(args, policy, pairs, d / "model", packing=True)),
                 "baseline": side("baseline", lambda d: run_trl(args, policy, reference, trl_data, d))}
        if not args.no_padded:
            sides["ours_padded"] = side("ours_padded", lambda d: run_ours(args, policy, pairs, d / "model", packing=False))
        wall = common.alternate(sides, args.reps)

    timed = args.pairs * (args.steps - 1)
    pps = {name: timed / common.median([r["timed_s"] for r in rs]) for name, rs in results.items()}
    first = {name: rs[0]["first_loss"] for name, rs in results.items()}
    for name in results:
        print(f"  {name:12s} {pps[name]:8.3f} pairs/s steady state (median of {args.reps}); first-step loss "
              f"{first[name]:.6f}; process wall {common.median(wall[name]):.1f} s")
    gap = abs(first["ours"] - first["baseline"])
    tol = 1e-4 if args.dtype == "float32" else 2e-2  # bf16: both sides round differently
    print(f"  first-step loss |ours - TRL| = {gap:.2e} ({'agree' if gap <= tol else 'DISAGREE'} to {tol:g})")
    extra = {"ours_padded": round(pps["ours_padded"], 4)} if "ours_padded" in pps else {}
    common.emit("train_vs_trl", pps["ours"], pps["baseline"], "pairs/s", **extra,
                first_loss_ours=round(first["ours"], 6), first_loss_trl=round(first["baseline"], 6),
                loss_agree=gap <= tol, loss_tol=tol, device=common.device_name(args.device), pairs=args.pairs,
                micro_batch=args.micro_batch, steps=args.steps,
                layers=args.layers, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
                threads=args.threads or torch.get_num_threads(), reps=args.reps,
                wall_s={k: round(common.median(v), 1) for k, v in wall.items()},
                load_average=round(common.load_average(), 1))
    if gap > tol or math.isnan(gap):
        sys.exit(1)


if __name__ == "__main__":
    main()
