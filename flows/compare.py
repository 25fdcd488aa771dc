"""Comparing rounds: the round table of a run, read back from MLflow (any tracking URI: the run's
SQLite store, a tracking server), printed, or written as CSV or Markdown.

Where the numbers come from: the parent run gets every round's metrics at step = round (round 0 is
pi_0's evaluation), so its metric histories are the table. A round whose nested run has metrics the
parent has not received yet (a run still going, or one that died mid-round) is filled in from that
nested run."""
from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path
from typing import Any

TABLE = [  # (header, metric key, format); a rate with a `<key>_ci95` shows its 95% half-width too
    ("round", "round", "{:d}"),
    ("preferred", "eval/preferred_rate", "{:.3f}"),
    ("pref(sampled)", "eval/preferred_rate_sampled", "{:.3f}"),
    ("accuracy", "eval/accuracy", "{:.3f}"),
    ("label_prec", "eval/label_precision", "{:.3f}"),
    ("chosen_ok", "pairs/chosen_correct", "{:.3f}"),
    ("pair_acc", "eval/pair_accuracy", "{:.3f}"),
    ("alpha*", "alpha_star", "{:+.3f}"),
    ("gen_used", "pairs/generated", "{:d}"),
    ("gen_built", "pairs/generated_built", "{:d}"),
    ("pairs", "pairs/kept", "{:d}"),
    ("len_chosen", "len/chosen_mean", "{:.1f}"),
    ("len_rejected", "len/rejected_mean", "{:.1f}"),
    ("seconds", "round/seconds", "{:.0f}"),
]
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class CompareError(LookupError):
    """The run or its store cannot be found; the message says what was looked for."""


def _columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """TABLE, with a column per evaluation group after the overall rate (eval/preferred_rate/<group>)."""
    groups = sorted({k.split("/", 2)[2] for row in rows for k in row if k.startswith("eval/preferred_rate/")})
    cols = []
    for col in TABLE:
        cols.append(col)
        if col[1] == "eval/preferred_rate":
            cols += [(f"pref[{g}]", f"eval/preferred_rate/{g}", "{:.3f}") for g in groups]
    return cols


def _ci_key(key: str) -> str:
    head, _, group = key.partition("/")[2].partition("/")
    return f"eval/{head}_ci95" + (f"/{group}" if group else "") if key.startswith("eval/") else ""


def _cells(rows: list[dict]) -> list[list[str]]:
    cols = _columns(rows)
    cells = [[h for h, _, _ in cols]]
    for row in rows:
        line = []
        for _, key, fmt in cols:
            v = row.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                line.append("-")
                continue
            text = fmt.format(int(v) if fmt == "{:d}" else v)
            ci = row.get(_ci_key(key))
            if ci is not None and not math.isnan(ci):
                text += f"±{ci:.3f}"
            line.append(text)
        cells.append(line)
    return cells


def format_table(rows: list[dict]) -> str:
    """The round table as aligned text, one line per round."""
    cells = _cells(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def format_markdown(rows: list[dict]) -> str:
    cells = _cells(rows)
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---:" for _ in cells[0]) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in cells[1:]]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    """Every metric of every round, full precision: the table's columns first, then the rest sorted."""
    first = [key for _, key, _ in TABLE]
    rest = sorted({k for row in rows for k in row} - set(first))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(first + rest)
        for row in rows:
            w.writerow(["" if row.get(k) is None else row[k] for k in first + rest])


def default_uri(run: str) -> str:
    """MLFLOW_TRACKING_URI, else the default store of a run of that name under ./runs."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path("runs") / run / "mlflow.db"
    if db.is_file():
        return f"sqlite:///{db.resolve()}"
    raise CompareError(f"no tracking URI: pass --uri, set MLFLOW_TRACKING_URI, or run from the folder holding {db}")


def find_run(client, run: str, experiment: str | None = None):
    """The parent run named `run` (the latest one if the name was reused) or with that id. The id
    of a round's nested run leads to its parent."""
    if _RUN_ID.match(run):
        from mlflow.exceptions import MlflowException

        try:
            found = client.get_run(run)
        except MlflowException:
            found = None
        if found is not None:
            parent = found.data.tags.get("mlflow.parentRunId")
            return client.get_run(parent) if parent else found
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise CompareError(f"no MLflow experiment named {experiment!r} at {client.tracking_uri}")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    name = run.replace("'", "\\'")
    runs = [r for r in client.search_runs(ids, filter_string=f"attributes.run_name = '{name}'",
                                          order_by=["attributes.start_time DESC"])
            if "mlflow.parentRunId" not in r.data.tags]
    if not runs:
        raise CompareError(f"no MLflow run named or with id {run!r} at {client.tracking_uri}")
    return runs[0]


def round_rows(client, parent) -> list[dict[str, Any]]:
    """One dict of metrics per round, sorted by round."""
    rows: dict[int, dict[str, Any]] = {}
    stamps: dict[tuple[int, str], int] = {}
    for key in parent.data.metrics:
        for m in client.get_metric_history(parent.info.run_id, key):
            # A key logged twice at one step (a resumed round) keeps its latest value.
            if stamps.get((m.step, key), -1) <= m.timestamp:
                stamps[(m.step, key)] = m.timestamp
                rows.setdefault(m.step, {"round": m.step})[key] = m.value
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    for child in children:
        r = child.data.params.get("round")
        if r is not None and int(r) not in rows:
            rows[int(r)] = {"round": int(r), **child.data.metrics}
    return [rows[r] for r in sorted(rows)]


def compare(run: str, uri: str | None = None, experiment: str | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """(parent run, round rows) of `run`, a run name or MLflow run id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    uri = uri or default_uri(run)
    # MLflow would create an empty store at a mistyped SQLite path.
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise CompareError(f"no MLflow store at {uri}")
    client = MlflowClient(tracking_uri=uri)
    parent = find_run(client, run, experiment)
    return parent, round_rows(client, parent)


def run_folder(parent) -> Path:
    """The run folder of an MLflow parent run, from its `run.dir` and `run.name` params."""
    params = parent.data.params
    return Path(params.get("run.dir") or Path("runs") / params.get("run.name", parent.info.run_name))


def arm_rows(run_dir: Path | str, control_dir: Path | str) -> list[dict[str, Any]]:
    """The two arms side by side, per round both evaluated and per rate: each arm's value and the
    paired difference over the eval prompts (run - control) with its 95% interval. Read from the
    rounds' eval_per_prompt.json (tasks/evaluate)."""
    from selfalign.kernels.stats import mean_ci, paired_diff_ci

    from selfalign.tasks.artifacts import read_json

    out = []
    r = 0
    base = read_json(Path(run_dir) / "round_0" / "eval_per_prompt.json") \
        if (Path(run_dir) / "round_0" / "eval_per_prompt.json").is_file() else {}
    while (a := Path(run_dir) / f"round_{r}" / "eval_per_prompt.json").is_file() and \
            (b := Path(control_dir) / f"round_{r}" / "eval_per_prompt.json").is_file():
        pa, pb = read_json(a), read_json(b)
        groups = pa.get("groups") or {}
        for mode in ("greedy", "sampled"):
            for rate, va in (pa.get(mode) or {}).items():
                vb = (pb.get(mode) or {}).get(rate)
                if vb is None:
                    continue
                name = rate if mode == "greedy" else f"{rate}_sampled"
                subsets = [("all", None)] + [(g, g) for g in sorted(set(groups.values()))]
                for label, g in subsets:
                    keep = (lambda k: True) if g is None else (lambda k, g=g: groups.get(k) == g)
                    sa = {k: v for k, v in va.items() if keep(k)}
                    sb = {k: v for k, v in vb.items() if keep(k)}
                    d, half, n = paired_diff_ci(sa, sb)
                    s0 = {k: v for k, v in ((base.get(mode) or {}).get(rate) or {}).items() if keep(k)}
                    out.append({"round": r, "metric": name if g is None else f"{name}/{label}", "prompts": n,
                                "run": mean_ci(list(sa.values())), "control": mean_ci(list(sb.values())),
                                "diff": d, "diff_ci95": half, "vs_pi0": paired_diff_ci(sa, s0)[:2]})
        r += 1
    return out


def format_arms(rows: list[dict[str, Any]], names: tuple[str, str] = ("dice", "offline")) -> str:
    """The arm comparison as aligned text: value +- 95% half-width per arm, then the difference."""
    def pm(m: float, h: float) -> str:
        return "-" if math.isnan(m) else f"{m:.3f} ± {h:.3f}" if not math.isnan(h) else f"{m:.3f}"

    cells = [["round", "metric", "prompts", names[0], names[1], f"{names[0]} - {names[1]}", f"{names[0]} - pi_0"]]
    for row in rows:
        cells.append([str(row["round"]), row["metric"], str(row["prompts"]), pm(*row["run"]), pm(*row["control"]),
                      pm(row["diff"], row["diff_ci95"]), pm(*row["vs_pi0"]) if row["round"] else "-"])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in cells)
