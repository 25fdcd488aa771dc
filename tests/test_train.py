"""The DeepSpeed training stage on CPU (gloo): one process vs two processes give the same model
(same global batch, gradients averaged across ranks), with the stage's own launcher (`local`),
torchrun and the deepspeed launcher;
replay pairs get their reference log-probs from the start-of-round weights."""
import math

import pytest
import torch
from safetensors.torch import load_file
from test_objective import AT_REFERENCE

from selfalign.flows.config import load_config
from selfalign.tasks.train import run_train


def _train(tiny_model, tmp_path, replay_pairs, name, log=None, **over):
    cfg = load_config(None, {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
                             "data.eval_prompts": "e", "data.offline_pairs": "o", "run.dir": str(tmp_path),
                             "train.lr": 1e-3, "train.max_steps": 3, "train.batch_size": 4,
                             "train.micro_batch_size": 2} | over)
    out = tmp_path / name / "model"
    out.parent.mkdir()
    steps = run_train(cfg.train, cfg.model, tiny_model, replay_pairs(name), out, seed=0, log=log or (lambda m: None))
    return steps, load_file(out / "model.safetensors")


@pytest.mark.slow
def test_auto_zero_stage_runs_zero0_on_one_process_and_trains_like_zero2(tiny_model, tmp_path, replay_pairs):
    """train.zero_stage auto (the default) on one process: ZeRO-0, which DeepSpeed gives no gradient
    norm for in fp32 (the worker computes it); the same losses, norms and weights as ZeRO-2."""
    said: list[str] = []
    steps0, w0 = _train(tiny_model, tmp_path, replay_pairs, "auto", log=said.append)
    steps2, w2 = _train(tiny_model, tmp_path, replay_pairs, "z2", **{"train.zero_stage": 2})
    assert any("ZeRO-0 (auto)" in m for m in said), said
    assert len(steps0) == len(steps2) == 3
    for a, b in zip(steps0, steps2):
        assert math.isfinite(a["grad_norm"]) and a["grad_norm"] > 0
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6)
    for k in w2:
        torch.testing.assert_close(w0[k], w2[k], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(tiny_model, tmp_path, replay_pairs):
    steps1, w1 = _train(tiny_model, tmp_path, replay_pairs, "one")
    steps2, w2 = _train(tiny_model, tmp_path, replay_pairs, "two", **{"train.nproc": 2, "train.micro_batch_size": 2})
    steps3, w3 = _train(tiny_model, tmp_path, replay_pairs, "ds", **{"train.launcher": "deepspeed"})
    steps4, w4 = _train(tiny_model, tmp_path, replay_pairs, "trun", **{"train.launcher": "torchrun", "train.nproc": 2})
    # round start: policy == reference, so the first loss is ln 2 for every pair (docs/algorithms.md 8.6)
    assert steps1[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps1[-1]["loss"] < steps1[0]["loss"]
    for s1, s2 in zip(steps1, steps2):
        assert s2["loss"] == pytest.approx(s1["loss"], abs=1e-5)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(w3[k], w1[k], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(w4[k], w2[k], atol=1e-6, rtol=1e-6)
    assert any(not torch.equal(w1[k], load_file(f"{tiny_model}/model.safetensors")[k]) for k in w1)


LN2 = math.log(2)
LOSS_KEYS = {
    "cdpo": {"train.label_smoothing": 0.1},
    # the additional reference is the policy's own model, so the combined reference equals it
    "mrpo": {"train.mrpo.references": "{model}"},
    "hpo": {"train.hpo.rewards": "selfalign.tasks.toy:checker_reward,selfalign.tasks.toy:readability_reward"},
}


@pytest.mark.slow
# The pair losses of kernels/losses.py all take dpo's path through the worker (tests/test_objective.py
# checks each one's dispatch and round-start value); cdpo: a loss hyper-parameter from the config;
# simpo: reference-free; alpha_dpo, mrpo, hpo: paths of their own (state, references, value head).
@pytest.mark.parametrize("loss", ["dpo", "cdpo", "simpo", "alpha_dpo", "mrpo", "hpo"])
def test_one_training_stage_with_each_loss_path(tiny_model, tmp_path, replay_pairs, loss):
    extra = {k: v.format(model=tiny_model) if isinstance(v, str) else v for k, v in LOSS_KEYS.get(loss, {}).items()}
    steps, w = _train(tiny_model, tmp_path, replay_pairs, loss, **{"train.loss": loss, "train.max_steps": 1,
                                                                   "train.batch_size": 2} | extra)
    assert len(steps) == 1 and math.isfinite(steps[0]["loss"]) and math.isfinite(steps[0]["grad_norm"])
    want = AT_REFERENCE[loss]
    if want is not None:
        assert steps[0]["loss"] == pytest.approx(want, abs=1e-4 * max(1.0, want))
    if loss == "hpo":  # value head starts at 0, so the advantage-weighted NLL adds to the DPO term
        assert steps[0]["loss"] > LN2 and steps[0]["value/mean"] == 0.0
        assert math.isfinite(steps[0]["value_loss"]) and steps[0]["aux/chosen"] > steps[0]["aux/rejected"]
    base = load_file(f"{tiny_model}/model.safetensors")
    assert sorted(w) == sorted(base)
    assert any(not torch.equal(w[k], base[k]) for k in w)


@pytest.mark.slow
def test_zero3_with_a_partitioned_lm_head_trains_like_zero2(tmp_path, replay_pairs):
    """The fused LM head reads the head weight outside the head's own forward; under ZeRO-3 that
    weight is partitioned (vocab x hidden above DeepSpeed's 1e5-element persistence threshold, tied
    to the input embedding here). Same losses and weights as ZeRO-2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfalign.tasks.toy import build_tokenizer

    model = tmp_path / "big_vocab"
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(model)
    tok.save_pretrained(model)
    assert 2048 * 64 > 1e5
    steps2, w2 = _train(str(model), tmp_path, replay_pairs, "z2", **{"train.max_steps": 2})
    steps3, w3 = _train(str(model), tmp_path, replay_pairs, "z3", **{"train.max_steps": 2, "train.zero_stage": 3})
    assert steps3[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    for s2, s3 in zip(steps2, steps3):
        assert s3["loss"] == pytest.approx(s2["loss"], abs=1e-5)
    for k in w2:
        torch.testing.assert_close(w3[k], w2[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_rpo_alpha_adds_the_token_mean_nll_of_the_chosen_responses(tiny_model, tmp_path, replay_pairs):
    from selfalign.tasks import artifacts
    from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
    from selfalign.tasks.lm_logps import load_model, logps_of

    # one step over all 8 pairs in one micro-batch: the step's loss is ln 2 + alpha * NLL(chosen)
    steps, _ = _train(tiny_model, tmp_path, replay_pairs, "rpo", **{"train.rpo_alpha": 0.5, "train.max_steps": 1,
                                                                    "train.batch_size": 8, "train.micro_batch_size": 8})
    tok, model = load_tokenizer(tiny_model), load_model(tiny_model, "float32", False)
    rows = artifacts.read_table(tmp_path / "rpo.parquet")
    seqs = [(encode_prompt(tok, r["prompt"]), encode_response(tok, r["chosen"])) for r in rows]
    nll = -sum(logps_of(model, seqs, tok.pad_token_id)) / sum(len(c) for _, c in seqs)
    assert nll > 1.0  # a random model: the term is far from negligible
    assert steps[0]["loss"] == pytest.approx(LN2 + 0.5 * nll, abs=1e-5)
    # the term itself is logged under TRL's name, and so is the learning rate
    assert steps[0]["nll_loss"] == pytest.approx(nll, abs=1e-5) and steps[0]["learning_rate"] == pytest.approx(1e-3)


def test_follow_steps_reads_rows_as_they_are_written(tmp_path):
    import json
    import threading

    from selfalign.tasks.train import follow_steps

    path, seen, stop = tmp_path / "metrics.jsonl", [], threading.Event()
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2')  # the second row is half written
    follower = threading.Thread(target=follow_steps, args=(path, seen.append, stop, 0.01))
    follower.start()
    while not seen:
        pass
    assert seen == [{"step": 1}]
    with open(path, "a") as f:
        f.write("}\n")
    stop.set()
    follower.join()
    assert seen == [{"step": 1}, {"step": 2}]


def test_step_metrics_reach_mlflow_while_training_runs(tiny_model, tmp_path, monkeypatch):
    """The train task with an MLflow run: each step's metrics (TRL's names, learning_rate) are in
    MLflow, read back by another client, before the training worker has saved its model."""
    import time

    from mlflow.tracking import MlflowClient

    from conftest import write_replay_pairs
    from selfalign.flows import stages
    from selfalign.tasks import artifacts
    from selfalign.tasks.tracking import MlflowLogger

    class Logger:
        info = warning = staticmethod(lambda *a: None)

    monkeypatch.setattr(stages, "get_run_logger", lambda: Logger)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
                             "data.eval_prompts": "e", "data.offline_pairs": "o", "run.dir": str(tmp_path / "run"),
                             "train.lr": 1e-3, "train.max_steps": 40, "train.batch_size": 2,
                             "train.micro_batch_size": 2, "train.checkpoint_every": 0})
    pairs = write_replay_pairs(artifacts.round_dir(cfg.run_dir, 1) / "pairs.parquet", n=16)
    tracker = MlflowLogger(uri, "selfalign", "round_1")
    saved = cfg.run_dir / "round_1" / "model.partial" / "model.safetensors"  # the worker's last act
    reader = MlflowClient(uri)
    seen_while_running = []
    log_metrics = tracker.log_metrics

    def logged(metrics, step=None):
        log_metrics(metrics, step)
        if not saved.exists():  # the worker is still training: it saves the model when it is done
            seen_while_running.append(len(reader.get_metric_history(tracker.run_id, "loss")))

    tracker.log_metrics = logged
    t0 = time.time()
    stages.train_task.fn(cfg, 1, tiny_model, pairs, tracker)
    assert seen_while_running and seen_while_running[0] >= 1, f"no step reached MLflow during {time.time() - t0:.0f}s"
    history = reader.get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 41))
    run = reader.get_run(tracker.run_id)
    assert {"rewards/margins", "rewards/accuracies", "learning_rate", "grad_norm"} <= set(run.data.metrics)


def test_a_stale_op_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A rank killed while torch built DeepSpeed's op leaves `<op>/lock`, on which every later
    training would wait forever; a lock as old as no build takes is removed before a launch."""
    import os
    import time

    from selfalign.tasks.train import STALE_LOCK_SECONDS, clear_stale_build_locks

    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(stale, (old, old))
    lines = []
    assert clear_stale_build_locks(tmp_path, log=lines.append) == [stale]
    assert not stale.exists() and fresh.exists() and str(stale) in lines[0]
    assert clear_stale_build_locks(tmp_path / "missing") == []


def test_a_lock_left_while_training_runs_is_removed_by_the_watch(tmp_path):
    """Ranks already waiting on a lock that a killed process left are freed while the stage runs."""
    import os
    import threading
    import time

    from selfalign.tasks.train import STALE_LOCK_SECONDS, watch_build_locks

    stop = threading.Event()
    watch = threading.Thread(target=watch_build_locks, args=(tmp_path, stop, lambda m: None, 0.05))
    watch.start()
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    deadline = time.time() + 30
    while lock.exists() and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    watch.join(10)
    assert not lock.exists() and not watch.is_alive()
