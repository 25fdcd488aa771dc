"""Round plots (PNG) for MLflow: the reward margins of the round's pairs, chosen vs rejected lengths,
the alpha sweep with alpha* marked, and the evaluation metrics over the rounds so far.

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot: no global
figure state, no display needed, safe from the worker threads Prefect runs tasks in."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from selfalign.tasks import artifacts

# (metric key, label) drawn over rounds; keys a run does not have are left out.
ROUND_METRICS = [
    ("eval/accuracy", "accuracy (greedy)"),
    ("eval/preferred_rate", "preferred (greedy)"),
    ("eval/preferred_rate_sampled", "preferred (sampled)"),
    ("eval/label_precision", "label precision"),
    ("eval/pair_accuracy", "held-out pair accuracy"),
]


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def margin_histogram(pairs: list[dict[str, Any]], alpha_star: float, path: Path, title: str = "") -> Path:
    """Histogram of chosen - rejected implicit reward (length-penalised with alpha*) of the
    generated pairs; offline pairs have no implicit reward and are not drawn."""
    margins = _finite(p["chosen_score"] - p["rejected_score"] for p in pairs if p["source"] == "generated")
    fig = _figure()
    ax = fig.add_subplot()
    if margins:
        ax.hist(margins, bins=min(50, max(5, len(margins) // 5)), color="tab:blue", alpha=0.8)
        mean = sum(margins) / len(margins)
        ax.axvline(mean, color="black", linestyle="--", label=f"mean {mean:.3f}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no generated pairs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"reward margin: r(chosen) - r(rejected), alpha* = {alpha_star:g}")
    ax.set_ylabel("pairs")
    ax.set_title(title or "implicit reward margins of the generated pairs")
    return _save(fig, path)


def length_histograms(pairs: list[dict[str, Any]], unit: str, path: Path, title: str = "") -> Path:
    """Chosen vs rejected response lengths, generated pairs and offline (replay) pairs side by side."""
    fig = _figure(9.6, 4.0)
    axes = fig.subplots(1, 2, sharey=False)
    for ax, source in zip(axes, ("generated", "offline")):
        chosen = _finite(p["chosen_len"] for p in pairs if p["source"] == source)
        rejected = _finite(p["rejected_len"] for p in pairs if p["source"] == source)
        if chosen:
            lo, hi = min(chosen + rejected), max(chosen + rejected)
            bins = [lo + (hi - lo + 1) * i / 30 for i in range(31)]
            ax.hist(chosen, bins=bins, alpha=0.6, color="tab:green",
                    label=f"chosen (mean {sum(chosen) / len(chosen):.1f})")
            ax.hist(rejected, bins=bins, alpha=0.6, color="tab:red",
                    label=f"rejected (mean {sum(rejected) / len(rejected):.1f})")
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {source} pairs", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{source} pairs ({len(chosen)})")
        ax.set_xlabel(f"length ({unit})")
        ax.set_ylabel("pairs")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def alpha_sweep(sweep: dict[str, Any], path: Path, title: str = "") -> Path:
    """Mean chosen - rejected length gap of the best-vs-worst pairs as a function of alpha, alpha*
    marked: the length penalty that brings the gap nearest zero."""
    trace = sweep["trace"]
    alphas = [t["alpha"] for t in trace]
    gaps = [t["mean_len_gap"] for t in trace]
    star = sweep["alpha_star"]
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(alphas, gaps, marker=".", color="tab:blue")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.axvline(star, color="tab:red", linestyle="--", label=f"alpha* = {star:g}")
    at = [g for a, g in zip(alphas, gaps) if a == star]
    if at:
        ax.plot([star], at[:1], "o", color="tab:red")
    ax.set_xlabel("alpha (length penalty per unit)")
    ax.set_ylabel("mean length gap, chosen - rejected")
    ax.set_title(title or "alpha sweep")
    ax.legend()
    return _save(fig, path)


def rounds_plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Evaluation metrics against the round (0 = pi_0)."""
    fig = _figure()
    ax = fig.add_subplot()
    for key, label in ROUND_METRICS:
        pts = [(row["round"], row[key]) for row in rows if key in row and math.isfinite(row[key])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    rounds = [row["round"] for row in rows]
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "evaluation over rounds")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return _save(fig, path)


def rounds_so_far(run_dir: Path, r: int) -> list[dict[str, Any]]:
    """The metrics of rounds 0..r that have a metrics.json, as rows with their round."""
    rows = []
    for i in range(r + 1):
        path = Path(run_dir) / f"round_{i}" / "metrics.json"
        if path.exists():
            rows.append({"round": i, **artifacts.read_json(path)})
    return rows


def round_plots(run_dir: Path, r: int, length_unit: str = "chars") -> list[Path]:
    """Writes round r's plots into <run_dir>/round_<r>/plots/ and returns their paths: the pair
    plots where the pair stage ran, and the metrics over rounds 0..r."""
    return pair_plots(run_dir, r, length_unit) + metrics_plots(run_dir, r)


def pair_plots(run_dir: Path, r: int, length_unit: str = "chars") -> list[Path]:
    """Round r's plots of its pairs (margins, lengths, alpha sweep) where the pair stage ran; they
    need nothing that comes after it."""
    rd = Path(run_dir) / f"round_{r}"
    out = rd / "plots"
    paths = []
    if (rd / "pairs.parquet").exists() and (rd / "alpha_sweep.json").exists():
        pairs = artifacts.read_table(rd / "pairs.parquet")
        sweep = artifacts.read_json(rd / "alpha_sweep.json")
        paths.append(margin_histogram(pairs, sweep["alpha_star"], out / "reward_margins.png",
                                      f"round {r}: implicit reward margins of the generated pairs"))
        paths.append(length_histograms(pairs, length_unit, out / "lengths.png", f"round {r}: chosen vs rejected lengths"))
        paths.append(alpha_sweep(sweep, out / "alpha_sweep.png", f"round {r}: alpha sweep"))
    return paths


def metrics_plots(run_dir: Path, r: int) -> list[Path]:
    """The evaluation metrics over rounds 0..r (needs round r's metrics.json)."""
    rows = rounds_so_far(run_dir, r)
    if not rows:
        return []
    return [rounds_plot(rows, Path(run_dir) / f"round_{r}" / "plots" / "rounds.png", f"evaluation, rounds 0-{r}")]
