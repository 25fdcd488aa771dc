"""DICE pair construction (kernels/pairs.py) against the hand-computed toy of docs/algorithms.md §8.6."""
import math
from collections import Counter

import pytest

from selfalign.kernels.pairs import (
    alpha_side,
    best_worst,
    is_degenerate,
    label_precision,
    mean_length_gap,
    mix_replay,
    replay_counts,
    same_text,
    sweep_alpha,
)

# §8.6 toy: score = S_pi - S_ref (summed, no beta), length in characters.
PROMPT_A = ([-310 + 345, -120 + 140, -220 + 248, -95 + 100], [1200, 400, 800, 300])
PROMPT_B = ([-260 + 300, -505 + 560, -170 + 200, -410 + 435], [900, 2000, 600, 1500])
TOY = [PROMPT_A, PROMPT_B]


# --- degenerate filter ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, dropped", [(0, True), (3, True), (4, False), (6699, False), (6700, True)])
def test_degenerate_boundaries_match_dice(n, dropped):
    assert is_degenerate("x" * n) is dropped


def test_degenerate_custom_bounds():
    assert is_degenerate("abc", min_chars=3, max_chars=3) is False
    assert is_degenerate("abcd", min_chars=3, max_chars=3) is True


# --- best vs worst -------------------------------------------------------------------------------

def test_toy_scores_are_the_golden_ones():
    assert PROMPT_A[0] == [35, 20, 28, 5]
    assert PROMPT_B[0] == [40, 55, 30, 25]


def test_toy_pairs_at_alpha_zero():
    assert best_worst(*PROMPT_A, 0.0) == (0, 3)
    assert best_worst(*PROMPT_B, 0.0) == (1, 3)
    assert mean_length_gap(TOY, 0.0) == pytest.approx(700.0)


def test_toy_pairs_at_alpha_star():
    assert best_worst(*PROMPT_A, 0.018) == (2, 3)  # +500 chars
    assert best_worst(*PROMPT_B, 0.018) == (0, 3)  # -600 chars
    assert mean_length_gap(TOY, 0.018) == pytest.approx(-50.0)


def test_length_penalty_flips_the_choice():
    # Long high-scoring answer vs short slightly lower one: alpha decides.
    scores, lengths = [10.0, 9.0, 2.0], [1000, 100, 50]
    assert best_worst(scores, lengths, 0.0) == (0, 2)
    assert best_worst(scores, lengths, 0.01) == (1, 0)  # shaped: 0, 8, 1.5


def test_ties_follow_the_official_argsort():
    # Stable ascending argsort: chosen = last of the maxima, rejected = first of the minima.
    assert best_worst([1.0, 3.0, 3.0, 0.0, 0.0], [0, 0, 0, 0, 0], 0.0) == (2, 3)
    assert best_worst([2.0, 2.0, 2.0], [5, 5, 5], 0.1) == (2, 0)
    # The toy's prompt A ties #1 and #2 exactly at alpha = 0.02; #2 keeps D at -50 there.
    assert best_worst(*PROMPT_A, 0.02) == (2, 3)


@pytest.mark.parametrize("scores, lengths, match", [
    ([1.0], [10], "at least 2"),
    ([], [], "at least 2"),
    ([1.0, 2.0], [10], "differ in size: 2 vs 1"),
    ([1.0, float("nan")], [10, 10], "index 1"),
])
def test_best_worst_rejects_bad_input(scores, lengths, match):
    with pytest.raises(ValueError, match=match):
        best_worst(scores, lengths, 0.0)


def test_mean_length_gap_needs_a_prompt():
    with pytest.raises(ValueError, match="0 groups"):
        mean_length_gap([], 0.0)


# --- alpha sweep ---------------------------------------------------------------------------------

def test_sweep_toy_golden():
    alpha, trace = sweep_alpha(TOY)
    assert alpha == 0.018
    assert [row["alpha"] for row in trace] == [i / 1000 for i in range(22)]  # exact grid, no drift
    assert trace[0]["mean_len_gap"] == pytest.approx(700.0)
    best = next(row for row in trace if row["alpha"] == alpha)
    assert best["mean_len_gap"] == pytest.approx(-50.0)
    # Equal |D| (0.019, 0.020) keeps sweeping; the first strict increase stops it and is recorded.
    assert trace[-1] == {"alpha": 0.021, "mean_len_gap": pytest.approx(-250.0), "n_pairs": 2}
    assert all(row["n_pairs"] == 2 for row in trace)


def test_sweep_alpha_star_is_first_minimum_and_stop_is_first_increase():
    alpha, trace = sweep_alpha(TOY)
    gaps = [abs(row["mean_len_gap"]) for row in trace]
    assert alpha == trace[gaps.index(min(gaps))]["alpha"]
    assert gaps[-1] > min(gaps[:-1])
    assert all(gaps[i] <= min(gaps[:i]) for i in range(1, len(gaps) - 1))


def test_sweep_runs_to_max_alpha_when_gap_never_grows():
    # Chosen and rejected have equal length at every alpha: D = 0 throughout, no early stop.
    groups = [([1.0, 0.0], [50, 50])]
    alpha, trace = sweep_alpha(groups, step=0.1, max_alpha=0.5)
    assert alpha == 0.0
    assert [row["alpha"] for row in trace] == [0.0, 0.1, 0.2, 0.3, 0.4]


def test_sweep_empty_and_bad_step():
    assert sweep_alpha([]) == (0.0, [])
    with pytest.raises(ValueError, match="step"):
        sweep_alpha(TOY, step=0.0)


# Two-sided sweep, by hand. One prompt, (score, length): A (2.0, 10), B (1.5, 20), C (0.0, 40).
# At alpha = 0 the reward prefers the short A over the long C: D(0) = 10 - 40 = -30. With
# t = -alpha >= 0 the shaped scores are A 2 + 10t, B 1.5 + 20t, C 40t:
#   t < 0.05          chosen A, rejected C   D = -30
#   0.05 <= t < 2/30  chosen B, rejected C   D = -20  (t = 0.05: A and B tie, the last maximum wins)
#   2/30 < t < 0.075  chosen B, rejected A   D = +10  (first grid point 0.067)
#   t = 0.075         B and C tie at 3.0: chosen C (last maximum), rejected A: D = +30 > 10, stop
SHORT_TASTE = [([2.0, 1.5, 0.0], [10, 20, 40])]


def test_two_sided_sweep_cancels_a_taste_for_shorter_answers():
    alpha, trace = sweep_alpha(SHORT_TASTE, min_alpha=-1.0)
    assert alpha == -0.067 and alpha_side(alpha) == "shorter"
    gaps = {row["alpha"]: row["mean_len_gap"] for row in trace}
    assert gaps[0.0] == -30 and gaps[-0.049] == -30 and gaps[-0.05] == -20 and gaps[-0.066] == -20
    assert gaps[-0.067] == 10 and gaps[-0.074] == 10
    assert trace[-1]["alpha"] == -0.075 and trace[-1]["mean_len_gap"] == 30  # the stop, recorded
    assert [row["alpha"] for row in trace] == [-i / 1000 for i in range(76)]


def test_one_sided_sweep_cannot_cancel_it():
    # DICE's sweep only walks up: a positive alpha keeps A chosen and C rejected, D stays -30.
    alpha, trace = sweep_alpha(SHORT_TASTE, step=0.1)
    assert alpha == 0.0 and alpha_side(alpha) == "none"
    assert {row["mean_len_gap"] for row in trace} == {-30}


def test_two_sided_sweep_walks_up_like_dice_when_chosen_is_longer():
    assert sweep_alpha(TOY, min_alpha=-1.0) == sweep_alpha(TOY)
    assert alpha_side(sweep_alpha(TOY)[0]) == "longer"


def test_two_sided_sweep_respects_its_lower_bound_and_rejects_a_positive_one():
    alpha, trace = sweep_alpha(SHORT_TASTE, min_alpha=-0.06)
    assert alpha == -0.05 and trace[-1]["alpha"] == -0.059  # |D| 20 is the best before the bound
    with pytest.raises(ValueError, match="min_alpha must be <= 0"):
        sweep_alpha(TOY, min_alpha=0.1)


# --- experience replay ---------------------------------------------------------------------------

@pytest.mark.parametrize("gamma, expected", [
    (0.25, (7500, 2500)),
    (0.5, (5000, 5000)),
    (0.75, (2500, 7500)),
])
def test_replay_counts_golden(gamma, expected):
    assert replay_counts(10000, 9500, gamma) == expected


def test_replay_counts_survive_float_round_off():
    # 10000 * (1 - 0.9) == 999.9999999999998 in floats.
    assert replay_counts(10000, 9500, 0.9) == (1000, 9000)
    assert replay_counts(10000, 9500, 0.1) == (9000, 1000)


def test_replay_counts_capped_by_generated():
    assert replay_counts(10000, 3000, 0.5) == (3000, 3000)


def test_replay_counts_edges():
    assert replay_counts(10000, 9500, 0.0) == (9500, 0)
    assert replay_counts(100, 9500, 0.0) == (9500, 0)  # gamma = 0: every generated pair, as DICE
    assert replay_counts(10000, 9500, 1.0) == (0, 10000)
    assert replay_counts(0, 0, 0.5) == (0, 0)


@pytest.mark.parametrize("gamma, expected", [(0.5, (50, 50)), (0.25, (75, 25)), (0.0, (100, 0)), (1.0, (0, 100))])
def test_replay_budget_fixes_the_pair_count(gamma, expected):
    assert replay_counts(30, 500, gamma, budget=100) == expected
    # too few generated pairs: offline ones fill the budget
    assert replay_counts(300, 20, 0.5, budget=100) == (20, 80)


def test_same_text_ignores_whitespace_only():
    assert same_text("The answer  is\n4.", " The answer is 4.") and not same_text("4", "4.")


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_replay_counts_reject_gamma(gamma):
    with pytest.raises(ValueError, match=f"got {gamma!r}"):
        replay_counts(10, 10, gamma)


def _toy_replay_data():
    generated = [f"p{i}" for i in range(60)]
    offline = [f"p{i}" for i in range(30, 130)]  # prompts p30..p59 are shared
    return generated, offline


def test_mix_replay_counts_and_disjoint_prompts():
    generated, offline = _toy_replay_data()
    gen_idx, off_idx = mix_replay(generated, offline, 0.5, seed=0)
    assert len(gen_idx) == 50  # min(100 * 0.5, 60)
    assert len(off_idx) == 50
    assert gen_idx == sorted(set(gen_idx)) and off_idx == sorted(set(off_idx))
    assert not {generated[i] for i in gen_idx} & {offline[j] for j in off_idx}


def test_mix_replay_deterministic_per_seed():
    generated, offline = _toy_replay_data()
    assert mix_replay(generated, offline, 0.5, seed=7) == mix_replay(generated, offline, 0.5, seed=7)
    draws = {tuple(mix_replay(generated, offline, 0.5, seed=s)[0]) for s in range(5)}
    assert len(draws) > 1


def test_mix_replay_short_disjoint_pool_returns_what_exists():
    generated = ["a", "b", "c", "d"]
    offline = ["a", "b", "c", "d"] * 2 + ["e"]  # 9 offline rows, 1 with a prompt never generated
    # gamma = 0.5: n_gen = min(4, 4) = 4 -> every generated prompt drawn; n_off = 4 but only "e" is left.
    gen_idx, off_idx = mix_replay(generated, offline, 0.5, seed=3)
    assert gen_idx == [0, 1, 2, 3]
    assert off_idx == [8]


def test_mix_replay_offline_draw_is_roughly_uniform():
    generated = [f"g{i}" for i in range(10)]
    offline = [f"o{i}" for i in range(20)]
    counts = Counter(j for s in range(2000) for j in mix_replay(generated, offline, 0.5, seed=s)[1])
    assert set(counts) == set(range(20))
    assert max(counts.values()) < 1.3 * min(counts.values())


# --- label precision -----------------------------------------------------------------------------

def test_label_precision_hand_made():
    chosen = [True, True, False, True, False, True, False]
    rejected = [False, True, True, False, False, False, False]
    # decisive: 0 (chosen), 2 (rejected), 3 (chosen), 5 (chosen); 1 and 4, 6 are not.
    assert label_precision(chosen, rejected) == (0.75, 4)


def test_label_precision_no_decisive_pair():
    precision, n = label_precision([True, False], [True, False])
    assert math.isnan(precision) and n == 0
    precision, n = label_precision([], [])
    assert math.isnan(precision) and n == 0


def test_label_precision_size_mismatch():
    with pytest.raises(ValueError, match="2 vs 1"):
        label_precision([True, False], [True])
