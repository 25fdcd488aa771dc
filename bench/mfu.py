"""Training MFU: the model FLOPs utilisation of our DPO training step on a ~1B-parameter Llama,
against the matmul peak measured first on the same device and dtype.

  peak   the best of --peak-reps timings of an N x N matmul (N = 8192 on a GPU, 1024 on a CPU), in
         the training dtype: what this device really sustains, not its data-sheet number
  step   the real train stage (tasks/train.run_train: the DeepSpeed worker, packing, fused LM head)
         on --pairs pairs per optimiser step; steady state, steps 2..N from the stage's own clock
  MFU    6 * N_params * tokens per step / seconds per step / peak; attention's own FLOPs are left
         out (a few percent at these lengths), as is usual, so MFU is slightly understated

Default model: 16 layers, hidden 2048, vocab 32000, head_dim 64 (0.94B parameters), bfloat16 on a
GPU. Last line: JSON with the peak, the step's TFLOP/s and mfu = their ratio.

    python bench/mfu.py                  # on a GPU
    python bench/mfu.py --quick          # a smoke run at tiny sizes (any device)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common


def matmul_peak(device: str, dtype: str, n: int, reps: int) -> float:
    """Best TFLOP/s of an n x n matmul (2 n^3 FLOPs) over `reps` timed calls after one warm-up."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    best = float("inf")
    for i in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def step_tokens(pairs: Path, policy: str) -> int:
    """Tokens one optimiser step runs through the policy: prompt + response, both sides of every pair."""
    from selfalign.tasks import artifacts
    from selfalign.tasks.data import encode_prompt, load_tokenizer

    tok = load_tokenizer(policy)
    return sum(2 * len(encode_prompt(tok, r["prompt"])) + len(r["chosen_ids"]) + len(r["rejected_ids"])
               for r in artifacts.read_table(pairs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(ap, layers=16, hidden=2048, vocab=32000)
    ap.add_argument("--pairs", type=int, default=16, help="pairs per optimiser step")
    ap.add_argument("--micro-batch", type=int, default=4, help="pairs per forward")
    ap.add_argument("--steps", type=int, default=4, help="optimiser steps (the first is not timed)")
    ap.add_argument("--prompt-len", default="64,128", help="min,max prompt words")
    ap.add_argument("--response-len", default="128,384", help="min,max response words")
    ap.add_argument("--peak-size", type=int, default=0, help="matmul size for the peak (0: 8192 GPU, 1024 CPU)")
    ap.add_argument("--peak-reps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args()
    device = common.resolve_device(args)
    if args.quick:
        args.layers, args.hidden, args.vocab, args.steps, args.pairs, args.micro_batch = 2, 64, 1000, 2, 4, 2
        args.prompt_len, args.response_len, args.peak_size, args.peak_reps = "2,8", "4,24", 256, 2
    elif device == "cuda" and "--dtype" not in sys.argv:
        args.dtype = "bfloat16"
    if args.pairs % args.micro_batch:
        raise SystemExit("--pairs must be a multiple of --micro-batch")

    from train_vs_trl import make_pairs, run_ours

    peak = matmul_peak(device, args.dtype, args.peak_size or (8192 if device == "cuda" else 1024), args.peak_reps)
    print(f"# mfu: {common.device_name(device)}, {args.dtype}; matmul peak {peak:.2f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy, _, pairs, _ = make_pairs(work, args)
        n_params = _params(policy)
        tokens = step_tokens(pairs, policy)
        run = run_ours(args, policy, pairs, work / "ours" / "model", packing=True)
    seconds = run["timed_s"] / (run["steps"] - 1)
    achieved = 6 * n_params * tokens / seconds / 1e12
    print(f"  {n_params / 1e9:.3f}B parameters, {tokens} tokens per step, {seconds:.2f} s per step: "
          f"{achieved:.2f} TFLOP/s = {100 * achieved / peak:.1f}% of the measured peak")
    print(json.dumps({"bench": "mfu", "device": common.device_name(device), "dtype": args.dtype,
                      "params_b": round(n_params / 1e9, 3), "tokens_per_step": tokens,
                      "seconds_per_step": round(seconds, 3), "tflops": round(achieved, 3),
                      "peak_tflops": round(peak, 3), "mfu": round(achieved / peak, 4), "layers": args.layers,
                      "hidden": args.hidden, "vocab": args.vocab, "pairs": args.pairs, "steps": args.steps}))


def _params(model_dir: str) -> int:
    """Parameters of a saved model, from its safetensors header (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                total += _prod(st.get_slice(name).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
