"""Numerical faults in training, and HPO's value head across a resume.

- A NaN or inf *gradient* with a finite loss (`SELFALIGN_FAULT_INF_GRAD_STEP` makes one element of
  one parameter's gradient inf on the last rank) stops training before any optimizer step applies
  it, under ZeRO 0/1/2/3, for the policy and for the HPO value head (in-process worker: the
  weights and every optimizer's step count are compared before and after); on 2 processes, a
  fault on rank 1 stops both ranks with the same message. The CLI end to end (exit 3, MLflow and
  Prefect FAILED, rerun) is in tests/test_resume.py.
- HPO (value head with its own optimizer) killed with SIGKILL after a checkpoint resumes and ends
  with the per-step losses, policy weights and value-head weights of an uninterrupted run.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfalign.flows.config import load_config
from selfalign.tasks import train as train_stage
from selfalign.tasks import train_guard, train_worker
from selfalign.tasks.train import NonFiniteTraining, checkpoint_dir, run_train
from selfalign.tasks.train_guard import FAULT_INF_GRAD_PARAM, FAULT_INF_GRAD_STEP, FAULT_NAN_STEP

HOOKS = "selfalign.tasks.toy:checker_reward,selfalign.tasks.toy:readability_reward"


def _overrides(tiny_model, tmp_path, **over) -> dict:
    return {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
            "data.eval_prompts": "e", "data.offline_pairs": "o", "run.dir": str(tmp_path),
            "train.lr": 1e-3, "train.max_steps": 4, "train.batch_size": 4, "train.micro_batch_size": 2,
            "train.checkpoint_every": 1} | over


def _hpo(**over) -> dict:
    return {"train.loss": "hpo", "train.hpo.rewards": HOOKS, "train.hpo.reward_weights": "1,0.5",
            "train.hpo.value_lr": 1e-2} | over


def _spec(cfg, model: str, pairs: Path, out: Path, monkeypatch) -> Path:
    """The worker spec the train stage writes, without launching the worker (a launch that exits 9)."""
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match=r"exit 9"):
        m.setattr(train_stage, "launch_command", lambda *a, **kw: [sys.executable, "-c", "raise SystemExit(9)"])
        run_train(cfg.train, cfg.model, model, pairs, out, seed=0, log=lambda m: None)
    return out.parent / "train" / "spec.json"


class Recorder:
    """Runs the worker's `main` as the only rank of a fresh process (DeepSpeed keeps its process
    groups in module globals: one training per process), recording the weights at the start of
    every optimiser step and at the end, every AdamW step taken in the training loop and the error raised; `python
    tests/test_faults.py record SPEC OUT [--no-guard]` writes them to OUT (torch.save)."""

    def __init__(self):
        import deepspeed

        self.engine = self.vhead = None
        self.at_begin: list[dict[str, torch.Tensor]] = []
        self.adam_steps: dict[int, int] = {}  # id(first parameter of the optimizer) -> steps taken
        real_init, real_head, real_begin = deepspeed.initialize, train_worker.value_head, train_guard.GradGuard.begin
        real_adam = torch.optim.AdamW.step

        def initialize(*a, **kw):
            out = real_init(*a, **kw)
            self.engine = out[0]
            return out

        def head(*a, **kw):
            self.vhead = real_head(*a, **kw)
            return self.vhead

        def begin(guard, step):
            self.at_begin.append(self.weights())
            return real_begin(guard, step)

        def adam_step(opt, *a, **kw):
            if self.at_begin:  # in the training loop (DeepSpeed's bf16 optimizer steps once at set-up)
                key = id(opt.param_groups[0]["params"][0])
                self.adam_steps[key] = self.adam_steps.get(key, 0) + 1
            return real_adam(opt, *a, **kw)

        deepspeed.initialize, train_worker.value_head, train_guard.GradGuard.begin = initialize, head, begin
        torch.optim.AdamW.step = adam_step
        train_worker.die_with_parent_or_exit = lambda: None
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(train_stage._free_port()),
                           "DS_ACCELERATOR": "cpu"})

    def weights(self) -> dict[str, torch.Tensor]:
        import deepspeed

        params = dict(self.engine.module.named_parameters())
        zero3 = any(hasattr(p, "ds_id") for p in params.values())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None, enabled=zero3):
            out = {k: p.detach().clone() for k, p in params.items()}
        if self.vhead is not None:
            out |= {f"value_head.{k}": p.detach().clone() for k, p in self.vhead.named_parameters()}
        return out

    def run(self, spec: str, out: str) -> None:
        error = None
        try:
            train_worker.main(spec)
        except train_guard.NonFiniteLoss as e:
            error = str(e)
        vhead_steps = self.adam_steps.get(id(self.vhead.weight)) if self.vhead is not None else None
        torch.save({"error": error, "at_begin": self.at_begin, "after": self.weights(),
                    "global_steps": self.engine.global_steps, "adam_steps": sorted(self.adam_steps.values()),
                    "vhead_steps": vhead_steps}, out)


def _record(spec: Path, out: Path, *args: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in (FAULT_NAN_STEP, FAULT_INF_GRAD_STEP, FAULT_INF_GRAD_PARAM)}
    proc = subprocess.run([sys.executable, __file__, "record", str(spec), str(out), *args], env=clean | env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,dtype,hpo,target", [
    (0, "float32", False, ""), (1, "float32", False, ""), (2, "float32", False, ""), (3, "float32", False, ""),
    (0, "bfloat16", False, ""), (3, "bfloat16", False, ""),
    (3, "float32", True, "lm.model.embed_tokens.weight"), (2, "float32", True, "value_head.weight"),
    (0, "float32", True, "value_head.bias"),
])
def test_inf_gradient_stops_before_any_optimizer_step(tiny_model, tmp_path, replay_pairs, monkeypatch,
                                                      zero_stage, dtype, hpo, target):
    over = _overrides(tiny_model, tmp_path, **{"train.zero_stage": zero_stage, "train.checkpoint_every": 2,
                                               "model.dtype": dtype}, **(_hpo() if hpo else {}))
    spec = _spec(load_config(None, over), tiny_model, replay_pairs(), tmp_path / "round_1" / "model", monkeypatch)
    rec = _record(spec, tmp_path / "record.pt", **{FAULT_INF_GRAD_STEP: "3", FAULT_INF_GRAD_PARAM: target})
    name = target or "lm.model.embed_tokens.weight"  # the first trainable parameter
    assert rec["error"].startswith(f"train: non-finite gradient (norm inf) of {name} on rank 0 at step 3/4, "
                                   "loss finite; the optimizer step was not taken"), rec["error"]
    assert "last good checkpoint (step 2)" in rec["error"]
    # the weights at the start of step 3 are the weights at the end; steps 1 and 2 did change them
    begin, after = rec["at_begin"], rec["after"]
    assert len(begin) == 3
    for k, v in begin[2].items():
        assert torch.equal(after[k], v) and torch.isfinite(v).all(), k
    assert any(not torch.equal(begin[1][k], begin[2][k]) for k in after if k.startswith("lm."))
    # every AdamW (the policy's, which DeepSpeed steps on its fp32 partitions under ZeRO-1/2/3, and
    # the value head's) stepped twice, never a third time
    assert rec["global_steps"] == 2
    assert rec["adam_steps"] == ([2, 2] if hpo else [2])
    if hpo:
        assert rec["vhead_steps"] == 2
        assert not torch.equal(begin[0]["value_head.weight"], after["value_head.weight"])
    metrics = [json.loads(line) for line in (tmp_path / "round_1" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert json.loads((checkpoint_dir(tmp_path / "round_1" / "model") / "latest.json").read_text())["step"] == 2
    assert not (tmp_path / "round_1" / "model.partial").exists()


@pytest.mark.slow
def test_without_the_guard_the_injected_gradient_reaches_the_optimizer(tiny_model, tmp_path, replay_pairs, monkeypatch):
    """The control for the test above: the injected inf, unchecked, is applied. ZeRO-0 clips by the
    inf norm (coefficient 0, inf * 0 = NaN) and AdamW writes a NaN into the embedding. The step's
    gradient norm, which can only be read once the step is done, then stops the run: too late, the
    NaN is in the weights."""
    cfg = load_config(None, _overrides(tiny_model, tmp_path, **{"train.zero_stage": 0, "train.checkpoint_every": 0}))
    spec = _spec(cfg, tiny_model, replay_pairs(), tmp_path / "round_1" / "model", monkeypatch)
    rec = _record(spec, tmp_path / "record.pt", "--no-guard", **{FAULT_INF_GRAD_STEP: "3"})
    assert rec["error"].startswith("train: non-finite gradient norm inf at step 3/4"), rec["error"]
    assert rec["global_steps"] == 3 and rec["adam_steps"] == [3]
    embed = "lm.model.embed_tokens.weight"
    assert torch.isfinite(rec["at_begin"][2][embed]).all() and not torch.isfinite(rec["after"][embed]).all()


@pytest.mark.slow
def test_inf_gradient_on_one_rank_stops_both_ranks(tiny_model, tmp_path, replay_pairs, monkeypatch):
    cfg = load_config(None, _overrides(tiny_model, tmp_path, **{"train.nproc": 2, "train.zero_stage": 2,
                                                                **_hpo()}))
    out = tmp_path / "round_1" / "model"
    monkeypatch.setenv(FAULT_INF_GRAD_STEP, "2")
    msg = (r"non-finite gradient \(norm inf\) of lm.model.embed_tokens.weight on rank 1 at step 2/4, loss finite; "
           r"the optimizer step was not taken and the round's model is not written; the last good checkpoint \(step 1\)")
    t0 = time.time()
    with pytest.raises(NonFiniteTraining, match=msg):
        run_train(cfg.train, cfg.model, tiny_model, replay_pairs(), out, seed=0, log=lambda m: None)
    log = (tmp_path / "round_1" / "train" / "worker.log").read_text()
    # both ranks took the decision (each raised the same message), none was torn down by the other
    said = "train: non-finite gradient (norm inf) of lm.model.embed_tokens.weight on rank 1 at step 2/4"
    assert log.count(said) == 2, log
    assert time.time() - t0 < 300
    assert not out.exists()
    assert json.loads((checkpoint_dir(out) / "latest.json").read_text())["step"] == 1


# ---- HPO: value head and its optimizer across a kill -------------------------------------------

def _stage_script(cfg_over: dict, pairs: Path, out: Path) -> list[str]:
    """The training stage alone, in a process of its own (`python tests/test_faults.py stage ...`)."""
    return [sys.executable, __file__, "stage", json.dumps(cfg_over), str(pairs), str(out)]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_hpo_training_killed_after_a_checkpoint_resumes_with_the_same_value_head(tiny_model, tmp_path, replay_pairs,
                                                                                nproc):
    import psutil

    over = _overrides(tiny_model, tmp_path / "ref", **{"train.max_steps": 6, "train.nproc": nproc}, **_hpo())
    pairs = replay_pairs()
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_NAN_STEP, FAULT_INF_GRAD_STEP)}
    ref_out = tmp_path / "ref" / "round_1" / "model"
    subprocess.run(_stage_script(over, pairs, ref_out), env=env, check=True, timeout=900, stdout=subprocess.DEVNULL)

    over["run.dir"] = str(tmp_path / "run")
    out = tmp_path / "run" / "round_1" / "model"
    latest = checkpoint_dir(out) / "latest.json"
    proc = subprocess.Popen(_stage_script(over, pairs, out), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL)
    t0 = time.time()
    while not latest.exists():
        assert proc.poll() is None, "the training stage ended before its first checkpoint"
        assert time.time() - t0 < 600, "no checkpoint after 600 s"
        time.sleep(0.02)
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(family, timeout=30)  # the workers go with their launcher
    assert not alive
    step = json.loads(latest.read_text())["step"]
    assert 1 <= step < 6 and not out.exists()

    logged = []
    cfg = load_config(None, over)
    steps = run_train(cfg.train, cfg.model, tiny_model, pairs, out, seed=0, log=logged.append)
    assert any(f"resuming from the checkpoint of step {step}" in m for m in logged)
    ref_steps = [json.loads(line) for line in (ref_out.parent / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [s["step"] for s in ref_steps] == [1, 2, 3, 4, 5, 6]
    for s, r in zip(steps, ref_steps):
        for k in ("loss", "value_loss", "value/mean", "rewards/margins"):
            assert s[k] == pytest.approx(r[k], abs=1e-6), (s["step"], k)
    # the value head learnt (its loss moved) and came out the same
    assert steps[-1]["value_loss"] != pytest.approx(steps[0]["value_loss"], abs=1e-4)
    got, want = load_file(out / "model.safetensors"), load_file(ref_out / "model.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)
    vh, vh_ref = (load_file(o.parent / "train" / "value_head.safetensors") for o in (out, ref_out))
    assert sorted(vh) == ["bias", "weight"] and vh_ref["weight"].abs().sum() > 0
    for k in vh_ref:
        torch.testing.assert_close(vh[k], vh_ref[k], atol=1e-6, rtol=1e-6)
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    vdiff = max((vh[k] - vh_ref[k]).abs().max().item() for k in vh)
    print(f"resumed from step {step}: max |resumed - uninterrupted| policy {diff:.3g}, value head {vdiff:.3g}")


if __name__ == "__main__":
    if sys.argv[1] == "stage":  # stage OVERRIDES_JSON PAIRS OUT
        over = json.loads(sys.argv[2])
        cfg = load_config(None, over)
        run_train(cfg.train, cfg.model, over["model.policy"], Path(sys.argv[3]), Path(sys.argv[4]), seed=0,
                  log=lambda m: print(m, flush=True))
    else:  # record SPEC OUT [--no-guard]
        recorder = Recorder()
        if "--no-guard" in sys.argv:
            train_guard.GradGuard.check = lambda *a: None
        recorder.run(sys.argv[2], sys.argv[3])
