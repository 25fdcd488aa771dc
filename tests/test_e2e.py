"""The real CLI end to end on the embedded demo, one small round: vLLM generation, scoring, pairs,
DeepSpeed training, evaluation, Prefect flow and an MLflow SQLite store."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "selfalign.flows.cli", "run", str(ROOT / "deploy" / "presets" / "demo.yaml")]
SMALL = ["--run.rounds=1", "--data.prompts_per_round=24", "--generate.k=4", "--pairs.min_valid=2",
         "--data.max_eval_prompts=24", "--evaluate.samples=2", "--train.max_steps=3", "--train.batch_size=8",
         "--train.micro_batch_size=4",
         # plain DPO, so the first step's loss is exactly ln 2 below (the preset's NLL term, rpo_alpha,
         # is checked against its formula in test_train.py)
         "--train.rpo_alpha=0"]


def run_cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SELFALIGN_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    return subprocess.run(CLI + SMALL + [f"--run.dir={tmp_path / 'run'}", *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_demo_round_end_to_end(tmp_path):
    proc = run_cli(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    r1 = run / "round_1"
    for name in ("samples.parquet", "scores.parquet", "pairs.parquet", "alpha_sweep.json", "metrics.json",
                 "model/model.safetensors", "model/config.json", "train/metrics.jsonl"):
        assert (r1 / name).exists(), name
    assert (run / "round_0" / "metrics.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1] and summary["final_model"] == str(r1 / "model")
    m = json.loads((r1 / "metrics.json").read_text())
    for key in ("eval/preferred_rate", "eval/accuracy", "eval/pair_accuracy", "eval/label_precision", "alpha_star",
                "pairs/kept", "len/chosen_mean", "len/rejected_mean"):
        assert key in m, key
    # the table and the MLflow hint reach the terminal
    assert "label_prec" in proc.stdout and "mlflow ui --backend-store-uri sqlite:///" in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("selfalign")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1
    parent, child = parents[0], children[0]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params["generate.k"] == "4" and parent.data.params["train.loss"] == "dpo"
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "eval/preferred_rate", "eval/pair_accuracy", "alpha_star"):
        assert key in child.data.metrics, key
    # first step of a round: policy == reference, so the DPO loss is ln 2 (ALGORITHMS.md 8.6)
    history = client.get_metric_history(child.info.run_id, "loss")
    assert min(history, key=lambda h: h.step).value == pytest.approx(0.693147, abs=1e-4)
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "tables")}
    assert (run / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert {"tables/pairs.parquet", "tables/alpha_sweep.json"} <= artifacts

    # a rerun of the same command finds every stage up to date
    again = run_cli(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date, skipped") + again.stderr.count("up to date, skipped") >= 5
