"""The draw alone: one token per row from softmax(logits), our inverse-CDF draw vs vLLM's CPU draw,
milliseconds per batch of logits.

  ours      selfalign.kernels.sampling.sample_inverse_cdf (one float64 uniform number per row; what
            the generate stage's worker draws with on CPU), the numbers drawn on every call
  baseline  vLLM's CPU draw: torch.ops._C.fused_gumbel_argmax (Gumbel-max with per-token noise from
            a seed per row), the seeds drawn on every call as vLLM's sampler does

Both get the same float32 logits (already divided by the temperature), one thread by default. Two kinds
of rows: peaked (a trained model's few dozen likely tokens) and near-uniform (a random-init model's).
One warm-up, then --reps alternating repetitions; the median. The two draws are checked against the
softmax too: over --check-draws draws of one row (drawn in batches), with its tokens in 20 groups of
about equal mass, each side's count in every group must stay within 5 standard deviations of
N * (the group's mass). Last line: JSON, ratio = baseline ms /
ours ms summed over the cases (> 1: ours is faster).

    .venv/bin/python bench/draw_sampling.py                 # 256 x 32000 and 64 x 128256
    .venv/bin/python bench/draw_sampling.py --quick         # a smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_logit_args(ap, shapes="256x32000,64x128256")
    ap.add_argument("--check-draws", type=int, default=20000)
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.reps, args.check_draws = "8x1000", 1, 2000

    import torch
    from vllm.platforms import current_platform

    # Registers torch.ops._C.fused_gumbel_argmax from the kernel library built for this CPU's vector
    # units (AVX2, AVX-512 or AVX-512 with bf16); vLLM's engine loads it the same way.
    current_platform.import_kernels()

    from selfalign.kernels.sampling import sample_inverse_cdf

    torch.set_num_threads(args.threads)
    cases = common.logit_cases(args.shapes, args.seed)
    print(f"# draw_sampling: {args.threads} thread(s), {args.reps} reps; load average {common.load_average():.1f}",
          flush=True)

    def ours(x):
        return sample_inverse_cdf(x, torch.rand(x.shape[0], dtype=torch.float64))

    def vllm(x):
        return torch.ops._C.fused_gumbel_argmax(x, torch.randint(0, 2 ** 31, (x.shape[0],), dtype=torch.long))

    totals = {"ours": 0.0, "baseline": 0.0}
    for name, x in cases:
        ms = common.median_ms({"ours": lambda: ours(x), "baseline": lambda: vllm(x)}, args.reps)
        # Frequencies of one row drawn --check-draws times (in batches of ~16 MB), against its softmax.
        step = max(1, (1 << 22) // x.shape[1])
        row = x[:1].expand(step, -1).contiguous()
        # Tokens in 20 groups of about equal mass, most probable first (a token holding more than a
        # group's mass is a group of its own): each group is expected N * mass times.
        p = torch.softmax(x[0].double(), -1)
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]
        group = torch.empty_like(order)
        group[order] = (before * 20).long().clamp(max=19)
        mass = torch.zeros(20, dtype=torch.float64).index_add_(0, group, p)
        worst = {}
        for k, f in (("ours", ours), ("baseline", vllm)):
            drawn = torch.cat([f(row[:min(step, args.check_draws - i)]) for i in range(0, args.check_draws, step)])
            counts = torch.bincount(group[drawn], minlength=20).double()
            expected = args.check_draws * mass
            sd = (expected * (1 - mass)).sqrt()
            used = expected > 0
            worst[k] = float(((counts - expected).abs()[used] / sd[used]).max())
            if worst[k] > 5:
                raise SystemExit(f"{name}: {k}'s draw is off the softmax by {worst[k]:.1f} standard deviations")
        print(f"  {name:24s} ours {ms['ours']:8.2f} ms   vLLM Gumbel {ms['baseline']:8.2f} ms   "
              f"x{ms['baseline'] / ms['ours']:5.1f}   (largest deviation from the softmax over {args.check_draws} "
              f"draws: ours {worst['ours']:.1f} sd, vLLM {worst['baseline']:.1f} sd)", flush=True)
        for k in totals:
            totals[k] += ms[k]
    common.emit("draw_sampling", totals["ours"], totals["baseline"], "ms per batch (sum over the cases)",
                ratio=totals["baseline"] / totals["ours"], shapes=args.shapes, threads=args.threads, reps=args.reps,
                load_average=round(common.load_average(), 1))


if __name__ == "__main__":
    main()
