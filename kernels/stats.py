"""Intervals for evaluation rates, over prompts. Pure Python, no I/O.

An eval rate is a mean over prompts of a per-prompt value (1/0 for a greedy answer, the fraction of
its sampled answers otherwise), so its uncertainty comes from which prompts were drawn. The 95%
interval is the normal approximation mean +- 1.96 * s / sqrt(n), s the sample standard deviation of
the per-prompt values. Two runs evaluated on the same prompts are compared by the paired
difference: the per-prompt differences, with the same interval; that removes the variance the two
runs share (a prompt both get right) and is narrower than the two intervals side by side.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, 95% half-width) of per-prompt values; (nan, nan) for none, half-width nan for one."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, Z95 * math.sqrt(var / n)


def paired_diff_ci(a: dict[str, float], b: dict[str, float]) -> tuple[float, float, int]:
    """(mean of a - b, 95% half-width, prompts) over the prompts both dicts have (prompt id -> value)."""
    common = sorted(a.keys() & b.keys())
    mean, half = mean_ci([a[k] - b[k] for k in common])
    return mean, half, len(common)


def per_prompt(rows: list[dict], value) -> dict[str, float]:
    """prompt_id -> mean of value(row) over that prompt's rows (one greedy answer, or its samples)."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        s = sums.setdefault(row["prompt_id"], [0.0, 0.0])
        s[0] += float(value(row))
        s[1] += 1.0
    return {k: s / n for k, (s, n) in sums.items()}
