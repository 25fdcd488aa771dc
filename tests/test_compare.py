"""`selfalign compare`: the round table read back from an MLflow store written through the tracking
seam the way the run flow writes it (parent metrics at step = round, one nested run per round)."""
import csv

import pytest

from selfalign.flows.cli import main
from selfalign.tasks.tracking import MlflowLogger


def round_metrics(r: int) -> dict:
    return {"eval/preferred_rate": 0.5 + 0.1 * r, "eval/accuracy": 0.9 - 0.1 * r, "eval/label_precision": 0.95,
            "eval/pair_accuracy": 0.97, "alpha_star": 0.004 * r, "pairs/kept": 300 + r, "len/chosen_mean": 31.5,
            "len/rejected_mean": 33.0, "round/seconds": 60.0}


def fake_run(uri: str, name: str, rounds: int, reported: int, offset: float = 0.0) -> MlflowLogger:
    """A run of `rounds` rounds whose parent has received the metrics of the first `reported`."""
    parent = MlflowLogger(uri, "selfalign", name)
    parent.log_metrics({"eval/preferred_rate": 0.4 + offset, "eval/accuracy": 0.96, "round/seconds": 20.0}, step=0)
    for r in range(1, rounds + 1):
        child = parent.child(f"round_{r}")
        child.log_params({"round": r})
        for step in (1, 2):
            child.log_metrics({"loss": 0.69 - 0.01 * step}, step=step)
        child.log_metrics(round_metrics(r), step=r)
        child.close()
        if r <= reported:
            parent.log_metrics(round_metrics(r), step=r)
    return parent


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    old = fake_run(uri, "demo", rounds=1, reported=1, offset=0.3)
    old.close()
    new = fake_run(uri, "demo", rounds=3, reported=2)  # round 3 finished, the parent not told yet
    return uri, old, new


def test_compare_prints_the_latest_run_of_a_name(store, tmp_path, capsys):
    uri, old, new = store
    md, table = tmp_path / "t.md", tmp_path / "t.csv"
    assert main(["compare", "demo", "--uri", uri, "--csv", str(table), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert new.run_id in out and old.run_id not in out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["round", "preferred"])
    rows = [line.split() for line in lines[head + 1:head + 5]]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0][1] == "0.400" and rows[0][5] == rows[0][7] == "-"          # pi_0: no pairs, no alpha
    assert rows[2][1] == "0.700" and rows[2][7] == "+0.008" and rows[2][10] == "302"
    assert rows[3][1] == "0.800"                                 # from round 3's nested run

    with open(table, newline="") as f:
        got = list(csv.DictReader(f))
    assert [g["round"] for g in got] == ["0", "1", "2", "3"]
    assert float(got[1]["eval/accuracy"]) == pytest.approx(0.8) and got[0]["alpha_star"] == ""
    text = md.read_text()
    assert text.startswith("| round | preferred |") and "| 2 | 0.700 |" in text


def test_compare_by_run_id_of_parent_or_round(store, capsys):
    uri, old, _ = store
    assert main(["compare", old.run_id, "--uri", uri]) == 0
    out = capsys.readouterr().out
    assert old.run_id in out and "0.700" in out  # round 0 of the old run: 0.4 + 0.3

    from mlflow.tracking import MlflowClient

    child = MlflowClient(uri).search_runs([old.experiment_id], f"tags.mlflow.parentRunId = '{old.run_id}'")[0]
    assert main(["compare", child.info.run_id, "--uri", uri]) == 0
    assert old.run_id in capsys.readouterr().out


def test_compare_names_what_it_did_not_find(store, tmp_path, capsys):
    uri, _, _ = store
    assert main(["compare", "nope", "--uri", uri]) == 2
    assert "no MLflow run named or with id 'nope'" in capsys.readouterr().err
    missing = tmp_path / "elsewhere.db"
    assert main(["compare", "demo", "--uri", f"sqlite:///{missing}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err and not missing.exists()


def test_arms_are_compared_pairwise_over_the_same_prompts(tmp_path):
    from selfalign.flows.compare import arm_rows, format_arms
    from selfalign.tasks import artifacts

    groups = {"p1": "seen", "p2": "seen", "p3": "heldout", "p4": "heldout"}

    def write(run, r, values):
        artifacts.round_dir(tmp_path / run, r)
        artifacts.write_json(tmp_path / run / f"round_{r}" / "eval_per_prompt.json",
                             {"groups": groups, "greedy": {"preferred_rate": dict(zip(groups, values))}})

    write("dice", 0, [0, 0, 0, 0])
    write("off", 0, [0, 0, 0, 0])
    write("dice", 1, [1, 1, 1, 0])
    write("off", 1, [1, 0, 0, 0])
    rows = {(r["round"], r["metric"]): r for r in arm_rows(tmp_path / "dice", tmp_path / "off")}
    assert set(rows) == {(r, m) for r in (0, 1) for m in ("preferred_rate", "preferred_rate/heldout", "preferred_rate/seen")}
    one = rows[1, "preferred_rate"]
    assert one["run"][0] == 0.75 and one["control"][0] == 0.25 and one["diff"] == 0.5 and one["prompts"] == 4
    # differences 0, 1, 1, 0: sample sd 0.577, half-width 1.96 * 0.577 / 2
    assert one["diff_ci95"] == pytest.approx(1.959964 * (1 / 3) ** 0.5 / 2, rel=1e-5)
    assert rows[1, "preferred_rate/heldout"]["diff"] == 0.5 and rows[1, "preferred_rate/seen"]["vs_pi0"][0] == 1.0
    text = format_arms(list(rows.values()), ("dice", "off"))
    assert "dice - off" in text and "0.750 ± 0.490" in text and "0.500 ± 0.566" in text
