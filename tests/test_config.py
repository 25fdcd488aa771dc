from pathlib import Path

import pytest

from selfalign.flows.config import ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "deploy" / "presets" / "demo.yaml"
BASE = {"model.policy": "a", "model.reference": "b", "data.prompts": "p", "data.eval_prompts": "e",
        "data.offline_pairs": "o"}


def test_demo_preset_resolves_paths_relative_to_the_preset():
    cfg = load_config(DEMO)
    assert cfg.model.policy == str((ROOT / "assets/demo/dpo").resolve())
    assert cfg.generate.k == 8 and cfg.run.rounds == 3
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.epochs, float)
    # defaults of keys the preset leaves out are the DICE ones
    assert cfg.train.zero_stage == 2 and cfg.score.reference == "previous"


def test_dotted_overrides_are_typed():
    cfg = load_config(DEMO, ["--train.beta=0.25", "--generate.k=4", "--run.name=x", "--model.trust_remote_code=false"])
    assert cfg.train.beta == 0.25 and cfg.generate.k == 4 and cfg.run.name == "x"
    assert parse_override("--train.lr=1e-5") == ("train.lr", 1e-5)


@pytest.mark.parametrize("override, needle", [
    ("--train.betta=0.1", "train.betta"),
    ("--trian.beta=0.1", "trian"),
    ("--train.beta=-1", "train.beta: -1"),
    ("--pairs.gamma=1.5", "pairs.gamma: 1.5"),
    ("--generate.k=1", "generate.k: 1"),
    ("--generate.k=many", "generate.k: expected an integer, got 'many'"),
    ("--score.reference=best", "score.reference: 'best'"),
    ("--model.policy=", "model.policy is required"),
    ("--train.loss=magic", "train.loss: 'magic'"),
    ("--train.batch_size=10", "train.batch_size"),
])
def test_bad_values_name_key_and_value(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    assert needle in str(e.value)


def test_missing_preset_and_malformed_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(DEMO, ["train.beta=0.1"])


def test_defaults_follow_dice():
    cfg = load_config(None, BASE)
    assert (cfg.generate.k, cfg.train.beta, cfg.train.lr, cfg.pairs.gamma, cfg.pairs.min_valid) == (16, 0.1, 5e-7, 0.5, 8)
    assert cfg.run.rounds == 2 and cfg.pairs.length_unit == "chars"
    assert cfg.run_dir == Path("runs/selfalign")
