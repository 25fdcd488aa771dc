"""Every preset in deploy/presets loads and validates; the GPU presets carry the DICE paper's settings
(docs/algorithms.md 2.3-2.7) and their memory estimate. Hub ids are accepted without a download."""
from pathlib import Path

import pytest
import yaml

from selfalign.flows.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "deploy" / "presets").glob("*.yaml"))


def _missing_local_models(preset: Path) -> list[str]:
    """model.* keys naming a local folder that is not there yet (the SmolLM2 checkpoint exists only
    after scripts/convert_gguf.py)."""
    raw = yaml.safe_load(preset.read_text()) or {}
    out = []
    for key in ("policy", "reference"):
        value = (raw.get("model") or {}).get(key, "")
        if value.startswith(("./", "../")) and not (preset.parent / value).exists():
            out.append(f"model.{key}")
    return out


def test_presets_found():
    assert {"demo.yaml", "smollm2_cpu.yaml", "h100_1b.yaml", "8gpu_8b.yaml"} <= {p.name for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_loads(preset, tiny_model):
    # A local model that has not been built yet is replaced by the tiny test model, so the rest of
    # the preset (data files, hooks, every value's range) is still validated.
    overrides = {key: tiny_model for key in _missing_local_models(preset)}
    cfg = load_config(preset, overrides)
    assert cfg.run.name and cfg.run.rounds >= 1
    for key in ("preferred", "checker"):
        hook = getattr(cfg.evaluate, key)
        if hook:
            from selfalign.tasks.data import load_hook

            assert callable(load_hook(hook, f"evaluate.{key}"))


def test_8gpu_preset_is_the_dice_setting():
    cfg = load_config(ROOT / "deploy" / "presets" / "8gpu_8b.yaml")
    assert cfg.model.policy == "princeton-nlp/Llama-3-Base-8B-SFT-DPO"
    assert cfg.model.reference == "princeton-nlp/Llama-3-Base-8B-SFT"
    g, p, t = cfg.generate, cfg.pairs, cfg.train
    assert (g.k, g.temperature, g.top_p, g.max_tokens) == (16, 0.9, 1.0, 2048)
    assert (p.min_valid, p.gamma) == (8, 0.5)
    assert (t.loss, t.beta, t.lr, t.max_steps, t.batch_size) == ("dpo", 0.1, 5e-7, 300, 32)
    assert (t.zero_stage, t.nproc, t.micro_batch_size, cfg.model.dtype) == (3, 8, 1, "bfloat16")
    assert t.batch_size // (t.micro_batch_size * t.nproc) == 4  # DICE: 1 per GPU x 4 accumulation x 8 GPUs
    assert cfg.run.rounds == 2 and cfg.score.reference == "previous"


def test_the_one_gpu_preset_trains_on_one_rank_without_zero_sharding():
    cfg = load_config(ROOT / "deploy" / "presets" / "h100_1b.yaml")
    assert (cfg.train.zero_stage, cfg.train.nproc, cfg.model.dtype) == ("auto", 1, "bfloat16")
    assert cfg.train.zero_stage_for(cfg.train.nproc) == 0


@pytest.mark.parametrize("name", ["h100_1b.yaml", "8gpu_8b.yaml"])
def test_gpu_presets_hold_out_the_test_split_and_guard_on_it(name):
    cfg = load_config(ROOT / "deploy" / "presets" / name)
    d = cfg.data
    # held-out pairs: the test split of the dataset the offline (replay) pairs come from, train split
    assert d.heldout_pairs == d.offline_pairs == "trl-lib/ultrafeedback_binarized"
    assert (d.offline_pairs_split, d.heldout_pairs_split) == ("", "test")
    assert (d.eval_prompts, d.eval_prompts_split) == ("HuggingFaceH4/no_robots", "test")
    # the guard acts whenever held-out pairs are given (flows/pipeline.py): on, at the default threshold
    assert d.heldout_pairs and 0 < cfg.guard.min_pair_accuracy <= 1
