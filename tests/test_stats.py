"""Intervals over prompts (kernels/stats.py), by hand."""
import math

import pytest

from selfalign.kernels.stats import Z95, mean_ci, paired_diff_ci, per_prompt


def test_mean_ci_by_hand():
    # values 1, 0, 1, 1: mean 0.75, sample variance (3 * 0.0625 + 0.5625) / 3 = 0.25, se = 0.25
    mean, half = mean_ci([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and half == pytest.approx(Z95 * 0.25)


def test_mean_ci_edges():
    assert all(math.isnan(x) for x in mean_ci([]))
    mean, half = mean_ci([1.0])
    assert mean == 1.0 and math.isnan(half)
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0)


def test_paired_difference_uses_common_prompts_only():
    a = {"p1": 1.0, "p2": 1.0, "p3": 0.0, "only_a": 1.0}
    b = {"p1": 0.0, "p2": 1.0, "p3": 0.0, "only_b": 0.0}
    d, half, n = paired_diff_ci(a, b)
    # differences 1, 0, 0: mean 1/3, sample variance ((2/3)^2 + 2 * (1/3)^2) / 2 = 1/3
    assert n == 3 and d == pytest.approx(1 / 3) and half == pytest.approx(Z95 * math.sqrt(1 / 9))


def test_per_prompt_means_over_samples():
    rows = [{"prompt_id": "a", "v": 1}, {"prompt_id": "a", "v": 0}, {"prompt_id": "b", "v": 1}]
    assert per_prompt(rows, lambda r: r["v"]) == {"a": 0.5, "b": 1.0}
