"""Scoring throughput: summed response log-probs of mixed-length (prompt, response) sequences.

  ours      tasks/score.py::logps_of, as the score stage calls it (score.packing, score.batch_tokens):
            padding-free packed rows, fused LM head on response positions only, inference_mode
  padded    the same function with score.packing=false: padded batches by token budget, sorted by length
  baseline  what plain Hugging Face code does: batches of --baseline-batch sequences in dataset order,
            right-padded to the batch's longest, model(ids, attention_mask).logits
            -> log_softmax(-1).gather(labels) -> masked sum, under torch.no_grad

Same model object (random-init Llama, saved and loaded with from_pretrained), same sequences, dtype
and threads; one warm-up call per side, then --reps alternating repetitions. Tokens/s counts every
real (prompt + response) token, the same number on each side, so the ratio is a ratio of times.
All sides must agree on every sum (printed). Last line: JSON, ratio = ours / baseline.

    .venv/bin/python bench/score_vs_hf.py              # 4 layers, hidden 256, vocab 32k, 32 sequences
    .venv/bin/python bench/score_vs_hf.py --quick      # seconds: a smoke run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def hf_padded_logps(model, seqs, pad_id: int, batch: int) -> list[float]:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i:i + batch]
            width = max(len(p) + len(r) for p, r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for b, (p, r) in enumerate(chunk):
                n = len(p) + len(r)
                ids[b, :n] = torch.tensor(p + r)
                mask[b, :n] = 1
                labels[b, len(p) - 1:n - 1] = torch.tensor(r)
            ids, mask, labels = ids.to(model.device), mask.to(model.device), labels.to(model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            lp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out += (lp * (labels != -100)).sum(-1).tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(ap)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--prompt-len", default="16,64", help="min,max prompt words")
    ap.add_argument("--response-len", default="32,512", help="min,max response words")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="score.batch_tokens for ours")
    ap.add_argument("--baseline-batch", type=int, default=8, help="sequences per baseline batch")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-padded", action="store_true", help="skip our padded path (packing off)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.vocab, args.sequences, args.reps = 2, 64, 1000, 6, 1
        args.prompt_len, args.response_len = "2,8", "4,24"

    common.resolve_device(args)
    import torch

    from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
    from selfalign.tasks.lm_logps import fused_head_ok, load_model, logps_of, packing_path

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = common.build_model(Path(tmp) / "model", args)
        tok = load_tokenizer(path)
        model = load_model(path, args.dtype, device=args.device)
    prompts = common.texts(args.sequences, *common.span(args.prompt_len), args.vocab, args.seed + 1)
    responses = common.texts(args.sequences, *common.span(args.response_len), args.vocab, args.seed + 2)
    seqs = [(encode_prompt(tok, p), encode_response(tok, r)) for p, r in zip(prompts, responses)]
    tokens = sum(len(p) + len(r) for p, r in seqs)
    pad = tok.pad_token_id
    sides = {
        "ours": lambda: logps_of(model, seqs, pad, args.batch_tokens, packing=True),
        "baseline": lambda: hf_padded_logps(model, seqs, pad, args.baseline_batch),
    }
    if not args.no_padded:
        sides["ours_padded"] = lambda: logps_of(model, seqs, pad, args.batch_tokens, packing=False)
    print(f"# score_vs_hf: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, device {common.device_name(args.device)}; {len(seqs)} sequences, {tokens} tokens "
          f"(prompts {args.prompt_len}, responses {args.response_len} words); fused head {fused_head_ok(model)}, "
          f"packing path {packing_path(model) or 'none'}; load average {common.load_average():.1f}", flush=True)

    results = {name: fn() for name, fn in sides.items()}  # warm-up, and the numbers to compare
    diff = {name: max(abs(a - b) for a, b in zip(vals, results["baseline"])) for name, vals in results.items()}
    scale = max(abs(v) for v in results["baseline"])
    print("  max |sum - baseline|: " + ", ".join(f"{k} {v:.3g}" for k, v in diff.items()) + f" (sums up to {scale:.0f})")
    tol = (1e-5 if args.dtype == "float32" else 2e-2) * scale
    if any(v > tol for v in diff.values()):
        raise SystemExit(f"sides disagree by more than {tol:.3g}: {diff}")

    times = common.alternate(sides, args.reps)
    tps = {name: tokens / common.median(ts) for name, ts in times.items()}
    for name, v in tps.items():
        print(f"  {name:14s} {v:10.0f} tokens/s (median of {args.reps})")
    extra = {"ours_padded": round(tps["ours_padded"], 1)} if "ours_padded" in tps else {}
    common.emit("score_vs_hf", tps["ours"], tps["baseline"], "tokens/s", **extra,
                tokens=tokens, sequences=len(seqs), layers=args.layers, hidden=args.hidden, vocab=args.vocab,
                dtype=args.dtype, threads=torch.get_num_threads(), device=common.device_name(args.device), reps=args.reps,
                load_average=round(common.load_average(), 1))


if __name__ == "__main__":
    main()
