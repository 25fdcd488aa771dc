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

TABLE = [  # (header, metric key, format)
    ("round", "round", "{:d}"),
    ("preferred", "eval/preferred_rate", "{:.3f}"),
    ("pref(sampled)", "eval/preferred_rate_sampled", "{:.3f}"),
    ("accuracy", "eval/accuracy", "{:.3f}"),
    ("label_prec", "eval/label_precision", "{:.3f}"),
    ("pair_acc", "eval/pair_accuracy", "{:.3f}"),
    ("alpha*", "alpha_star", "{:.3f}"),
    ("pairs", "pairs/kept", "{:d}"),
    ("len_chosen", "len/chosen_mean", "{:.1f}"),
    ("len_rejected", "len/rejected_mean", "{:.1f}"),
    ("seconds", "round/seconds", "{:.0f}"),
]
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class CompareError(LookupError):
    """The run or its store cannot be found; the message says what was looked for."""


def _cells(rows: list[dict]) -> list[list[str]]:
    cells = [[h for h, _, _ in TABLE]]
    for row in rows:
        line = []
        for _, key, fmt in TABLE:
            v = row.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                line.append("-")
            else:
                line.append(fmt.format(int(v) if fmt == "{:d}" else v))
        cells.append(line)
    return cells


def format_table(rows: list[dict]) -> str:
    """The round table as aligned text, one line per round."""
    cells = _cells(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE))]
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
