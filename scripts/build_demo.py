"""Builds the embedded demo's assets (tiny SFT model, initial DPO model π0, prompts, offline and held-out
preference pairs) for the toy addition-with-style task in ``selfalign.tasks.toy``.

    .venv/bin/python scripts/build_demo.py [--seed 0] [--out assets/demo]

Deterministic for a given seed and machine (single-process CPU, torch's default CPU kernels), and
CPU-only: about a few minutes on 2 cores. Steps:
  1. prompts: all 8100 operand pairs shuffled; 200 held-out eval prompts, a 3000-prompt training pool.
  2. SFT from scratch on responses in a fixed mixture of styles, stopped once greedy accuracy on a
     validation slice reaches a threshold (accuracy jumps late and fast on this kind of task, so a
     threshold is both faster and more reproducible than a fixed long schedule).
  3. offline pairs from the SFT model's own samples (K per prompt, temperature 1): chosen = a checker-
     perfect answer (polite and correct), rejected = a non-preferred sample, picked so that chosen is
     on average ``--length-gap`` characters longer (the bias DICE's α sweep must remove).
  4. π0 = DPO (sigmoid, summed log-probs, frozen SFT reference) on the offline pairs, stopped early
     enough that π0 still leaves the preferred style headroom at temperature 1.
  5. metrics of SFT and π0 (greedy and sampled) and π0's implicit-reward accuracy on held-out pairs.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from selfalign.kernels.logps import sequence_logps, token_logps
from selfalign.kernels.losses import dpo_loss
from selfalign.tasks import toy
from selfalign.tasks.data import encode_prompt, encode_response

# SFT style mixture: the preferred style is a minority so that the sampled polite rate starts low,
# and rambling (the longest) is the plurality, so greedy decoding of the SFT model is not polite.
SFT_STYLE_WEIGHTS = {"polite": 0.30, "bare": 0.15, "terse": 0.20, "rambling": 0.35}
MAX_NEW_TOKENS = 64  # longest response (rambling, 54 chars) + EOS fits with margin


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("assets/demo"))
    p.add_argument("--n-train-prompts", type=int, default=3000)
    p.add_argument("--n-eval-prompts", type=int, default=200)
    p.add_argument("--n-offline-prompts", type=int, default=400, help="pool prompts sampled for offline pairs")
    p.add_argument("--k", type=int, default=8, help="SFT samples per prompt when building pairs")
    p.add_argument("--length-gap", type=float, default=15.0, help="target mean len(chosen)-len(rejected), chars")
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--sft-batch", type=int, default=128)
    p.add_argument("--sft-max-steps", type=int, default=3000)
    p.add_argument("--sft-acc-threshold", type=float, default=0.8, help="stop SFT at this greedy val accuracy")
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--dpo-lr", type=float, default=5e-5)
    p.add_argument("--dpo-batch", type=int, default=32)
    p.add_argument("--dpo-max-steps", type=int, default=200)
    p.add_argument("--dpo-acc-threshold", type=float, default=0.9,
                   help="stop DPO once the implicit-reward accuracy on the training pairs reaches this")
    return p.parse_args()


# ------------------------------------------------------------------------------------------ model
def build_model(tok, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),  # exact: vLLM must never sample an id the tokenizer cannot decode
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=512,  # head_dim 32: the smallest vLLM's CPU attention accepts
        max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def batch_tensors(seqs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) for (prompt_ids, response_ids) pairs; labels
    mask the prompt and padding with -100 and are NOT shifted (callers shift)."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        mask[i, :n] = 1
    return ids, mask, labels


def response_logps(model, seqs, pad_id: int) -> torch.Tensor:
    """Summed log-prob of each response (EOS included) given its prompt: S(y|x), shape (B,)."""
    ids, mask, labels = batch_tensors(seqs, pad_id)
    logits = model(input_ids=ids, attention_mask=mask).logits
    lp = token_logps(logits[:, :-1], labels[:, 1:])
    return sequence_logps(lp, labels[:, 1:])[0]


@torch.no_grad()
def generate(model, tok, prompts: list[str], *, n: int, temperature: float, gen: torch.Generator,
             batch_size: int = 512) -> list[list[tuple[str, bool]]]:
    """n samples per prompt as (text, finished) — finished means EOS was emitted. Plain KV-cache loop
    rather than HF ``generate``, so no generation-config default (top_k=50, ...) sneaks in; every toy
    prompt has the same token length, so no padding or position bookkeeping is needed."""
    model.eval()
    rows = [p for p in prompts for _ in range(n)]
    outs: list[tuple[str, bool]] = []
    for start in range(0, len(rows), batch_size):
        chunk = [encode_prompt(tok, p) for p in rows[start:start + batch_size]]
        if len({len(c) for c in chunk}) != 1:
            raise ValueError("generate() expects prompts of equal token length (toy prompts are)")
        out = model(input_ids=torch.tensor(chunk), use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        done = torch.zeros(len(chunk), dtype=torch.bool)
        steps = []
        for _ in range(MAX_NEW_TOKENS):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float() / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            nxt = nxt.masked_fill(done, tok.pad_token_id)
            steps.append(nxt)
            done |= nxt == tok.eos_token_id
            if bool(done.all()):
                break
            out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        for row in torch.stack(steps, 1).tolist():
            finished = tok.eos_token_id in row
            body = row[: row.index(tok.eos_token_id)] if finished else row
            outs.append((tok.decode(body), finished))
    return [outs[i * n:(i + 1) * n] for i in range(len(prompts))]


def evaluate(model, tok, prompts: list[str], *, n: int, temperature: float, gen) -> dict:
    samples = [(p, t, f) for p, group in zip(prompts, generate(model, tok, prompts, n=n, temperature=temperature, gen=gen))
               for t, f in group]
    styles = Counter((toy.style_of(t) or "invalid") if f else "truncated" for _, t, f in samples)
    total = len(samples)
    return {
        "n": total,
        "accuracy": sum(toy.is_correct(p, t) for p, t, _ in samples) / total,
        "preferred": sum(toy.is_preferred(p, t) for p, t, _ in samples) / total,
        "valid": sum(toy.is_valid(p, t) for p, t, _ in samples) / total,
        "mean_chars": sum(len(t) for _, t, _ in samples) / total,
        "styles": {k: round(v / total, 4) for k, v in sorted(styles.items())},
    }


# -------------------------------------------------------------------------------------------- SFT
def train_sft(model, tok, sft_pairs, val_prompts, args, log) -> dict:
    rng = random.Random(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    prompt_cache: dict[tuple[int, int], list[int]] = {}
    history = []
    for step in range(1, args.sft_max_steps + 1):
        model.train()
        seqs = []
        for a, b in rng.choices(sft_pairs, k=args.sft_batch):
            if (a, b) not in prompt_cache:
                prompt_cache[(a, b)] = encode_prompt(tok, toy.make_prompt(a, b))
            style = toy.sample_style(rng, SFT_STYLE_WEIGHTS)
            seqs.append((prompt_cache[(a, b)], encode_response(tok, toy.render(style, a, b))))
        ids, mask, labels = batch_tensors(seqs, tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            acc = evaluate(model, tok, val_prompts, n=1, temperature=0.0, gen=gen)["accuracy"]
            history.append({"step": step, "loss": round(loss.item(), 4), "val_greedy_accuracy": acc})
            log(f"sft step {step} loss {loss.item():.4f} val greedy acc {acc:.3f}")
            if acc >= args.sft_acc_threshold:
                break
    return {"steps": step, "history": history}


# ------------------------------------------------------------------------------------------ pairs
def build_pairs(prompts, samples, *, target_gap: float, rng: random.Random, id_prefix: str) -> list[dict]:
    """One pair per prompt where the SFT samples contain both a checker-perfect answer (chosen) and a
    finished non-preferred answer (rejected; malformed ones included: they are rightly dispreferred).
    The rejected one is the candidate that brings the running mean length gap closest to
    ``target_gap``: a deliberate, controlled length bias."""
    pairs, gap_sum = [], 0.0
    for prompt, group in zip(prompts, samples):
        texts = sorted({t for t, finished in group if finished})
        chosen = [t for t in texts if toy.checker_reward(prompt, t) == 1.0]
        rejected = [t for t in texts if not toy.is_preferred(prompt, t)]
        if not chosen or not rejected:
            continue
        c = rng.choice(chosen)
        want = target_gap * (len(pairs) + 1) - gap_sum
        r = min(rejected, key=lambda t: (abs(len(c) - len(t) - want), t))
        gap_sum += len(c) - len(r)
        pairs.append({"id": f"{id_prefix}{len(pairs) + 1:05d}", "prompt": prompt, "chosen": c, "rejected": r})
    return pairs


def pair_stats(pairs: list[dict]) -> dict:
    n = len(pairs)
    return {
        "count": n,
        "mean_len_chosen": sum(len(p["chosen"]) for p in pairs) / n,
        "mean_len_rejected": sum(len(p["rejected"]) for p in pairs) / n,
        "mean_len_gap": sum(len(p["chosen"]) - len(p["rejected"]) for p in pairs) / n,
        "rejected_styles": dict(sorted(Counter(toy.style_of(p["rejected"]) or "invalid" for p in pairs).items())),
        "chosen_correct": sum(toy.is_correct(p["prompt"], p["chosen"]) for p in pairs) / n,
    }


def encode_pairs(tok, pairs):
    out = []
    for p in pairs:
        x = encode_prompt(tok, p["prompt"])
        out.append(((x, encode_response(tok, p["chosen"])), (x, encode_response(tok, p["rejected"]))))
    return out


@torch.no_grad()
def pair_logps(model, tok, enc) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    ch, rj = [], []
    for i in range(0, len(enc), 128):
        chunk = enc[i:i + 128]
        ch.append(response_logps(model, [c for c, _ in chunk], tok.pad_token_id))
        rj.append(response_logps(model, [r for _, r in chunk], tok.pad_token_id))
    return torch.cat(ch), torch.cat(rj)


# -------------------------------------------------------------------------------------------- DPO
def train_dpo(policy, ref, tok, pairs, args, log) -> dict:
    enc = encode_pairs(tok, pairs)
    ref_c, ref_r = pair_logps(ref, tok, enc)  # frozen reference: computed once
    opt = torch.optim.AdamW(policy.parameters(), lr=args.dpo_lr, weight_decay=0.0)
    rng = random.Random(args.seed + 3)
    order: list[int] = []
    ema, history = None, []
    for step in range(1, args.dpo_max_steps + 1):
        policy.train()
        if len(order) < args.dpo_batch:
            order += rng.sample(range(len(enc)), len(enc))
        idx, order = order[:args.dpo_batch], order[args.dpo_batch:]
        # chosen and rejected in one forward pass: same padding, half the Python overhead
        both = response_logps(policy, [enc[i][0] for i in idx] + [enc[i][1] for i in idx], tok.pad_token_id)
        pc, pr = both[:len(idx)], both[len(idx):]
        losses, cr, rr = dpo_loss(pc, pr, ref_c[idx], ref_r[idx], beta=args.dpo_beta)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        acc = (cr > rr).float().mean().item()
        ema = acc if ema is None else 0.8 * ema + 0.2 * acc
        if step % 10 == 0:
            history.append({"step": step, "loss": round(losses.mean().item(), 4), "reward_acc_ema": round(ema, 4),
                            "margin": round((cr - rr).mean().item(), 4)})
            log(f"dpo step {step} loss {losses.mean().item():.4f} reward acc ema {ema:.3f} margin {(cr - rr).mean().item():.3f}")
        if step >= 10 and ema >= args.dpo_acc_threshold:
            break
    return {"steps": step, "history": history}


@torch.no_grad()
def implicit_reward_accuracy(policy, ref, tok, pairs) -> float:
    """Share of pairs with S_pi(chosen) - S_ref(chosen) > S_pi(rejected) - S_ref(rejected)."""
    enc = encode_pairs(tok, pairs)
    pc, pr = pair_logps(policy, tok, enc)
    rc, rr = pair_logps(ref, tok, enc)
    return ((pc - rc) > (pr - rr)).float().mean().item()


# ------------------------------------------------------------------------------------------- main
def save_model(model, tok, path: Path) -> None:
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=MAX_NEW_TOKENS)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    args = parse_args()
    t0 = time.time()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    log = lambda msg: print(f"[build_demo {time.time() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(args.seed)
    operands = toy.all_operand_pairs()
    rng.shuffle(operands)
    eval_ops = operands[:args.n_eval_prompts]
    pool_ops = operands[args.n_eval_prompts:args.n_eval_prompts + args.n_train_prompts]
    sft_ops = operands[args.n_eval_prompts:]  # SFT may see every non-eval prompt, never eval ones
    eval_prompts = [toy.make_prompt(a, b) for a, b in eval_ops]
    pool_prompts = [toy.make_prompt(a, b) for a, b in pool_ops]
    val_prompts = pool_prompts[-128:]  # SFT stopping rule only

    tok = toy.build_tokenizer()
    sft = build_model(tok, args.seed)
    log(f"model params {sum(p.numel() for p in sft.parameters()) / 1e6:.3f}M, vocab {len(tok)}")
    sft_info = train_sft(sft, tok, sft_ops, val_prompts, args, log)
    t_sft = time.time() - t0

    gen = torch.Generator().manual_seed(args.seed + 10)
    off_prompts = rng.sample(pool_prompts, args.n_offline_prompts)
    off_samples = generate(sft, tok, off_prompts, n=args.k, temperature=1.0, gen=gen)
    offline = build_pairs(off_prompts, off_samples, target_gap=args.length_gap, rng=rng, id_prefix="off")
    held_samples = generate(sft, tok, eval_prompts, n=args.k, temperature=1.0, gen=gen)
    heldout = build_pairs(eval_prompts, held_samples, target_gap=args.length_gap, rng=rng, id_prefix="held")
    log(f"pairs: {len(offline)} offline, {len(heldout)} held-out")

    ref = copy.deepcopy(sft).eval().requires_grad_(False)
    dpo = copy.deepcopy(sft)
    dpo_info = train_dpo(dpo, ref, tok, offline, args, log)
    t_dpo = time.time() - t0

    metrics = {}
    for name, model in (("sft", sft), ("dpo", dpo)):
        metrics[name] = {
            "greedy": evaluate(model, tok, eval_prompts, n=1, temperature=0.0, gen=gen),
            "sampled": evaluate(model, tok, eval_prompts, n=4, temperature=1.0, gen=gen),
        }
        log(f"{name}: {json.dumps(metrics[name])}")
    metrics["dpo"]["heldout_pair_accuracy"] = implicit_reward_accuracy(dpo, ref, tok, heldout)
    metrics["dpo"]["offline_pair_accuracy"] = implicit_reward_accuracy(dpo, ref, tok, offline)
    log(f"pi0 implicit reward accuracy: held-out {metrics['dpo']['heldout_pair_accuracy']:.3f}")

    save_model(sft, tok, args.out / "sft")
    save_model(dpo, tok, args.out / "dpo")
    write_jsonl(args.out / "prompts.jsonl", [{"id": f"p{i + 1:05d}", "prompt": p} for i, p in enumerate(pool_prompts)])
    write_jsonl(args.out / "eval_prompts.jsonl", [{"id": f"e{i + 1:05d}", "prompt": p} for i, p in enumerate(eval_prompts)])
    write_jsonl(args.out / "offline_pairs.jsonl", offline)
    write_jsonl(args.out / "heldout_pairs.jsonl", heldout)
    report = {
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sft_style_weights": SFT_STYLE_WEIGHTS,
        "params": sum(p.numel() for p in sft.parameters()),
        "sft": {**metrics["sft"], "train": sft_info},
        "dpo": {**metrics["dpo"], "train": dpo_info},
        "offline_pairs": pair_stats(offline),
        "heldout_pairs": pair_stats(heldout),
        "prompts": {"train": len(pool_prompts), "eval": len(eval_prompts)},
        "seconds": {"sft": round(t_sft, 1), "dpo": round(t_dpo - t_sft, 1), "total": round(time.time() - t0, 1)},
        "versions": {"torch": torch.__version__},
    }
    (args.out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"done: {json.dumps(report['seconds'])}")


if __name__ == "__main__":
    main()
