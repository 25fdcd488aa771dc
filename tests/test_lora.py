"""LoRA training (train.lora_*, peft): only the adapters train; the reference is the same model with
its adapter disabled (no second copy); the round's model is saved with the adapter merged, a plain
checkpoint for generation, scoring and the next round.

The fast tests drive the worker's own pieces in one process (no DeepSpeed) on the tiny model; the
slow ones run the real training stage (checkpoint, NaN, resume, ZeRO-3) and one demo round
through the CLI."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfalign.flows.config import ConfigError, load_config

LN2 = math.log(2)
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}
BASE_KEYS = {"model.policy": "p", "model.reference": "r", "data.prompts": "p", "data.eval_prompts": "e",
             "data.offline_pairs": "o"}


# ---- config ------------------------------------------------------------------------------------

def test_lora_is_off_by_default_and_its_keys_reach_the_worker():
    cfg = load_config(None, BASE_KEYS)
    assert cfg.train.lora.enabled is False and "train.lora.r" not in cfg.train.keyed()  # not in the stage key
    cfg = load_config(None, BASE_KEYS | {"train.lora.enabled": True, "train.lora.r": 8, "train.lora.alpha": 16,
                                         "train.lora.dropout": 0.05, "train.lora.target_modules": " q_proj, v_proj "})
    assert cfg.train.lora.spec() == {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    assert load_config(None, BASE_KEYS | {"train.lora.enabled": True}).train.lora.spec()["target_modules"] == "all-linear"
    # a bad LoRA value fails even while LoRA is off (it would, the day LoRA is turned on)
    with pytest.raises(ConfigError, match=r"train\.lora\.r: 0 must be >= 1"):
        load_config(None, BASE_KEYS | {"train.lora.r": 0})


@pytest.mark.parametrize("key,value,match", [
    ("train.lora.r", 0, r"train\.lora\.r: 0 must be >= 1"),
    ("train.lora.alpha", 0, r"train\.lora\.alpha: 0\.0 must be > 0"),
    ("train.lora.dropout", 1.0, r"train\.lora\.dropout: 1\.0 must be in \[0, 1\)"),
    ("train.lora.dropout", -0.1, r"train\.lora\.dropout: -0\.1 must be in \[0, 1\)"),
    ("train.lora.target_modules", " , ", r"train\.lora\.target_modules: \['', ''\] must name at least one module"),
    ("train.lora.target_modules", "all-linear,q_proj", r"all-linear already selects every linear layer"),
    ("train.lora.target_modules", "q_proj,,v_proj", r"has '', which is not a module name"),
    ("train.lora.target_modules", "q proj", r"has 'q proj', which is not a module name"),
])
def test_bad_lora_values_are_named(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, BASE_KEYS | {"train.lora.enabled": True, key: value})
    with pytest.raises(ConfigError, match=r"train\.lora\.enabled: expected true/false, got 'yes'"):
        load_config(None, BASE_KEYS | {"train.lora.enabled": "yes"})


def test_target_modules_are_checked_against_a_local_policy_at_load_time(tiny_model):
    keys = BASE_KEYS | {"model.policy": tiny_model, "train.lora.enabled": True}
    assert load_config(None, keys | {"train.lora.target_modules": "q_proj,v_proj"}).train.lora.enabled
    with pytest.raises(ConfigError, match=r"train\.lora\.target_modules: \['q_prj'\] does not fit this model: .*"
                                          r"\(model\.policy: .*tiny"):
        load_config(None, keys | {"train.lora.target_modules": "q_prj"})
    with pytest.raises(ConfigError, match=r"puts an adapter on the output embeddings \(lm_head\)"):
        load_config(None, keys | {"train.lora.target_modules": "lm_head"})


# ---- the worker's pieces, in process -----------------------------------------------------------

def _rows(tmp: Path, tok) -> list[dict]:
    from conftest import write_replay_pairs

    from selfalign.tasks import artifacts
    from selfalign.tasks.data import encode_prompt, encode_response

    rows = artifacts.read_table(write_replay_pairs(tmp / "pairs.parquet"))
    for r in rows:
        r["prompt_ids"] = encode_prompt(tok, r["prompt"])
        r["chosen_ids"], r["rejected_ids"] = encode_response(tok, r["chosen"]), encode_response(tok, r["rejected"])
    return rows


def _seqs(rows):
    return [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"]) for r in rows]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """The tiny model with LoRA adapters after 3 DPO steps on 8 replay pairs (one micro-batch a
    step), as the worker builds it: reference log-probs with the adapter disabled, the worker's
    Policy and Objective, an optimizer over the trainable parameters only. Then the adapter is
    saved alone and merged into the saved model."""
    from selfalign.tasks.data import load_tokenizer
    from selfalign.tasks.lm_logps import collate, fused_head_ok, load_model, logps_of, packing_path
    from selfalign.tasks.lora import lora_reference, save_lora, wrap_lora
    from selfalign.tasks.train_refs import fill_reference_logps
    from selfalign.tasks.train_worker import Objective, Policy

    tmp = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, "float32", device="cpu")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    rows = _rows(tmp, tok)
    peft_model = wrap_lora(model, LORA)
    with lora_reference(peft_model):
        fill_reference_logps(model, rows, tok.pad_token_id, 0, 1, batch_tokens=4096, packing=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    policy = Policy(model, fused_head_ok(model), packing=packing_path(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    objective = Objective({"loss": "dpo", "beta": 0.1, "label_smoothing": 0.0}, world=1)
    model.train()
    losses = []
    for _ in range(3):
        sums, counts = policy(*collate(_seqs(rows), tok.pad_token_id, "cpu"))
        n = len(rows)
        rc = torch.tensor([r["ref_chosen_logp"] for r in rows])
        rr = torch.tensor([r["ref_rejected_logp"] for r in rows])
        loss = objective(sums[:n], sums[n:], rc, rr, counts[:n].float(), counts[n:].float())[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = logps_of(model, _seqs(rows), tok.pad_token_id)
    with lora_reference(peft_model):
        reference = logps_of(model, _seqs(rows), tok.pad_token_id)
    adapted_again = logps_of(model, _seqs(rows), tok.pad_token_id)  # the adapter is back on
    save_lora(peft_model, tmp / "model", tok, tmp / "adapter")
    return {"tok": tok, "rows": rows, "base": base, "after": after, "trainable": trainable, "losses": losses,
            "adapted": adapted, "adapted_again": adapted_again, "reference": reference,
            "out": tmp / "model", "adapter": tmp / "adapter"}


def test_only_the_adapters_train_and_the_base_weights_stay_identical(trained):
    base, after = trained["base"], trained["after"]
    assert trained["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in trained["trainable"])
    frozen = {n: p for n, p in after.items() if n not in trained["trainable"]}
    # every base weight is still there, bit for bit (a wrapped layer's is under `base_layer`)
    assert sorted(n.replace(".base_layer", "") for n in frozen) == sorted(base)
    for n, p in frozen.items():
        assert torch.equal(p, base[n.replace(".base_layer", "")]), n
    # B starts at zero: the adapters did train
    lora_b = [p for n, p in after.items() if ".lora_B." in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)
    assert trained["losses"][-1] < trained["losses"][0]


def test_first_step_loss_is_ln2_because_the_adapter_starts_at_zero(trained):
    assert trained["losses"][0] == pytest.approx(LN2, abs=1e-6)


def test_reference_with_the_adapter_disabled_equals_a_separately_loaded_base_model(trained, tiny_model):
    from selfalign.tasks.lm_logps import load_model, logps_of

    tok, rows = trained["tok"], trained["rows"]
    base_model = load_model(tiny_model, "float32", device="cpu")
    want = logps_of(base_model, _seqs(rows), tok.pad_token_id)
    assert trained["reference"] == pytest.approx(want, abs=1e-5)
    # the replay pairs' reference log-probs (computed before training) are the base model's too
    n = len(rows)
    assert [r["ref_chosen_logp"] for r in rows] == pytest.approx(want[:n], abs=1e-4)
    assert [r["ref_rejected_logp"] for r in rows] == pytest.approx(want[n:], abs=1e-4)
    # the trained adapter does change the model, and it is enabled again after the reference
    assert max(abs(a - b) for a, b in zip(trained["adapted"], want)) > 1e-2
    assert trained["adapted_again"] == trained["adapted"]


def test_the_merged_model_is_a_plain_checkpoint_that_differs_from_the_base(trained, tiny_model):
    from transformers import AutoModelForCausalLM

    from selfalign.tasks.lm_logps import logps_of

    out, base = trained["out"], trained["base"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    merged = load_file(out / "model.safetensors")
    assert sorted(merged) == sorted(base)  # no adapter tensors, no base_layer names
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    linear = {k for k in base if k.endswith("_proj.weight")}
    assert changed == linear  # all-linear: every projection, never the embeddings, norms or head
    # merged = W + (alpha / r) * B @ A, from the adapter saved alone
    adapter = load_file(trained["adapter"] / "adapter_model.safetensors")
    assert json.loads((trained["adapter"] / "adapter_config.json").read_text())["r"] == LORA["r"]
    for k in linear:
        stem = "base_model.model." + k[:-len(".weight")]
        delta = (LORA["alpha"] / LORA["r"]) * adapter[f"{stem}.lora_B.weight"] @ adapter[f"{stem}.lora_A.weight"]
        torch.testing.assert_close(merged[k], base[k] + delta, atol=1e-6, rtol=1e-5)
    # from_pretrained loads it without peft, and it computes what the adapted model computed
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert not any("lora" in n for n, _ in model.named_parameters())
    got = logps_of(model.eval(), _seqs(trained["rows"]), trained["tok"].pad_token_id)
    assert got == pytest.approx(trained["adapted"], abs=1e-4)


def test_target_modules_that_do_not_fit_the_model_are_named(tiny_model):
    from selfalign.tasks.lm_logps import load_model
    from selfalign.tasks.lora import wrap_lora

    for targets, match in [(["nonexistent_proj"], r"train\.lora\.target_modules: \['nonexistent_proj'\] does not fit"),
                           (["lm_head"], r"puts an adapter on the output embeddings \(lm_head\)"),
                           (["embed_tokens", "q_proj"], r"puts an adapter on the input embeddings \(model\.embed_tokens\)")]:
        model = load_model(tiny_model, "float32", device="cpu")
        with pytest.raises(ValueError, match=match):
            wrap_lora(model, LORA | {"target_modules": targets})


# ---- the real training stage and the CLI -------------------------------------------------------

def _cfg(tiny_model, tmp_path, **over):
    return load_config(None, {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
                              "data.eval_prompts": "e", "data.offline_pairs": "o", "run.dir": str(tmp_path),
                              "train.lr": 1e-2, "train.max_steps": 4, "train.batch_size": 4,
                              "train.micro_batch_size": 2, "train.checkpoint_every": 2, "train.lora.enabled": True,
                              "train.lora.r": 4, "train.lora.alpha": 8, "train.lora.target_modules": "q_proj,v_proj"}
                       | over)


@pytest.mark.slow
def test_lora_training_stage_checkpoints_resumes_and_merges(tiny_model, tmp_path, replay_pairs, monkeypatch):
    """The stage under DeepSpeed ZeRO-2: first loss ln 2, only the targeted weights change (by the
    saved adapter's B @ A), checkpoints hold the adapter state only; a NaN at step 3 keeps the step-2
    checkpoint and the rerun resumes from it to the uninterrupted run's losses and weights. ZeRO-3
    trains and merges the same model."""
    from selfalign.tasks.train import NonFiniteTraining, adapter_dir, checkpoint_dir, run_train
    from selfalign.tasks.train_guard import FAULT_NAN_STEP

    cfg = _cfg(tiny_model, tmp_path)
    pairs = replay_pairs()
    base = load_file(f"{tiny_model}/model.safetensors")

    ref_out = tmp_path / "ref" / "model"
    ref_out.parent.mkdir()
    logged = []
    ref_steps = run_train(cfg.train, cfg.model, tiny_model, pairs, ref_out, seed=0, log=logged.append, key={"k": 1})
    assert any("train: LoRA r=4" in m and "trainable parameters" in m for m in logged)
    assert ref_steps[0]["loss"] == pytest.approx(LN2, abs=1e-6) and ref_steps[-1]["loss"] < ref_steps[0]["loss"]
    ref = load_file(ref_out / "model.safetensors")
    adapter = load_file(adapter_dir(ref_out) / "adapter_model.safetensors")
    assert sorted(ref) == sorted(base)
    targeted = {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert len(targeted) == 4 and {k for k in ref if not torch.equal(ref[k], base[k])} == targeted
    for k in targeted:
        stem = "base_model.model." + k[:-len(".weight")]
        delta = 2.0 * adapter[f"{stem}.lora_B.weight"] @ adapter[f"{stem}.lora_A.weight"]
        torch.testing.assert_close(ref[k], base[k] + delta, atol=1e-6, rtol=1e-5)

    out = tmp_path / "run" / "model"
    out.parent.mkdir()
    monkeypatch.setenv(FAULT_NAN_STEP, "3")
    with pytest.raises(NonFiniteTraining, match=r"non-finite loss nan at step 3/4.*last good checkpoint \(step 2\)"):
        run_train(cfg.train, cfg.model, tiny_model, pairs, out, seed=0, log=lambda m: None, key={"k": 1})
    assert not out.exists()
    ckpt = checkpoint_dir(out) / "step-000002"
    saved = [torch.load(p, weights_only=False)["module"] for p in ckpt.glob("*model_states.pt")]
    # the trainable state only: the frozen base weights come from the start-of-round model
    assert saved and all(saved) and all(".lora_" in k for sd in saved for k in sd)
    monkeypatch.delenv(FAULT_NAN_STEP)
    logged.clear()
    steps = run_train(cfg.train, cfg.model, tiny_model, pairs, out, seed=0, log=logged.append, key={"k": 1})
    assert any("resuming from the checkpoint of step 2" in m for m in logged)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s, r in zip(steps, ref_steps):
        assert s["loss"] == pytest.approx(r["loss"], abs=1e-6)
    got = load_file(out / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-6)

    # ZeRO-3 (partitioned base weights, gathered for the merge) trains and saves the same model, and
    # the next round starts a fresh adapter on the merged model: its first loss is ln 2 again
    z3 = tmp_path / "z3" / "model"
    z3.parent.mkdir()
    z3_cfg = _cfg(tiny_model, tmp_path, **{"train.zero_stage": 3, "train.checkpoint_every": 0})
    z3_steps = run_train(z3_cfg.train, z3_cfg.model, tiny_model, pairs, z3, seed=0, log=lambda m: None)
    for s, r in zip(z3_steps, ref_steps):
        assert s["loss"] == pytest.approx(r["loss"], abs=1e-5)
    got = load_file(z3 / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
    r2 = tmp_path / "round2" / "model"
    r2.parent.mkdir()
    r2_steps = run_train(z3_cfg.train, z3_cfg.model, str(ref_out), pairs, r2, seed=0, log=lambda m: None)
    assert r2_steps[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    # same seed, same first batch: round 2 starts from what round 1 learned (chosen over rejected)
    gap = lambda s: s["logps/chosen"] - s["logps/rejected"]
    assert gap(r2_steps[0]) > gap(ref_steps[0]) + 1.0
    got = load_file(r2 / "model.safetensors")
    assert {k for k in got if not torch.equal(got[k], ref[k])} == targeted


ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "selfalign.flows.cli", "run", str(ROOT / "deploy" / "presets" / "demo.yaml")]
# tests/test_e2e.py's small round, plain DPO (first loss ln 2), with LoRA on
SMALL = ["--run.rounds=1", "--data.prompts_per_round=24", "--generate.k=4", "--pairs.min_valid=2",
         "--data.max_eval_prompts=8", "--evaluate.samples=2", "--train.max_steps=3", "--train.batch_size=8",
         "--train.micro_batch_size=4", "--train.rpo_alpha=0", "--tracking.plots=false",
         "--train.lora.enabled=true", "--train.lora.r=8", "--train.lora.alpha=16", "--train.lr=1e-3"]


@pytest.mark.slow
def test_one_lora_round_of_the_demo_through_the_cli(tmp_path):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"SELFALIGN_HOME": str(tmp_path / "home"),
                                                                "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(CLI + SMALL + [f"--run.dir={run}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r1 = run / "round_1"
    assert (r1 / "train" / "adapter" / "adapter_model.safetensors").exists()
    merged = load_file(r1 / "model" / "model.safetensors")
    pi0 = load_file(ROOT / "assets" / "demo" / "dpo" / "model.safetensors")
    assert sorted(merged) == sorted(pi0) and any(not torch.equal(merged[k], pi0[k]) for k in merged)
    m = json.loads((r1 / "metrics.json").read_text())
    assert "eval/preferred_rate" in m and "eval/pair_accuracy" in m  # the merged model was evaluated

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("selfalign").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert parent.data.params["train.lora.enabled"] == "True" and parent.data.params["train.lora.r"] == "8"
    for key in ("loss", "rewards/margins", "rewards/accuracies", "eval/preferred_rate", "eval/pair_accuracy"):
        assert key in child.data.metrics, key
    history = client.get_metric_history(child.info.run_id, "loss")
    assert len(history) == 3 and min(history, key=lambda h: h.step).value == pytest.approx(LN2, abs=1e-4)
