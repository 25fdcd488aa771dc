"""Builds the embedded demo's assets (tiny SFT model, initial DPO model π0, prompts, offline and held-out
preference pairs) for the toy addition-with-style task in ``selfalign.tasks.toy``.

    .venv/bin/python scripts/build_demo.py [--seed 0] [--out assets/demo]

Deterministic for a given seed and machine (single-process CPU, torch's default CPU kernels), and
CPU-only: about a few minutes on 2 cores. Steps:
  1. prompts: all 8100 operand pairs shuffled; 200 held-out eval prompts, a 3000-prompt training pool.
  2. SFT from scratch in two phases (mostly short styles to learn the addition cheaply, then the
     target style mixture), each stopped once accuracy on held-out validation prompts reaches a
     threshold (accuracy jumps late and fast on this kind of task, so a threshold is both faster and
     more reproducible than a fixed long schedule). The thresholds are high on purpose (greedy 0.99,
     sampled 0.97): an SFT model stopped at 0.8 / 0.7 got one sampled sum in six wrong, and DICE's
     implicit reward, which favours rare samples, turned those into an arithmetic collapse.
  3. offline pairs from the SFT model's own samples (K per prompt, temperature 1): chosen = a checker-
     perfect answer (polite and correct), rejected = a correct answer in another style (same numbers,
     so the pair differs only in style), picked so that chosen is on average ``--length-gap``
     characters longer (the bias DICE's α sweep must remove).
  4. π0 = DPO (sigmoid, summed log-probs, frozen SFT reference), one epoch over the offline pairs:
     short enough that π0 still leaves the preferred style headroom at temperature 1.
  5. metrics of SFT and π0 (greedy and sampled) and π0's implicit-reward accuracy on held-out pairs.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

# Before torch loads OpenMP: with the default (spinning) wait policy, 2 threads on 2 cores shared
# with another busy process (a vLLM engine, a test run) slowed SFT 12-38x here; passive waiting kept
# it to 2-3x. The thread count, and so every result, is unchanged (rebuilt assets are byte-identical).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from selfalign.kernels.logps import sequence_logps, token_logps  # noqa: E402
from selfalign.kernels.losses import dpo_loss  # noqa: E402
from selfalign.tasks import toy  # noqa: E402
from selfalign.tasks.data import encode_prompt, encode_response  # noqa: E402

# SFT style mixture: the preferred style is a minority so that the sampled polite rate starts low,
# and greedy decoding of the SFT model is not polite: after the shared core it picks the likeliest
# next token, EOS (plain, 0.45) over "." (curt + polite, 0.40).
SFT_STYLE_WEIGHTS = {"polite": 0.25, "plain": 0.45, "curt": 0.15, "rambling": 0.15}
ADDITION_PHASE_WEIGHTS = {"polite": 0.10, "plain": 0.50, "curt": 0.30, "rambling": 0.10}
MAX_NEW_TOKENS = 48  # longest valid response (rambling, 43 chars) + EOS = 44 tokens
SHORT_RESPONSE = 30  # response tokens: plain and curt are at most this, polite and rambling above


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("assets/demo"))
    p.add_argument("--n-train-prompts", type=int, default=3000)
    p.add_argument("--n-eval-prompts", type=int, default=200)
    p.add_argument("--n-offline-prompts", type=int, default=400, help="pool prompts sampled for offline pairs")
    p.add_argument("--k", type=int, default=8, help="SFT samples per prompt when building pairs")
    p.add_argument("--length-gap", type=float, default=12.0, help="target mean len(chosen)-len(rejected), chars")
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--sft-max-steps", type=int, default=4000, help="cap per SFT phase")
    p.add_argument("--sft-acc-threshold", type=float, default=0.99,
                   help="end SFT's addition phase at this greedy validation accuracy")
    p.add_argument("--sft-sampled-threshold", type=float, default=0.97,
                   help="end SFT's styles phase at this sampled (T=1) validation accuracy")
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--dpo-lr", type=float, default=5e-5)
    p.add_argument("--dpo-batch", type=int, default=32)
    p.add_argument("--dpo-epochs", type=int, default=1)
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
def sft_step(model, opt, tok, rng, ops, weights, batch, prompt_cache) -> float:
    """One optimiser step on ``batch`` fresh (prompt, style) examples; returns the token-mean loss."""
    seqs = []
    for a, b in rng.choices(ops, k=batch):
        if (a, b) not in prompt_cache:
            prompt_cache[(a, b)] = encode_prompt(tok, toy.make_prompt(a, b))
        style = toy.sample_style(rng, weights)
        seqs.append((prompt_cache[(a, b)], encode_response(tok, toy.render(style, a, b))))
    # Short (plain/curt) and long (polite/rambling) rows as two gradient-accumulated micro-batches:
    # padding every row to the longest style wasted ~30% of the compute.
    n_tokens = sum(len(r) for _, r in seqs)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for part in ([s for s in seqs if len(s[1]) <= SHORT_RESPONSE], [s for s in seqs if len(s[1]) > SHORT_RESPONSE]):
        if not part:
            continue
        ids, mask, labels = batch_tensors(part, tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               reduction="sum") / n_tokens
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return total


def train_sft(model, tok, ops, val_prompts, args, log) -> dict:
    """Two-phase curriculum, each phase stopped by a threshold on held-out validation prompts.
    Phase "addition": mostly the short styles, where a row costs ~2.5x less compute and the answer
    digits are a large share of the loss; the long styles stay at 10% each so the sum is also learned
    after restated operands. Ends when greedy accuracy >= --sft-acc-threshold.
    Phase "styles": the target mixture ``SFT_STYLE_WEIGHTS``, at least 300 steps so the style shares
    settle, until sampled (T=1) accuracy >= --sft-sampled-threshold with <= 10% malformed samples."""
    rng = random.Random(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 2)
    cache: dict[tuple[int, int], list[int]] = {}
    history, step = [], 0
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, betas=(0.9, 0.98), weight_decay=0.0)
    phases = [("addition", ADDITION_PHASE_WEIGHTS, 64, args.sft_lr), ("styles", SFT_STYLE_WEIGHTS, 32, args.sft_lr / 2)]
    for phase, weights, batch, lr in phases:
        phase_steps = 0
        while phase_steps < args.sft_max_steps:
            model.train()
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 50)  # 50-step warm-up from scratch
            loss = sft_step(model, opt, tok, rng, ops, weights, batch, cache)
            step, phase_steps = step + 1, phase_steps + 1
            if phase == "addition" and phase_steps % 50 == 0:
                m = evaluate(model, tok, val_prompts, n=1, temperature=0.0, gen=gen)
                history.append({"phase": phase, "step": step, "loss": round(loss, 4), "val_greedy_accuracy": m["accuracy"]})
                log(f"sft {phase} step {step} loss {loss:.4f} val greedy acc {m['accuracy']:.3f}")
                if m["accuracy"] >= args.sft_acc_threshold:
                    break
            elif phase == "styles" and phase_steps >= 300 and phase_steps % 100 == 0:
                m = evaluate(model, tok, val_prompts, n=2, temperature=1.0, gen=gen)
                history.append({"phase": phase, "step": step, "loss": round(loss, 4), "val_sampled_accuracy": m["accuracy"],
                                "val_sampled_styles": m["styles"]})
                log(f"sft {phase} step {step} loss {loss:.4f} val sampled acc {m['accuracy']:.3f} styles {m['styles']}")
                if m["accuracy"] >= args.sft_sampled_threshold and m["styles"].get("invalid", 0) <= 0.1:
                    break
    return {"steps": step, "history": history}


# ------------------------------------------------------------------------------------------ pairs
def build_pairs(prompts, samples, *, target_gap: float, rng: random.Random, id_prefix: str) -> list[dict]:
    """One pair per prompt where the SFT samples contain a checker-perfect answer (chosen: polite and
    correct) and a valid, correct answer in another style (rejected). Both state the same numbers, so
    a pair differs only in its ending: every style shares the core "a plus b is n", whose summed
    log-probs then cancel exactly in DPO's margin. Wrong or malformed rejected answers are left out on
    purpose: with them, π0 learned a global digit shift away from the SFT model's typical errors, and
    its implicit reward came to prefer sums off by one or ten (which DICE rounds then amplify).
    The rejected answer is the candidate that brings the running mean length gap closest to
    ``target_gap``: a deliberate, controlled length bias."""
    pairs, gap_sum = [], 0.0
    for prompt, group in zip(prompts, samples):
        texts = sorted({t for t, finished in group if finished})
        chosen = [t for t in texts if toy.checker_reward(prompt, t) == 1.0]
        rejected = [t for t in texts if toy.is_valid(prompt, t) and toy.is_correct(prompt, t)
                    and not toy.is_preferred(prompt, t)]
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
        "rejected_styles": dict(sorted(Counter(toy.style_of(p["rejected"]) if toy.is_valid(p["prompt"], p["rejected"])
                                               else "invalid" for p in pairs).items())),
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
    """Plain DPO for --dpo-epochs passes over the offline pairs (shuffled, batch --dpo-batch).
    Deliberately short: on this task every extra epoch lifts the polite share but also erodes operand
    copying and sums (rejected answers share the chosen one's digits, and DPO keeps pushing their
    log-probs down), so a long π0 would be both saturated and wrong."""
    enc = encode_pairs(tok, pairs)
    ref_c, ref_r = pair_logps(ref, tok, enc)  # frozen reference: computed once
    opt = torch.optim.AdamW(policy.parameters(), lr=args.dpo_lr, weight_decay=0.0)
    rng = random.Random(args.seed + 3)
    history, step = [], 0
    for epoch in range(args.dpo_epochs):
        order = rng.sample(range(len(enc)), len(enc))
        for start in range(0, len(order), args.dpo_batch):
            policy.train()
            idx = order[start:start + args.dpo_batch]
            # chosen and rejected in one forward pass: same padding, half the Python overhead
            both = response_logps(policy, [enc[i][0] for i in idx] + [enc[i][1] for i in idx], tok.pad_token_id)
            pc, pr = both[:len(idx)], both[len(idx):]
            losses, cr, rr = dpo_loss(pc, pr, ref_c[idx], ref_r[idx], beta=args.dpo_beta)
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            step += 1
            history.append({"epoch": epoch, "step": step, "loss": round(losses.mean().item(), 4),
                            "reward_acc": round((cr > rr).float().mean().item(), 4),
                            "margin": round((cr - rr).mean().item(), 4)})
        log(f"dpo epoch {epoch} step {step}: {history[-1]}")
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
    val_ops = operands[-128:]  # SFT's stopping rule only; disjoint from everything else
    sft_ops = operands[args.n_eval_prompts:-128]  # SFT sees the pool and the rest, never eval/val
    eval_prompts = [toy.make_prompt(a, b) for a, b in eval_ops]
    pool_prompts = [toy.make_prompt(a, b) for a, b in pool_ops]
    val_prompts = [toy.make_prompt(a, b) for a, b in val_ops]

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

    t_pairs = time.time() - t0
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
        "sft_style_weights": {"addition_phase": ADDITION_PHASE_WEIGHTS, "styles_phase": SFT_STYLE_WEIGHTS},
        "params": sum(p.numel() for p in sft.parameters()),
        "sft": {**metrics["sft"], "train": sft_info},
        "dpo": {**metrics["dpo"], "train": dpo_info},
        "offline_pairs": pair_stats(offline),
        "heldout_pairs": pair_stats(heldout),
        "prompts": {"train": len(pool_prompts), "eval": len(eval_prompts)},
        "seconds": {"sft": round(t_sft, 1), "pairs": round(t_pairs - t_sft, 1), "dpo": round(t_dpo - t_pairs, 1),
                    "total": round(time.time() - t0, 1)},
        "versions": {"torch": torch.__version__},
    }
    (args.out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"done: {json.dumps(report['seconds'])}")


if __name__ == "__main__":
    main()
