"""Resume after a crash, and numerical faults.

- Training saves a DeepSpeed checkpoint every `train.checkpoint_every` steps and a rerun resumes from
  the latest one (weights, optimiser, data-stream position, RNG, loss state); a NaN loss stops
  training with the step and the value named, keeps the last good checkpoint and writes no model;
  so does an inf gradient with a finite loss, before the optimizer step (tests/test_faults.py has
  the per-stage and 2-rank checks of that, this file the CLI end to end).
- Kill test: the real CLI on the demo preset (tiny sizes) is killed with SIGKILL (its whole process
  group) in the middle of generate, then rerun and killed in the middle of score, then in the middle
  of train, each at a moment read from its files or log, and finally run to the end with the same
  command. Each rerun redoes no finished stage (its log and the finished stages' manifests show it),
  and the last ends with the artifacts of an uninterrupted run with the same seed (one reference run
  for the file):
  * bit-exact: the samples (vLLM on CPU with per-request seeds, one seed per shard), the scores (the
    same CPU forward passes), the pairs, the alpha sweep and the round-0 evaluation tables;
  * within float tolerance (1e-6): the trained weights. A run resumed from a DeepSpeed checkpoint
    reloads the fp32 weights, optimiser state, data position and RNG, and came out bit-identical
    here too, but DeepSpeed does not promise it, so the test does not require it.
- Fault test: from a run directory holding the reference run's stages before training, with their
  manifests, as a crashed run leaves them: a NaN loss, then an inf gradient, then the clean rerun.
"""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfalign.flows.config import load_config
from selfalign.tasks.train import NonFiniteTraining, checkpoint_dir, run_train
from selfalign.tasks.train_guard import FAULT_INF_GRAD_PARAM, FAULT_INF_GRAD_STEP, FAULT_NAN_STEP


def _cfg(tiny_model, tmp_path, **over):
    return load_config(None, {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
                              "data.eval_prompts": "e", "data.offline_pairs": "o", "run.dir": str(tmp_path),
                              "train.lr": 1e-3, "train.max_steps": 4, "train.batch_size": 4,
                              "train.micro_batch_size": 2, "train.checkpoint_every": 2} | over)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["alpha_dpo"])
def test_training_resumes_from_the_last_good_checkpoint_after_a_nan(tiny_model, tmp_path, replay_pairs, monkeypatch, loss):
    """alpha-DPO: its running normaliser is part of what a resumed run must restore."""
    cfg = _cfg(tiny_model, tmp_path, **{"train.loss": loss})
    pairs = replay_pairs()
    ref_out = tmp_path / "ref" / "model"
    ref_out.parent.mkdir()
    ref_steps = run_train(cfg.train, cfg.model, tiny_model, pairs, ref_out, seed=0, log=lambda m: None, key={"k": 1})
    ref = load_file(ref_out / "model.safetensors")

    out = tmp_path / "run" / "model"
    out.parent.mkdir()
    monkeypatch.setenv(FAULT_NAN_STEP, "3")
    logged = []
    with pytest.raises(NonFiniteTraining, match=r"non-finite loss nan at step 3/4 \(micro-batch 1 of 2\).*"
                                                r"last good checkpoint \(step 2\)"):
        run_train(cfg.train, cfg.model, tiny_model, pairs, out, seed=0, log=logged.append, key={"k": 1})
    assert not out.exists() and not out.with_name("model.partial").exists()
    ckpt = checkpoint_dir(out)
    assert json.loads((ckpt / "latest.json").read_text()) == {"step": 2, "tag": "step-000002"}
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-000002"]  # only the latest is kept

    monkeypatch.delenv(FAULT_NAN_STEP)
    logged.clear()
    steps = run_train(cfg.train, cfg.model, tiny_model, pairs, out, seed=0, log=logged.append, key={"k": 1})
    assert any("resuming from the checkpoint of step 2" in m for m in logged)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s, r in zip(steps, ref_steps):
        assert s["loss"] == pytest.approx(r["loss"], abs=1e-6) and s["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
    got = load_file(out / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-6)
    assert any(not torch.equal(ref[k], load_file(f"{tiny_model}/model.safetensors")[k]) for k in ref)

    # another training (here: another stage key) never resumes these checkpoints
    logged.clear()
    run_train(cfg.train, cfg.model, tiny_model, pairs, out, seed=0, log=logged.append, key={"k": 2})
    assert any("discarding checkpoints of another training" in m for m in logged)
    assert not any("resuming" in m for m in logged)


# ---- kill tests: the real CLI ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "selfalign.flows.cli", "run", str(ROOT / "deploy" / "presets" / "demo.yaml")]
# tests/test_e2e.py's tiny round, in 3 shards of 8 prompts, a checkpoint after every training step
TINY = ["--run.rounds=1", "--data.prompts_per_round=24", "--generate.k=4", "--pairs.min_valid=2",
        "--data.max_eval_prompts=8", "--evaluate.samples=2", "--train.max_steps=3", "--train.batch_size=8",
        "--train.micro_batch_size=4", "--generate.shard_size=8", "--train.checkpoint_every=1",
        "--tracking.plots=false"]
TABLES = ["round_0/eval_greedy.parquet", "round_0/eval_sampled.parquet", "round_1/samples.parquet",
          "round_1/scores.parquet", "round_1/pairs.parquet", "round_1/alpha_sweep.json"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    faults = (FAULT_NAN_STEP, FAULT_INF_GRAD_STEP, FAULT_INF_GRAD_PARAM)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", *faults)}  # CI=true hides progress lines
    return env | {"SELFALIGN_HOME": str(home), "HF_HUB_OFFLINE": "1"} | extra


def _command(run: Path) -> list[str]:
    return CLI + TINY + [f"--run.dir={run}"]


def run_to_end(run: Path, home: Path, expect: int = 0, **env: str) -> str:
    proc = subprocess.run(_command(run), cwd=run.parent, env=_env(home, **env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1500)
    assert proc.returncode == expect, proc.stdout[-5000:]
    return proc.stdout


class Victim:
    """The CLI started in a session of its own; its output lines are collected as they come."""

    def __init__(self, run: Path, home: Path):
        self.run, self.lines = run, []
        self.proc = subprocess.Popen(_command(run), cwd=run.parent, env=_env(home), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def kill_when(self, what: str, ready, timeout: float = 900) -> None:
        """SIGKILL to the whole process group as soon as `ready()` holds, and every process of the
        run gone (the training worker, in a session of its own, goes with its launcher)."""
        import psutil

        t0 = time.time()
        while not ready():
            assert self.proc.poll() is None, f"the run ended before {what}:\n" + "".join(self.lines[-60:])
            assert time.time() - t0 < timeout, f"no {what} after {timeout}s"
            time.sleep(0.02)
        family = psutil.Process(self.proc.pid).children(recursive=True)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        gone, alive = psutil.wait_procs(family, timeout=30)
        for p in alive:
            p.kill()
        assert not alive, f"still running after the kill: {[p.pid for p in alive]}"
        self.reader.join(10)

    def said(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))


def _manifests(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*.manifest.json")}


def _seed_run(ref: Path, run: Path, upto: list[str]) -> None:
    """The run directory as a crash after these stages leaves it: their outputs, manifests, stats."""
    shutil.copytree(ref / "round_0", run / "round_0")
    (run / "round_1").mkdir()
    for name in upto:
        for f in (ref / "round_1").glob(f"{name}*"):
            shutil.copy2(f, run / "round_1" / f.name)


def assert_same_artifacts(run: Path, ref: Path) -> None:
    for name in TABLES:
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    got, want = load_file(run / "round_1/model/model.safetensors"), load_file(ref / "round_1/model/model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"trained weights: max |resumed - uninterrupted| = {diff:.3g}")
    steps = [json.loads(line) for line in (run / "round_1/train/metrics.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(line) for line in (ref / "round_1/train/metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s, r in zip(steps, ref_steps):
        assert s["loss"] == pytest.approx(r["loss"], abs=1e-6)
    # checkpoints go once the model is saved (train.keep_checkpoints=false), shards once joined
    assert not checkpoint_dir(run / "round_1/model").exists()
    assert not list(run.rglob("*.shard-*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run with the same command and seed."""
    base = tmp_path_factory.mktemp("reference")
    run_to_end(base / "run", base / "home")
    return base / "run"


@pytest.mark.slow
def test_killed_in_generate_then_in_score_then_in_train_ends_as_an_uninterrupted_run(reference, tmp_path):
    """The same command killed three times, in a different stage each time, then run to the end."""
    run, home = tmp_path / "run", tmp_path / "home"
    # generate: round 1's samples are drawn by round 0's evaluate job (one engine start): killed once
    # the first of the 3 shards is written
    victim = Victim(run, home)
    first = run / "round_1" / "samples.shard-00000.parquet.manifest.json"
    victim.kill_when("a first shard", first.exists)
    done = sorted(p.name[:-len(".manifest.json")] for p in (run / "round_1").glob("samples.shard-*.manifest.json"))
    assert 1 <= len(done) < 3 and not (run / "round_1" / "samples.parquet").exists(), done

    # score: killed once the policy's log-probs are done and the reference's are being computed
    victim = Victim(run, home)
    victim.kill_when("scoring", lambda: victim.said("score[policy]:"))
    for name in done:  # drawn before the first kill: not drawn again
        assert victim.said(f"{name}: up to date, skipped") and not victim.said(f"wrote {name}")
    assert victim.said("wrote samples.shard-00002.parquet")
    assert not (run / "round_1" / "scores.parquet.manifest.json").exists()

    # train: killed once a checkpoint is written; the finished stages' manifests stay untouched
    before = _manifests(run)
    victim = Victim(run, home)
    latest = run / "round_1" / "train" / "checkpoints" / "latest.json"
    victim.kill_when("a training checkpoint", latest.exists)
    assert victim.said("samples.parquet: up to date, skipped")
    assert not (run / "round_1" / "model").exists()
    step = json.loads(latest.read_text())["step"]

    rerun = run_to_end(run, home)
    assert f"train: resuming from the checkpoint of step {step}" in rerun
    for name in ("eval_greedy", "samples", "scores", "pairs"):
        assert f"{name}.parquet: up to date, skipped" in rerun
    after = _manifests(run)
    assert {k: after[k] for k in before} == before
    assert_same_artifacts(run, reference)


def _assert_failed_in_tracking(run: Path, home: Path, times: int) -> None:
    """MLflow: `times` parent runs and as many round runs, all FAILED; Prefect: the run flows and their
    round sub-flows ended Failed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("selfalign").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == \
        [("demo", "FAILED")] * times + [("round_1", "FAILED")] * times
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        states = sorted(db.execute("select name, state_type from flow_run"))
    assert states == [("demo", "FAILED")] * times + [("demo-round-1", "FAILED")] * times


@pytest.mark.slow
def test_a_nan_then_an_inf_gradient_fail_the_round_and_the_rerun_resumes_from_the_last_good_checkpoint(
        reference, tmp_path):
    """A NaN loss at step 3; the same command again, now with one element of the embedding's gradient
    inf at step 3 (the loss finite); then without a fault: it ends as if nothing had happened."""
    run, home = tmp_path / "run", tmp_path / "home"
    _seed_run(reference, run, ["samples.parquet", "generate.stats.json", "scores.parquet", "score.stats.json",
                               "pairs.parquet", "pairs.stats.json", "alpha_sweep.json"])
    policy = ROOT / "assets" / "demo" / "dpo"  # round 1's input: the last good published model
    before = {p.name: p.read_bytes() for p in policy.iterdir() if p.is_file()}

    def failed_at_step_3(out: str) -> None:
        assert "last good checkpoint (step 2)" in out
        assert not (run / "round_1" / "model").exists() and not (run / "round_1" / "model.partial").exists()
        assert json.loads((run / "round_1/train/checkpoints/latest.json").read_text())["step"] == 2
        steps = [json.loads(line)["step"] for line in (run / "round_1/train/metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        kept = torch.load(run / "round_1/train/checkpoints/step-000002/mp_rank_00_model_states.pt", weights_only=False)
        assert all(torch.isfinite(v).all() for v in kept["module"].values())
        assert {p.name: p.read_bytes() for p in policy.iterdir() if p.is_file()} == before

    out = run_to_end(run, home, expect=3, **{FAULT_NAN_STEP: "3"})
    assert "run failed: non-finite loss nan at step 3/3 (micro-batch 1 of 2)" in out, out[-3000:]
    failed_at_step_3(out)
    _assert_failed_in_tracking(run, home, 1)

    out = run_to_end(run, home, expect=3, **{FAULT_INF_GRAD_STEP: "3"})
    assert "train: resuming from the checkpoint of step 2" in out
    assert ("run failed: non-finite gradient (norm inf) of lm.model.embed_tokens.weight on rank 0 at step 3/3, "
            "loss finite; the optimizer step was not taken") in out, out[-3000:]
    failed_at_step_3(out)
    _assert_failed_in_tracking(run, home, 2)

    # the same command again: training resumes from step 2, never from a half-trained model
    rerun = run_to_end(run, home)
    assert "train: resuming from the checkpoint of step 2" in rerun
    assert_same_artifacts(run, reference)
