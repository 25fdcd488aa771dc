"""DICE pair construction as pure functions: degenerate filter, length-regularised best-vs-worst
pairs, the alpha sweep, experience-replay counts and mixing, and label precision.

Spec: docs/algorithms.md §2.4-2.6 (official code: `generate_dpo_scores.py::filt_invalid_pairs`,
`generate_lc_paired_set.py::process_dataframes, optimize_alpha, create_mix_paired_set`).
Scores are DPO implicit rewards S_pi(y|x) - S_ref(y|x) (summed log-probs, no beta); lengths are
characters of the stripped response. No torch, no I/O.
"""
from __future__ import annotations

import math
import random
from fractions import Fraction

# Guards floor() against binary round-off in replay counts: 10000 * (1 - 0.9) is
# 999.9999999999998 in floats but means 1000. Counts are integers far below 1e6 / eps.
_FLOOR_EPS = 1e-6


def is_degenerate(text: str, *, min_chars: int = 4, max_chars: int = 6699) -> bool:
    """True when the response should be dropped: keep only min_chars <= len(text) <= max_chars.

    The defaults reproduce DICE's `filt_invalid_pairs` (drop len <= 3 or len >= 6700 characters).
    Truncation (stop_reason == "length") is the caller's filter: it needs the engine's metadata.
    """
    return not (min_chars <= len(text) <= max_chars)


def best_worst(scores: list[float], lengths: list[float], alpha: float) -> tuple[int, int]:
    """(chosen, rejected) indices for one prompt's valid samples.

    r_LR(y) = score(y) - alpha * len(y);  chosen = argmax r_LR, rejected = argmin r_LR.
    Ties as in the official `process_dataframes`, which takes both ends of a stable ascending
    argsort: chosen = LAST index among the maxima, rejected = FIRST index among the minima.
    So chosen != rejected always (all-equal r_LR gives (n-1, 0)). The rule is observable: the
    §8.6 toy ties #1 and #2 of prompt A at alpha = 0.02, and the golden sweep needs #2 there.
    """
    if len(scores) != len(lengths):
        raise ValueError(f"scores and lengths differ in size: {len(scores)} vs {len(lengths)}")
    if len(scores) < 2:
        raise ValueError(f"need at least 2 samples to build a pair, got {len(scores)}")
    shaped = [s - alpha * n for s, n in zip(scores, lengths)]
    for i, r in enumerate(shaped):
        # NaN would make max()/min() order-dependent instead of failing loudly.
        if not math.isfinite(r):
            raise ValueError(f"non-finite shaped score at index {i}: score={scores[i]!r}, "
                             f"length={lengths[i]!r}, alpha={alpha!r}")
    # Keying on (r, i) makes max() pick the last maximum; min() keeps the first minimum.
    chosen = max(range(len(shaped)), key=lambda i: (shaped[i], i))
    rejected = min(range(len(shaped)), key=shaped.__getitem__)
    return chosen, rejected


def mean_length_gap(groups: list[tuple[list[float], list[float]]], alpha: float) -> float:
    """D(alpha) = mean over prompts of len(y_w) - len(y_l) (signed) with pairs built at alpha.

    groups: one (scores, lengths) per prompt, already filtered (>= 2 samples each).
    """
    if not groups:
        raise ValueError("mean_length_gap needs at least one prompt, got 0 groups")
    total = 0.0
    for scores, lengths in groups:
        c, r = best_worst(scores, lengths, alpha)
        total += lengths[c] - lengths[r]
    return total / len(groups)


def sweep_alpha(groups: list[tuple[list[float], list[float]]], *, step: float = 0.001,
                max_alpha: float = 1.0, min_alpha: float = 0.0) -> tuple[float, list[dict]]:
    """Choose alpha* = argmin_alpha |D(alpha)| on a grid that starts at 0 and walks one way.

    One-sided (min_alpha = 0, DICE's `optimize_alpha`): alpha = 0, step, 2*step, ... < max_alpha.
    A positive alpha penalises length, so it can only cancel a reward's taste for LONGER answers.
    Two-sided (min_alpha < 0): the sign of D(0) picks the direction. D(0) > 0 (chosen longer)
    walks up as above; D(0) < 0 (chosen shorter) walks down, 0, -step, -2*step, ... > min_alpha,
    where a negative alpha rewards length and so cancels a taste for SHORTER answers. D(0) = 0
    walks up, as DICE does. (D is non-increasing in alpha, so the other direction could only widen the gap.)

    First-local-minimum early stop, as `optimize_alpha`: the walk ends at the first alpha whose
    |D| is strictly greater than the smallest |D| seen so far (equal |D| keeps going); alpha* is
    the first alpha that reached that smallest |D|. The trace holds every evaluated alpha,
    stopping point included: [{"alpha", "mean_len_gap", "n_pairs"}, ...].
    Empty groups -> (0.0, []).
    """
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step!r}")
    if not (math.isfinite(max_alpha) and math.isfinite(min_alpha)):
        raise ValueError(f"max_alpha and min_alpha must be finite, got {max_alpha!r} and {min_alpha!r}")
    if min_alpha > 0:
        raise ValueError(f"min_alpha must be <= 0 (0 = one-sided, as DICE), got {min_alpha!r}")
    if not groups:
        return 0.0, []
    # alpha_i = i * step as an exact decimal, then the nearest float: 18 * 0.001 gives 0.018,
    # not 0.018000000000000002, so grid points equal their literals and never drift.
    exact_step = Fraction(str(float(step)))
    down = min_alpha < 0 and mean_length_gap(groups, 0.0) < 0
    sign, limit = (-1, -min_alpha) if down else (1, max_alpha)
    best_alpha, best_abs = 0.0, math.inf
    trace: list[dict] = []
    i = 0
    while (size := float(i * exact_step)) < limit:
        alpha = sign * size + 0.0  # + 0.0: -0.0 prints and compares as 0.0
        gap = mean_length_gap(groups, alpha)
        trace.append({"alpha": alpha, "mean_len_gap": gap, "n_pairs": len(groups)})
        if abs(gap) < best_abs:
            best_alpha, best_abs = alpha, abs(gap)
        elif abs(gap) > best_abs:
            break
        i += 1
    return best_alpha, trace


def alpha_side(alpha: float) -> str:
    """Which length taste alpha* cancels: "longer" (alpha > 0 penalises length), "shorter"
    (alpha < 0 rewards it) or "none" (alpha = 0)."""
    return "longer" if alpha > 0 else "shorter" if alpha < 0 else "none"


def replay_counts(n_offline: int, n_generated: int, gamma: float, budget: int = 0) -> tuple[int, int]:
    """(n_gen_used, n_off_used) for experience replay with offline fraction gamma.

    budget = 0, DICE's rule (`create_mix_paired_set`):
        n_gen = min(floor(N_off * (1 - gamma)), N_gen)
        n_off = floor(gamma * n_gen / (1 - gamma))
    so the mixed set has ~N_off pairs, a fraction gamma of them offline; gamma == 0 keeps every
    generated pair and gamma == 1 every offline one (the formula is 0/0 and x/0 there).
    budget = B > 0, a fixed number of pairs per round (so that two runs train on as many pairs):
        n_gen = min(floor(B * (1 - gamma)), N_gen),  n_off = B - n_gen
    offline pairs fill what the generated ones leave. Floors tolerate 1e-6 of float round-off
    (gamma = 0.9, N_off = 10000 gives n_gen = 1000; a plain int() gives 999). gamma outside [0, 1],
    negative counts or budget -> ValueError naming the value. n_off may exceed the offline rows
    left disjoint from the sampled prompts; `mix_replay` then takes what exists.
    """
    if not 0.0 <= gamma <= 1.0:  # also rejects NaN
        raise ValueError(f"gamma (offline fraction) must be in [0, 1], got {gamma!r}")
    if n_offline < 0 or n_generated < 0 or budget < 0:
        raise ValueError(f"counts must be >= 0, got n_offline={n_offline!r}, n_generated={n_generated!r}, "
                         f"budget={budget!r}")
    if budget:
        n_gen = min(math.floor(budget * (1.0 - gamma) + _FLOOR_EPS), n_generated)
        return n_gen, budget - n_gen
    if gamma == 1.0:
        return 0, n_offline
    if gamma == 0.0:
        return n_generated, 0
    n_gen = min(math.floor(n_offline * (1.0 - gamma) + _FLOOR_EPS), n_generated)
    n_off = math.floor(gamma * n_gen / (1.0 - gamma) + _FLOOR_EPS)
    return n_gen, n_off


def mix_replay(generated_prompts: list[str], offline_prompts: list[str], gamma: float,
               seed: int, budget: int = 0) -> tuple[list[int], list[int]]:
    """Indices (generated_idx, offline_idx) of the experience-replay mix, both sorted ascending.

    Counts from `replay_counts(len(offline_prompts), len(generated_prompts), gamma, budget)`. Draws
    n_gen generated rows without replacement, then n_off offline rows without replacement from
    only those offline rows whose prompt is not among the drawn generated prompts, so the two
    parts never share a prompt. If fewer disjoint offline rows exist than n_off, all of them are
    taken (the mix is then smaller) rather than failing. Deterministic per seed (one
    random.Random(seed) for both draws). Duplicate prompts inside one list are the caller's concern.
    """
    n_gen, n_off = replay_counts(len(offline_prompts), len(generated_prompts), gamma, budget)
    rng = random.Random(seed)
    gen_idx = sorted(rng.sample(range(len(generated_prompts)), n_gen))
    used = {generated_prompts[i] for i in gen_idx}
    candidates = [j for j, p in enumerate(offline_prompts) if p not in used]
    off_idx = sorted(rng.sample(candidates, min(n_off, len(candidates))))
    return gen_idx, off_idx


def same_text(a: str, b: str) -> bool:
    """The two responses are the same text once runs of whitespace are one space and the ends are
    stripped: such a pair has no preference to learn."""
    return " ".join(a.split()) == " ".join(b.split())


def label_precision(chosen_flags: list[bool], rejected_flags: list[bool]) -> tuple[float, int]:
    """Precision of pair labels against a preferred property (e.g. "judged better", "correct").

    Decisive pairs: exactly one of chosen/rejected has the property. Returns
    (fraction of decisive pairs where it is the chosen one, number of decisive pairs);
    (nan, 0) when no pair is decisive.
    """
    if len(chosen_flags) != len(rejected_flags):
        raise ValueError(f"flag lists differ in size: {len(chosen_flags)} vs {len(rejected_flags)}")
    decisive = [bool(c) for c, r in zip(chosen_flags, rejected_flags) if bool(c) != bool(r)]
    if not decisive:
        return float("nan"), 0
    return sum(decisive) / len(decisive), len(decisive)
