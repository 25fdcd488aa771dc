"""Sampling throughput: generated tokens per second, our generate stage vs Hugging Face `generate`.

  ours      tasks/generate.py::run_generate, the real stage: a vLLM worker process (engine start
            included in the time), K samples per prompt with prefix caching, one engine for all prompts
  baseline  model.generate(do_sample=True, temperature, top_p, num_return_sequences=K,
            max_new_tokens) on batches of --hf-batch prompts (left-padded), with its KV cache; only
            the generate calls are timed (model loading is not)
  vllm_sampler  (--vllm-sampler) the same stage with vLLM's own CPU top-p and draw instead of ours
            (tasks/vllm_worker.py): what the version-gated sampler patch is worth

Same random-init Llama (saved with from_pretrained; its near-uniform next-token distribution almost
never samples the end of turn, so both sides generate about K x max_tokens per prompt), same chat
prompts, K, temperature, top_p, max tokens, dtype and threads (--threads, default 1: vLLM's CPU
engine, as generate.threads, and torch both use that many; see generate.threads on spinning threads
beside busy ones).
Each side counts the tokens it generated. One warm-up run per side on two prompts, then --reps
alternating repetitions. Last line: JSON, ratio = ours / baseline.

    .venv/bin/python bench/generate_vs_hf.py           # 4 layers, hidden 256, vocab 32k, 96 prompts x 8 x 64
    .venv/bin/python bench/generate_vs_hf.py --temperature 0.7 --top-p 0.9   # DICE's sampling
    .venv/bin/python bench/generate_vs_hf.py --vllm-sampler   # also vLLM's own CPU sampler
    .venv/bin/python bench/generate_vs_hf.py --quick   # a smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def hf_generate(model, tok, prompts: list[list[int]], args) -> int:
    """Samples K continuations of every prompt; returns the number of generated tokens."""
    import torch

    eos, pad = tok.eos_token_id, tok.pad_token_id
    total = 0
    with torch.no_grad():
        for i in range(0, len(prompts), args.hf_batch):
            chunk = prompts[i:i + args.hf_batch]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, p in enumerate(chunk):  # left padding, as batched generation needs
                ids[b, width - len(p):] = torch.tensor(p)
                mask[b, width - len(p):] = 1
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                 top_p=args.top_p, num_return_sequences=args.k, max_new_tokens=args.max_tokens,
                                 eos_token_id=eos, pad_token_id=pad)
            new = out[:, width:]
            # tokens up to and including the first end of turn
            done = (new == eos).int().cumsum(-1)
            total += int(((done == 0) | ((done == 1) & (new == eos))).sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(ap)
    ap.set_defaults(threads=1)
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--prompt-len", default="16,64", help="min,max prompt words")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0, help="the demo preset's (config default: 0.7)")
    ap.add_argument("--top-p", type=float, default=1.0, help="the demo preset's (config default: 0.9)")
    ap.add_argument("--hf-batch", type=int, default=8, help="prompts per HF generate call (x K sequences)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--vllm-sampler", action="store_true",
                    help="a third side: the stage with vLLM's own CPU top-p and draw")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.vocab, args.prompts, args.k, args.max_tokens, args.reps = 2, 64, 1000, 4, 2, 8, 1
        args.prompt_len = "2,8"

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # HF's side; the vLLM worker's is generate.threads
    import torch

    from selfalign.flows.config import load_config
    from selfalign.tasks.data import encode_prompt, load_tokenizer
    from selfalign.tasks import generate
    from selfalign.tasks.lm_logps import load_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = common.build_model(work / "model", args)
        tok = load_tokenizer(path)
        hf = load_model(path, args.dtype, device="cpu")
        texts = common.texts(args.prompts, *common.span(args.prompt_len), args.vocab, args.seed + 1)
        prompts = [{"id": f"p{i}", "prompt": t} for i, t in enumerate(texts)]
        ids = [encode_prompt(tok, t) for t in texts]
        cfg = load_config(None, {
            "model.policy": path, "model.reference": path, "model.dtype": args.dtype, "data.prompts": "p",
            "data.eval_prompts": "e", "data.offline_pairs": "o", "run.dir": str(work / "run"),
            "generate.k": args.k, "generate.temperature": args.temperature, "generate.top_p": args.top_p,
            "generate.max_tokens": args.max_tokens, "generate.threads": args.threads, "pairs.min_valid": 2})
        print(f"# generate_vs_hf: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, "
              f"{args.threads} thread(s); {args.prompts} prompts x K={args.k}, max {args.max_tokens} tokens, "
              f"temperature {args.temperature}, top_p {args.top_p}; HF batch {args.hf_batch} prompts; "
              f"load average {common.load_average():.1f}", flush=True)
        n = [0]
        tokens: dict[str, list[int]] = {"ours": [], "baseline": []} | ({"vllm_sampler": []} if args.vllm_sampler else {})

        def ours(sub=prompts, log=lambda m: None):
            n[0] += 1
            d = work / f"gen_{n[0]}"
            d.mkdir()
            stats = generate.run_generate(cfg.generate, cfg.model, path, sub, d / "samples.parquet", d, r=n[0],
                                          key={"bench": n[0]}, log=log)
            return stats["generate/tokens"]

        def vllm_sampler(sub=prompts):  # run_generate's steps, the job asking for vLLM's own sampler
            n[0] += 1
            d = work / f"gen_{n[0]}"
            d.mkdir()
            out = d / "samples.parquet"
            paths, runs = generate.plan_shards(cfg.generate, sub, out, 0, n[0], {"bench": n[0]}, log=lambda m: None)
            job = generate.build_job(cfg.generate, cfg.model, path, sub, runs, n[0])
            generate.run_workers(cfg.generate, job | {"native_top_p": True, "native_sampler": True}, d,
                                 lambda m: None)
            return sum(r["n_tokens"] for r in generate.join_shards(out, paths))

        def baseline(sub=ids):
            return hf_generate(hf, tok, sub, args)

        t = time.perf_counter()
        lines: list[tuple[float, str]] = []  # the worker's progress lines, timed: where the fixed cost goes
        ours(prompts[:2], log=lambda m: lines.append((time.perf_counter() - t, m)))
        startup = time.perf_counter() - t
        ready = next((s for s, m in lines if "engine ready" in m), None)
        written = max((s for s, m in lines if "vLLM: wrote " in m), default=None)
        split = {"to_engine_ready_s": ready, "drawing_s": written - ready if ready and written else None,
                 "after_last_write_s": startup - written if written else None}
        split = {k: round(v, 1) for k, v in split.items() if v is not None}
        baseline(ids[:2])
        sides = {"ours": lambda: tokens["ours"].append(ours()),
                 "baseline": lambda: tokens["baseline"].append(baseline())}
        if args.vllm_sampler:
            vllm_sampler(prompts[:2])
            sides["vllm_sampler"] = lambda: tokens["vllm_sampler"].append(vllm_sampler())
        times = common.alternate(sides, args.reps)
    tps = {k: common.median([n_ / t for n_, t in zip(tokens[k], times[k])]) for k in times}
    for k in times:
        print(f"  {k:10s} {tps[k]:9.1f} tokens/s (median of {args.reps}; {sum(tokens[k])} tokens in {sum(times[k]):.1f} s)")
    # meaningless when a run is not longer than the warm-up (--quick)
    net = [n_ / (t - startup) for n_, t in zip(tokens["ours"], times["ours"]) if t > 1.5 * startup]
    steady = round(common.median(net), 1) if net else None
    print(f"  ours' fixed cost (process, imports, engine start; the 2-prompt warm-up run): {startup:.1f} s "
          f"({split}: the last is the worker's exit); without it {steady} tokens/s")
    common.emit("generate_vs_hf", tps["ours"], tps["baseline"], "tokens/s",
                prompts=args.prompts, k=args.k, max_tokens=args.max_tokens, layers=args.layers, hidden=args.hidden,
                vocab=args.vocab, dtype=args.dtype, threads=args.threads, reps=args.reps,
                tokens_ours=sum(tokens["ours"]), tokens_baseline=sum(tokens["baseline"]),
                temperature=args.temperature, top_p=args.top_p, ours_fixed_s=round(startup, 1), ours_fixed_split=split,
                ours_without_fixed=steady,
                **({"vllm_sampler": round(tps["vllm_sampler"], 1),
                    "ours_vs_vllm_sampler": round(tps["ours"] / tps["vllm_sampler"], 3)} if args.vllm_sampler else {}),
                load_average=round(common.load_average(), 1))


if __name__ == "__main__":
    main()
