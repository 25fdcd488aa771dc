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
    # run metadata: a description, the loss, the datasets as inputs with digests, system metrics per
    # round, an experiment the UI opens on its runs table, and a link to that table
    assert parent.data.tags["mlflow.note.content"].startswith("demo: 1 round(s) of dpo")
    assert parent.data.tags["selfalign.loss"] == "dpo"
    inputs = {d.dataset.name: d.dataset for d in client.get_run(parent.info.run_id).inputs.dataset_inputs}
    assert set(inputs) >= {"prompts", "eval_prompts", "offline_pairs"} and all(len(d.digest) == 16 for d in inputs.values())
    assert any(k.startswith("system/") for k in child.data.metrics)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"#/experiments/{exp.experiment_id}/runs" in proc.stdout
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "eval/preferred_rate", "eval/pair_accuracy", "alpha_star"):
        assert key in child.data.metrics, key
    # first step of a round: policy == reference, so the DPO loss is ln 2 (docs/algorithms.md 8.6)
    history = client.get_metric_history(child.info.run_id, "loss")
    assert min(history, key=lambda h: h.step).value == pytest.approx(0.693147, abs=1e-4)
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "tables")}
    assert (run / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert {"tables/pairs.parquet", "tables/alpha_sweep.json"} <= artifacts

    # a rerun of the same command finds every stage up to date
    again = run_cli(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date, skipped") + again.stderr.count("up to date, skipped") >= 5


@pytest.mark.slow
def test_sft_start_then_dice_and_the_offline_control_arm(tmp_path):
    """From the SFT model alone: round 0 trains pi_0 (its own MLflow run), the DICE round follows,
    then --control runs the offline-only arm from the same pi_0 with the same pair budget, and the
    comparison is printed. Policy = reference is refused at load time, naming the option."""
    same = run_cli(tmp_path, "--model.policy=" + str(ROOT / "assets" / "demo" / "sft"))
    assert same.returncode == 2 and "hold the same weights" in same.stderr and "Leave model.policy empty" in same.stderr

    proc = run_cli(tmp_path, "--model.policy=", "--start.pairs=32", "--pairs.budget=16", "--control")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run, ctrl = tmp_path / "run", Path(f"{tmp_path / 'run'}-offline")
    pi0 = run / "round_0" / "model"
    assert (pi0 / "model.safetensors").is_file()
    start_pairs = json.loads((run / "round_0" / "pairs.stats.json").read_text())
    assert start_pairs["pairs/kept"] == start_pairs["pairs/offline"] == 32
    steps0 = [json.loads(line) for line in (run / "round_0" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps0) == 4  # 32 pairs, batch 8, one epoch
    dice = json.loads((run / "round_1" / "pairs.stats.json").read_text())
    off = json.loads((ctrl / "round_1" / "pairs.stats.json").read_text())
    assert dice["pairs/kept"] == off["pairs/kept"] == 16 and off["pairs/generated"] == 0
    assert not (ctrl / "round_1" / "samples.parquet").exists()
    # the control shares pi_0: its round 0 finds the model and its evaluation done, and trains nothing
    assert (ctrl / "round_0" / "model" / "model.safetensors").samefile(pi0 / "model.safetensors")
    assert not (ctrl / "round_0" / "train").exists()
    # the same max_steps on the same number of pairs: the same training budget
    assert len((ctrl / "round_1" / "train" / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((ctrl / "summary.json").read_text())["rounds"][0]["eval/preferred_rate"] == \
        json.loads((run / "summary.json").read_text())["rounds"][0]["eval/preferred_rate"]  # one pi_0
    assert "demo against its control demo-offline" in proc.stdout
    assert "preferred_rate" in proc.stdout.split("against its control")[1]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("selfalign")
    parents = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])
               if "mlflow.parentRunId" not in r.data.tags}
    assert parents["demo"].data.tags["selfalign.arm"] == "dice"
    # linked to their Prefect flow runs, and the round tables browsable
    tags = parents["demo"].data.tags
    assert tags["prefect.flow_run_id"] and tags["prefect.flow_run_url"].endswith(tags["prefect.flow_run_id"])
    assert parents["demo-offline"].data.tags["selfalign.arm"] == "offline"
    rounds = {r.info.run_name for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parents['demo'].info.run_id}'")}
    assert rounds == {"round_0", "round_1"}
    [r1] = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'round_1' and "
                              f"tags.mlflow.parentRunId = '{parents['demo'].info.run_id}'")
    assert r1.data.tags["prefect.flow_run_id"] != tags["prefect.flow_run_id"]  # the round's own sub-flow run
    assert {a.path for a in client.list_artifacts(r1.info.run_id, "tables")} >= {
        "tables/samples.json", "tables/pairs.json", "tables/eval_answers.json"}
