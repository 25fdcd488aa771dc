"""Peak memory and time of per-token log-prob computation: naive vs chunked vs fused.

Variants, for N tokens, hidden H, vocabulary V (labels ~10% ignored):
  naive    logits = hidden @ W^T (full N x V), log_softmax(logits.float()).gather  (token_logps_reference)
  chunked  logits = hidden @ W^T (full N x V), token_logps(logits) chunk by chunk
  fused    linear_token_logps(hidden, W): logits never exist beyond one chunk
Modes: "train" (forward + backward to hidden and W, as in DPO training), "score" (no_grad forward,
as in reference-model scoring).

Each (variant, vocab, mode) runs in a fresh subprocess so that one variant's allocator state cannot
hide another's. Memory is the peak growth over the process's footprint once inputs exist:
  CPU:  peak RSS (VmHWM, reset through /proc/self/clear_refs where the kernel allows, else
        ru_maxrss) minus RSS before the measured call;
  CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the call.
Time: the median of --repeats calls after the measured one (CUDA: synchronised).

The last line printed is JSON: {"bench": "logps_memory", "ours": fused MB, "baseline": naive MB,
"unit": "MB", "ratio": baseline / ours, ...} for the largest vocabulary in train mode (ratio > 1:
ours uses less), followed by the full table under "rows".

    .venv/bin/python bench/logps_memory.py                    # CPU: 4096 tokens, H 256, V 32k and 128k
    python bench/logps_memory.py --device cuda --dtype bfloat16 --tokens 8192 --hidden 4096
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("naive", "chunked", "fused")


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_hwm() -> bool:
    # "5" resets the peak RSS counter (VmHWM) to the current RSS (Linux >= 4.0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    import torch
    import torch.nn.functional as F

    from selfalign.kernels.logps import token_logps, token_logps_reference
    from selfalign.kernels.logps_fused import linear_token_logps

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, h, v = args.tokens, args.hidden, args.vocab
    train = args.mode == "train"

    def make(nn):
        hid = torch.randn(nn, h, device=dev).to(dtype)
        w = (torch.randn(v, h, device=dev) / h**0.5).to(dtype)
        y = torch.randint(0, v, (nn,), device=dev)
        y[torch.rand(nn, device=dev) < 0.1] = -100
        g = torch.randn(nn, device=dev)
        if train:
            hid.requires_grad_()
            w.requires_grad_()
        return hid, w, y, g

    def step(hid, w, y, g):
        with torch.set_grad_enabled(train):
            if args.variant == "naive":
                lp = token_logps_reference(F.linear(hid, w), y)
            elif args.variant == "chunked":
                lp = token_logps(F.linear(hid, w), y, backend=args.backend)
            else:
                lp = linear_token_logps(hid, w, y, backend=args.backend)
            if train:
                grads = torch.autograd.grad(lp, (hid, w), g)
                return lp.detach(), grads
            return lp, ()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step(*make(min(n, 64)))  # warm-up: kernels compiled, libraries loaded, tiny allocations
    inputs = make(n)
    sync()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = step(*inputs)
        sync()
        first = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
    else:
        reset = _reset_hwm()
        base_kb = _rss_kb()
        t0 = time.perf_counter()
        out = step(*inputs)
        first = time.perf_counter() - t0
        peak = (_hwm_kb() - base_kb) * 1024 if reset else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) * 1024
    del out
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        out = step(*inputs)
        sync()
        times.append(time.perf_counter() - t0)
        del out
    print(json.dumps({"peak_mb": peak / 2**20, "time_s": statistics.median(times) if times else first}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocabs", default="32000,128256")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--modes", default="train,score")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--repeats", type=int, default=None, help="timed calls after the measured one (default: 0 on CPU, 5 on CUDA)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.repeats is None:
        args.repeats = 5 if args.device == "cuda" else 0
    if args.worker:
        worker(args)
        return

    vocabs = [int(x) for x in args.vocabs.split(",")]
    modes = args.modes.split(",")
    rows = []
    print(f"# logps_memory: tokens={args.tokens} hidden={args.hidden} dtype={args.dtype} device={args.device} "
          f"backend={args.backend}", flush=True)
    print(f"{'mode':6} {'vocab':>7} {'variant':8} {'peak MB':>10} {'time s':>9}", flush=True)
    for mode in modes:
        for v in vocabs:
            for variant in VARIANTS:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--vocab", str(v),
                       "--mode", mode, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
                       "--dtype", args.dtype, "--device", args.device, "--backend", args.backend,
                       "--repeats", str(args.repeats)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"worker failed: {variant} V={v} {mode}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append({"mode": mode, "vocab": v, "variant": variant, **res})
                print(f"{mode:6} {v:>7} {variant:8} {res['peak_mb']:>10.1f} {res['time_s']:>9.3f}", flush=True)

    def pick(mode, v, variant):
        return next(r for r in rows if r["mode"] == mode and r["vocab"] == v and r["variant"] == variant)

    head_mode = "train" if "train" in modes else modes[0]
    vmax = max(vocabs)
    ours, base = pick(head_mode, vmax, "fused"), pick(head_mode, vmax, "naive")
    print(json.dumps({
        "bench": "logps_memory", "ours": round(ours["peak_mb"], 1), "baseline": round(base["peak_mb"], 1),
        "unit": "MB", "ratio": round(base["peak_mb"] / max(ours["peak_mb"], 1e-9), 2),
        "what": f"peak memory growth, {head_mode}, fused vs naive, V={vmax}",
        "time_ours_s": round(ours["time_s"], 4), "time_baseline_s": round(base["time_s"], 4),
        "tokens": args.tokens, "hidden": args.hidden, "dtype": args.dtype, "device": args.device,
        "rows": [{k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()} for r in rows],
    }))


if __name__ == "__main__":
    main()
