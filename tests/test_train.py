"""The DeepSpeed training stage on CPU (gloo): one process vs two processes give the same model
(same global batch, gradients averaged across ranks), with torchrun and the deepspeed launcher;
replay pairs get their reference log-probs from the start-of-round weights."""
import math

import pytest
import torch
from safetensors.torch import load_file

from selfalign.flows.config import load_config
from selfalign.tasks.train import run_train


def _train(tiny_model, tmp_path, replay_pairs, name, **over):
    cfg = load_config(None, {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
                             "data.eval_prompts": "e", "data.offline_pairs": "o", "run.dir": str(tmp_path),
                             "train.lr": 1e-3, "train.max_steps": 3, "train.batch_size": 4,
                             "train.micro_batch_size": 2} | over)
    out = tmp_path / name / "model"
    out.parent.mkdir()
    steps = run_train(cfg, tiny_model, replay_pairs(name), out, seed=0, log=lambda m: None)
    return steps, load_file(out / "model.safetensors")


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(tiny_model, tmp_path, replay_pairs):
    steps1, w1 = _train(tiny_model, tmp_path, replay_pairs, "one")
    steps2, w2 = _train(tiny_model, tmp_path, replay_pairs, "two", **{"train.nproc": 2, "train.micro_batch_size": 2})
    steps3, w3 = _train(tiny_model, tmp_path, replay_pairs, "ds", **{"train.launcher": "deepspeed"})
    # round start: policy == reference, so the first loss is ln 2 for every pair (ALGORITHMS.md 8.6)
    assert steps1[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps1[-1]["loss"] < steps1[0]["loss"]
    for s1, s2 in zip(steps1, steps2):
        assert s2["loss"] == pytest.approx(s1["loss"], abs=1e-5)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(w3[k], w1[k], atol=1e-6, rtol=1e-6)
    assert any(not torch.equal(w1[k], load_file(f"{tiny_model}/model.safetensors")[k]) for k in w1)
