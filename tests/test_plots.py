"""Round plots from a hand-made round folder, logged through the MLflow seam as the round flow
does; the tracking section's choices."""
import math
from pathlib import Path

import pytest

from selfalign.flows.cli import main
from selfalign.tasks import artifacts, plots
from selfalign.tasks.tracking import MlflowLogger, NullLogger, check_options

PNG = b"\x89PNG\r\n\x1a\n"
DEMO = str(Path(__file__).resolve().parents[1] / "deploy" / "presets" / "demo.yaml")


def pair(source, chosen_len, rejected_len, margin):
    score = math.nan if source == "offline" else 1.0
    return {"source": source, "prompt_id": "p", "prompt": "q", "chosen": "c" * chosen_len,
            "rejected": "r" * rejected_len, "chosen_score": score + margin, "rejected_score": score,
            "chosen_len": float(chosen_len), "rejected_len": float(rejected_len)}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    rd = run / "round_1"
    rd.mkdir(parents=True)
    rows = [pair("generated", 30 + i % 7, 28 + i % 5, 0.1 * i) for i in range(40)]
    rows += [pair("offline", 35, 20 + i % 3, 0.0) for i in range(20)]
    artifacts.write_table(rd / "pairs.parquet", rows)
    trace = [{"alpha": a / 1000, "mean_len_gap": 4.0 - a / 2, "n_pairs": 40} for a in range(12)]
    artifacts.write_json(rd / "alpha_sweep.json", {"alpha_star": 0.008, "trace": trace})
    (run / "round_0").mkdir()
    artifacts.write_json(run / "round_0" / "metrics.json",
                         {"eval/accuracy": 0.9, "eval/preferred_rate": 0.6, "round/seconds": 3.0})
    artifacts.write_json(rd / "metrics.json", {"eval/accuracy": 0.85, "eval/preferred_rate": 0.8,
                                               "eval/label_precision": 0.95, "eval/pair_accuracy": math.nan})
    return run


def test_round_plots_are_pngs(run_dir):
    paths = plots.round_plots(run_dir, 1)
    assert [p.name for p in paths] == ["reward_margins.png", "lengths.png", "alpha_sweep.png", "rounds.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, p
        assert p.parent == run_dir / "round_1" / "plots"
    assert [r["round"] for r in plots.rounds_so_far(run_dir, 1)] == [0, 1]


def test_round_without_pairs_still_plots_the_rounds(run_dir):
    (run_dir / "round_1" / "pairs.parquet").unlink()
    assert [p.name for p in plots.round_plots(run_dir, 1)] == ["rounds.png"]


def test_plots_and_model_folder_reach_mlflow(run_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    parent = MlflowLogger(uri, "exp", "run", artifact_location=(tmp_path / "art").as_uri())
    child = parent.child("round_1")
    for png in plots.round_plots(run_dir, 1):
        child.log_artifact(png, "plots")
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"0" * 10)
    child.log_artifacts(model, "model")
    NullLogger().log_artifacts(model, "model")
    client = MlflowClient(uri)
    got = {a.path for a in client.list_artifacts(child.run_id, "plots")}
    assert got == {f"plots/{n}.png" for n in ("reward_margins", "lengths", "alpha_sweep", "rounds")}
    assert {a.path for a in client.list_artifacts(child.run_id, "model")} == {"model/config.json", "model/sub"}


def test_log_model_choice_is_checked_before_the_run(capsys):
    check_options("none")
    check_options("artifact")
    with pytest.raises(ValueError, match="tracking.log_model: 'mlflow' is not one of"):
        check_options("mlflow")
    assert main(["run", DEMO, "--tracking.log_model=mlflow"]) == 2
    assert "tracking.log_model: 'mlflow'" in capsys.readouterr().err


def test_round_flow_draws_the_round_plots_and_logs_all(tmp_path, monkeypatch):
    """The round flow (its stages replaced by stand-ins) draws the pair plots and the rounds plot
    and logs all four to the round's MLflow run."""
    from mlflow.tracking import MlflowClient

    from selfalign.flows import pipeline
    from selfalign.flows.config import load_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(DEMO, {"run.dir": str(tmp_path / "run"), "tracking.uri": uri, "tracking.log_model": "none"})
    rd = artifacts.round_dir(cfg.run_dir, 1)

    class Logger:
        info = warning = staticmethod(lambda *a: None)

    def pairs_task(cfg, r, scores, offline):
        rd.mkdir(parents=True, exist_ok=True)
        artifacts.write_table(rd / "pairs.parquet", [pair("generated", 30 + i % 7, 28, 0.1 * i) for i in range(20)])
        artifacts.write_json(rd / "alpha_sweep.json", {"alpha_star": 0.01, "trace": [
            {"alpha": a / 100, "mean_len_gap": 2.0 - a, "n_pairs": 20} for a in range(4)]})
        return rd / "pairs.parquet", {"pairs/kept": 20}

    def evaluate_task(*a, **k):
        return {"eval/accuracy": 1.0}

    model = tmp_path / "trained"
    model.mkdir()
    monkeypatch.setattr(pipeline, "get_run_logger", lambda: Logger)
    monkeypatch.setattr(pipeline, "generate_task", lambda cfg, r, policy, prompts: (tmp_path / "s", {}))
    monkeypatch.setattr(pipeline, "score_task", lambda *a: (tmp_path / "sc", {"eval/pair_accuracy": 0.9}))
    monkeypatch.setattr(pipeline, "pairs_task", pairs_task)
    monkeypatch.setattr(pipeline, "train_task", lambda cfg, r, policy, pairs, tracker=None: (model, []))
    monkeypatch.setattr(pipeline, "evaluate_task", evaluate_task)
    monkeypatch.setattr(pipeline, "log_round_model", lambda *a: None)
    (cfg.run_dir / "round_0").mkdir(parents=True)
    artifacts.write_json(cfg.run_dir / "round_0" / "metrics.json", {"eval/accuracy": 0.5})
    parent = MlflowLogger(uri, cfg.tracking.experiment, cfg.run.name)
    pipeline.round_flow.fn(cfg.to_dict(), 1, cfg.model.policy, cfg.model.reference, parent.run_id)
    client = MlflowClient(uri)
    child = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                               f"tags.mlflow.parentRunId = '{parent.run_id}'")[0]
    logged = sorted(a.path for a in client.list_artifacts(child.info.run_id, "plots"))
    assert logged == ["plots/alpha_sweep.png", "plots/lengths.png", "plots/reward_margins.png", "plots/rounds.png"]
    assert (rd / "plots" / "rounds.png").read_bytes().startswith(PNG)
