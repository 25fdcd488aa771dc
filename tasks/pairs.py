"""Pairs stage: from scored samples to the round's training pairs (docs/algorithms.md §2.4-2.6).
Drop truncated, degenerate and (optionally, by a user hook) invalid samples; keep prompts with at
least `min_valid` samples; sweep alpha so that the length penalty cancels the mean chosen-minus-
rejected length; chosen = best, rejected = worst shaped score; mix in offline pairs at fraction gamma
with prompts disjoint from the generated ones. With `pairs.source=offline` (the control arm) the round
trains on offline pairs alone, as many as the DICE arm's budget."""
from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from selfalign.kernels import pairs as rules
from selfalign.tasks import artifacts
from selfalign.tasks.config_base import digest
from selfalign.tasks.data import load_hook
from selfalign.tasks.pairs_config import PairsConfig


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def pairs_key(pc: PairsConfig, scores: Path | None, offline: list[dict[str, str]], seed: int, preferred: str = "",
              checker: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """What the stage is skipped by: its own keys, the two hooks that label its pairs (`run_pairs`),
    the scores, the offline rows and the round's seed; and those config keys by name."""
    settings = pc.keyed() | {"evaluate.preferred": preferred, "evaluate.checker": checker}
    return {"config": digest(settings), "offline": digest(offline),
            "scores": artifacts.input_token(scores) if scores else "", "seed": seed}, settings


def run_pairs(pc: PairsConfig, scores_path: Path | None, offline: list[dict[str, str]], out_path: Path,
              sweep_path: Path, seed: int, log=print, warn=None, preferred: str = "", checker: str = "") -> dict[str, Any]:
    """Round pairs from `scores_path` (None: offline pairs only) and the offline pairs. `preferred`
    and `checker` (the evaluation's hooks, package.module:function) label the generated pairs'
    answers for the label statistics."""
    t0 = time.time()
    warn = warn or log
    samples = artifacts.read_table(scores_path) if scores_path is not None else []
    valid_fn = load_hook(pc.validity, "pairs.validity") if pc.validity else None
    preferred_fn = load_hook(preferred, "evaluate.preferred") if preferred else None
    checker_fn = load_hook(checker, "evaluate.checker") if checker else None

    dropped = {"truncated": 0, "degenerate": 0, "special": 0, "invalid": 0, "identical": 0}
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        if s["finish_reason"] != "stop" or not math.isfinite(s["score"]):
            dropped["truncated"] += 1
        elif rules.is_degenerate(s["response"], min_chars=pc.min_chars, max_chars=pc.max_chars):
            dropped["degenerate"] += 1
        elif s.get("special_tokens"):  # a control token inside the response: its text hides it
            dropped["special"] += 1
        elif valid_fn is not None and not valid_fn(s["prompt"], s["response"]):
            dropped["invalid"] += 1
        else:
            s["length"] = float(len(s["response"]) if pc.length_unit == "chars" else s["n_tokens"])
            by_prompt[s["prompt_id"]].append(s)
    kept = {pid: group for pid, group in by_prompt.items() if len(group) >= pc.min_valid}
    groups = [([s["score"] for s in g], [s["length"] for s in g]) for g in kept.values()]

    alpha, trace = rules.sweep_alpha(groups, step=pc.alpha_step, max_alpha=pc.alpha_max, min_alpha=pc.alpha_min)
    if scores_path is not None:
        artifacts.write_json(sweep_path, {"alpha_star": alpha, "side": rules.alpha_side(alpha), "trace": trace})

    generated = []
    for pid, group in kept.items():
        scores, lengths = [s["score"] for s in group], [s["length"] for s in group]
        best, worst = rules.best_worst(scores, lengths, alpha)
        cw, cl = group[best], group[worst]
        if rules.same_text(cw["response"], cl["response"]):
            dropped["identical"] += 1  # nothing to prefer; typical of a near-greedy temperature
            continue
        generated.append({
            "source": "generated", "prompt_id": pid, "prompt": cw["prompt"],
            "chosen": cw["response"], "rejected": cl["response"],
            "chosen_ids": cw["response_ids"], "rejected_ids": cl["response_ids"],
            # The training reference is the start-of-round policy, which is the scoring policy:
            # its log-probs are already here, so training needs no reference forward for these.
            "ref_chosen_logp": cw["policy_logp"], "ref_rejected_logp": cl["policy_logp"],
            # MRPO's additional references, scored by the score stage (empty for other losses)
            "mrpo_ref_chosen_logps": list(cw.get("mrpo_ref_logps") or []),
            "mrpo_ref_rejected_logps": list(cl.get("mrpo_ref_logps") or []),
            "chosen_score": cw["score"] - alpha * cw["length"], "rejected_score": cl["score"] - alpha * cl["length"],
            "chosen_len": cw["length"], "rejected_len": cl["length"],
        })

    gamma = 1.0 if pc.source == "offline" else pc.gamma
    gen_idx, off_idx = rules.mix_replay([g["prompt"] for g in generated], [o["prompt"] for o in offline],
                                        gamma, seed, pc.budget)
    if pc.source == "dice" and len(gen_idx) < len(generated):
        warn(f"pairs: replay uses {len(gen_idx)} of the {len(generated)} generated pairs built "
             f"(pairs.gamma={pc.gamma}, pairs.budget={pc.budget}, {len(offline)} offline pairs)")
    if pc.budget and len(gen_idx) + len(off_idx) < pc.budget:
        warn(f"pairs: {len(gen_idx) + len(off_idx)} pairs, short of pairs.budget={pc.budget}: too few offline "
             f"pairs ({len(offline)}) with prompts apart from the generated ones")
    rows = [generated[i] for i in gen_idx]
    for i in off_idx:
        o = offline[i]
        unit = (lambda t: float(len(t))) if pc.length_unit == "chars" else (lambda t: math.nan)
        rows.append({
            "source": "offline", "prompt_id": o["id"], "prompt": o["prompt"],
            "chosen": o["chosen"], "rejected": o["rejected"], "chosen_ids": [], "rejected_ids": [],
            "ref_chosen_logp": math.nan, "ref_rejected_logp": math.nan,
            "mrpo_ref_chosen_logps": [], "mrpo_ref_rejected_logps": [],
            "chosen_score": math.nan, "rejected_score": math.nan,
            "chosen_len": unit(o["chosen"]), "rejected_len": unit(o["rejected"]),
        })
    artifacts.write_table(out_path, rows)

    gap0 = trace[0]["mean_len_gap"] if trace else math.nan
    stats = {
        "alpha_star": alpha,
        "alpha_side": {"none": 0, "longer": 1, "shorter": -1}[rules.alpha_side(alpha)],
        "pairs/prompts": len({s["prompt_id"] for s in samples}),
        "pairs/prompts_kept": len(kept),
        "pairs/generated_built": len(generated),
        "pairs/generated": len(gen_idx),
        "pairs/offline": len(off_idx),
        "pairs/kept": len(rows),
        "pairs/dropped_truncated": dropped["truncated"],
        "pairs/dropped_degenerate": dropped["degenerate"],
        "pairs/dropped_special": dropped["special"],
        "pairs/dropped_invalid": dropped["invalid"],
        "pairs/dropped_identical": dropped["identical"],
        "len/gap_alpha0": gap0,
        "len/gap": _mean([g["chosen_len"] - g["rejected_len"] for g in generated]),
        "len/chosen_mean": _mean([g["chosen_len"] for g in generated]),
        "len/rejected_mean": _mean([g["rejected_len"] for g in generated]),
        "pairs/seconds": time.time() - t0,
    }
    if preferred_fn is not None:
        chosen_ok = [bool(preferred_fn(g["prompt"], g["chosen"])) for g in generated]
        prec, n = rules.label_precision(chosen_ok, [preferred_fn(g["prompt"], g["rejected"]) for g in generated])
        stats["eval/label_precision"], stats["pairs/decisive"] = prec, n
        stats["pairs/chosen_preferred"] = _mean([float(ok) for ok in chosen_ok])
    if checker_fn is not None:
        stats["pairs/chosen_correct"] = _mean([float(bool(checker_fn(g["prompt"], g["chosen"]))) for g in generated])
    log(f"pairs: {len(kept)}/{stats['pairs/prompts']} prompts kept (dropped {dropped}), alpha*={alpha:.3f} "
        f"({rules.alpha_side(alpha)}), "
        f"length gap {gap0:+.1f} -> {stats['len/gap']:+.1f}, {len(gen_idx)} generated + {len(off_idx)} offline pairs")
    return stats
