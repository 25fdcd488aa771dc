"""The top-p cut alone: our sort-free kernel vs vLLM's CPU top-p, milliseconds per batch of logits.

  ours      selfalign.kernels.sampling.top_p_filter (topk fast path, radix select over float32 bit
            patterns; what the generate stage's worker applies on CPU)
  baseline  vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_top_p_pytorch, the top-p vLLM's CPU
            sampler runs: a sort of the whole vocabulary per row, softmax, cumsum, scatter

Both cut the same logits in place (each call gets a fresh copy; the copy's time is printed and
included on both sides), one thread by default, top_p 0.9 on every row. Two kinds of rows: peaked
(a few dozen tokens hold most of the mass, as a trained model's next-token distribution does) and
near-uniform (the worst case for ours: the nucleus is most of the vocabulary; random-init models
look like this). One warm-up, then --reps alternating repetitions; the median. The kept sets are
compared too: they must agree but for float32 rounding at the boundary. Last line: JSON, ratio =
baseline ms / ours ms summed over the cases (> 1: ours is faster).

    .venv/bin/python bench/topp_sampling.py                 # 64 x 32000 and 256 x 128256
    .venv/bin/python bench/topp_sampling.py --quick         # a smoke run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_logit_args(ap, shapes="64x32000,256x128256")
    ap.add_argument("--top-p", type=float, default=0.9)
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.reps = "8x1000", 1

    import torch
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from selfalign.kernels.sampling import top_p_filter

    torch.set_num_threads(args.threads)
    cases = common.logit_cases(args.shapes, args.seed)
    print(f"# topp_sampling: top_p {args.top_p}, {args.threads} thread(s), {args.reps} reps; "
          f"load average {common.load_average():.1f}", flush=True)

    totals = {"ours": 0.0, "baseline": 0.0}
    for name, x in cases:
        p = torch.full((x.shape[0],), args.top_p)
        sides = {"ours": lambda: top_p_filter(x.clone(), p, inplace=True),
                 "baseline": lambda: apply_top_k_top_p_pytorch(x.clone(), None, p)}
        ms = common.median_ms(sides, args.reps)
        t = time.perf_counter()
        x.clone()
        clone_ms = 1e3 * (time.perf_counter() - t)
        a, b = sides["ours"](), sides["baseline"]()
        diff = int((torch.isinf(a) != torch.isinf(b)).sum())
        kept = float((~torch.isinf(a)).float().sum(-1).median())
        print(f"  {name:24s} ours {ms['ours']:8.1f} ms   vLLM sort {ms['baseline']:8.1f} ms   "
              f"x{ms['baseline'] / ms['ours']:5.1f}   (copy {clone_ms:.1f} ms; median nucleus {kept:.0f} tokens; "
              f"kept sets differ in {diff} tokens)", flush=True)
        for k in totals:
            totals[k] += ms[k]
    common.emit("topp_sampling", totals["ours"], totals["baseline"], "ms per batch (sum over the cases)",
                ratio=totals["baseline"] / totals["ours"], ratio_is="baseline / ours (> 1: ours is faster)",
                shapes=args.shapes, top_p=args.top_p, threads=args.threads, reps=args.reps,
                load_average=round(common.load_average(), 1))


if __name__ == "__main__":
    main()
