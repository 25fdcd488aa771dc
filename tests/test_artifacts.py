"""Run-folder guarantees (tasks/artifacts.py): a stage output is trusted only while its files are
what was written, a run folder has one writer at a time, and policy = reference is recognised."""
import os
import subprocess
import sys

import pytest

from selfalign.tasks import artifacts


def test_a_damaged_output_is_not_taken_for_finished_work(tmp_path):
    out = tmp_path / "scores.parquet"
    artifacts.write_table(out, [{"a": i} for i in range(100)])
    artifacts.mark_done(out, {"config": "x"})
    assert artifacts.is_done(out, {"config": "x"})
    assert "changed (config)" in artifacts.why_not_done(out, {"config": "y"})
    with open(out, "r+b") as f:  # half-truncated, as a full disk or a killed copy leaves it
        f.truncate(out.stat().st_size // 2)
    assert not artifacts.is_done(out, {"config": "x"})
    assert "files changed since they were written (scores.parquet)" in artifacts.why_not_done(out, {"config": "x"})
    assert artifacts.why_not_done(tmp_path / "missing.parquet", {}) == "not made yet"


def test_a_model_folder_without_its_weights_is_not_done(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(artifacts, "HASHED_BYTES", 1024)  # the weights count as a large file: size and mtime
    artifacts.mark_done(model, {"k": 1})
    assert artifacts.is_done(model, {"k": 1})
    (model / "model.safetensors").unlink()
    assert "model.safetensors" in artifacts.why_not_done(model, {"k": 1})


def test_old_manifests_without_contents_are_trusted(tmp_path):
    out = tmp_path / "pairs.parquet"
    artifacts.write_table(out, [{"a": 1}])
    artifacts.write_json(artifacts.manifest_path(out), {"key": {"k": 1}, "token": "t"})
    assert artifacts.is_done(out, {"k": 1})


HOLD = """
import sys, time
from selfalign.tasks.artifacts import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_on_a_folder_stops_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(artifacts.RunLocked, match=f"in use by pid {holder.pid} on "):
            with artifacts.run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file stays, and is taken over
    assert (tmp_path / ".lock").exists()
    with artifacts.run_lock(tmp_path):
        with artifacts.run_lock(tmp_path):  # the same process again: no deadlock
            assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


def test_same_weights(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, data in ((a, b"1234"), (b, b"1234"), (c, b"1235")):
        d.mkdir()
        (d / "model.safetensors").write_bytes(data)
    assert artifacts.same_weights(str(a), str(a)) and artifacts.same_weights(str(a), str(b))
    assert not artifacts.same_weights(str(a), str(c)) and not artifacts.same_weights("org/model", "org/model")


def test_a_rerun_names_the_config_keys_that_changed(tmp_path):
    out = tmp_path / "pairs.parquet"
    artifacts.write_table(out, [{"a": 1}])
    artifacts.mark_done(out, {"config": "x", "seed": 1}, {"pairs.gamma": 0.5, "pairs.budget": 0})
    assert artifacts.why_not_done(out, {"config": "x", "seed": 1}, {"pairs.gamma": 0.5, "pairs.budget": 0}) == ""
    why = artifacts.why_not_done(out, {"config": "y", "seed": 1}, {"pairs.gamma": 0.25, "pairs.budget": 0})
    assert why == "its inputs or config changed (pairs.gamma 0.5 -> 0.25)"
    why = artifacts.why_not_done(out, {"config": "y", "seed": 2}, {"pairs.gamma": 0.5, "pairs.budget": 64})
    assert why == "its inputs or config changed (seed, pairs.budget 0 -> 64)"


def test_a_round_model_trained_again_keeps_the_earlier_one(tmp_path, monkeypatch):
    from selfalign.flows import stages

    said = []
    monkeypatch.setattr(stages, "_log", lambda: said.append)
    model = tmp_path / "round_1" / "model"

    def train(weights: bytes):
        def work():
            model.mkdir(parents=True, exist_ok=True)
            (model / "model.safetensors").write_bytes(weights)
            return {"steps": []}
        return work

    stats = tmp_path / "round_1" / "train.steps.json"
    stages._stage(model, {"config": "a"}, train(b"first"), stats, {"train.lr": 1e-6}, keep_old=True)
    stages._stage(model, {"config": "a"}, train(b"never"), stats, {"train.lr": 1e-6}, keep_old=True)
    assert said[-1] == "model: up to date, skipped"
    stages._stage(model, {"config": "b"}, train(b"second"), stats, {"train.lr": 2e-6}, keep_old=True)
    assert "model: running again, its inputs or config changed (train.lr 1e-06 -> 2e-06)" in said
    [kept] = [p for p in model.parent.iterdir() if p.name.startswith("model.before-")]
    assert (kept / "model.safetensors").read_bytes() == b"first"
    assert (model / "model.safetensors").read_bytes() == b"second"
    stages._stage(model, {"config": "c"}, train(b"third"), stats, {"train.lr": 3e-6}, keep_old=False)
    assert len([p for p in model.parent.iterdir() if p.name.startswith("model.before-")]) == 1
    assert (model / "model.safetensors").read_bytes() == b"third"


def test_an_evaluation_key_reruns_only_the_evaluation(tmp_path, tiny_model):
    """Stage keys come from the keys each stage reads and its inputs: evaluate.samples,
    evaluate.max_tokens and data.max_eval_prompts leave the score and pair stages' keys alone."""
    from selfalign.flows.config import load_config
    from selfalign.tasks.evaluate import evaluate_key
    from selfalign.tasks.pairs import pairs_key
    from selfalign.tasks.score import score_key
    from selfalign.tasks.train import train_key

    base = {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
            "data.eval_prompts": "e", "data.offline_pairs": "o"}
    samples = tmp_path / "samples.parquet"
    offline = [{"id": "o1", "prompt": "1 + 1?", "chosen": "It is 2.", "rejected": "2"}]

    def keys(**over):
        cfg = load_config(None, base | over)
        return (score_key(cfg.score, cfg.model, samples, tiny_model, tiny_model, offline)[0],
                pairs_key(cfg.pairs, samples, offline, 1, cfg.evaluate.preferred, cfg.evaluate.checker)[0],
                train_key(cfg.train, cfg.model, tiny_model, samples, 1)[0])

    same = keys()
    for over in ({"evaluate.samples": 9}, {"evaluate.max_tokens": 7}, {"data.max_eval_prompts": 3},
                 {"score.shards": 2}, {"evaluate.judge_url": "http://127.0.0.1:9/v1", "evaluate.judge_model": "m"}):
        assert keys(**over) == same, over
    assert keys(**{"pairs.gamma": 0.25})[1] != same[1] and keys(**{"pairs.gamma": 0.25})[0] == same[0]
    assert keys(**{"score.batch_tokens": 999})[0] != same[0] and keys(**{"score.batch_tokens": 999})[2] == same[2]
    assert keys(**{"train.lr": 1e-6})[:2] == same[:2] and keys(**{"train.lr": 1e-6})[2] != same[2]
    assert keys(**{"evaluate.preferred": "selfalign.tasks.toy:is_preferred"})[1] != same[1]  # it labels the pairs
    cfg = load_config(None, base)
    assert pairs_key(cfg.pairs, samples, offline + offline, 1)[0] != same[1]  # the offline rows are an input
    # the evaluation's own key: its keys and the engine's, not the judge's nor how many draw the samples
    ev = lambda **o: (lambda c: evaluate_key(c.evaluate, c.generate, c.model, tiny_model, offline)[0])(load_config(None, base | o))
    assert ev() == ev(**{"generate.k": 20, "generate.shards": 2, "evaluate.judge_url": "http://127.0.0.1:9/v1",
                         "evaluate.judge_model": "m"})
    assert ev() != ev(**{"evaluate.samples": 9}) and ev() != ev(**{"generate.temperature": 0.5})


def test_the_command_line_refuses_a_folder_another_run_holds(tmp_path, monkeypatch, capsys):
    """Through `selfalign run`: one line naming the holder, exit 2, before any server or engine."""
    from pathlib import Path

    from selfalign.flows import cli

    monkeypatch.setattr(cli, "prepare_environment", lambda run_dir: None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        demo = str(Path(__file__).resolve().parents[1] / "deploy" / "presets" / "demo.yaml")
        assert cli.main(["run", demo, f"--run.dir={run_dir}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("run: ") and f"in use by pid {holder.pid} on " in err and "\n" not in err
    finally:
        holder.kill()
        holder.wait()
