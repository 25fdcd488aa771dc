"""Each stage's config section on its own: its __post_init__ names the dotted key and the bad
value; values parse into their fields' types (Literal choices, lists, nested groups)."""
import sys

import pytest

from selfalign.tasks.config_base import ConfigError, parse_section
from selfalign.tasks.evaluate_config import EvaluateConfig
from selfalign.tasks.generate_config import GenerateConfig
from selfalign.tasks.pairs_config import PairsConfig
from selfalign.tasks.score_config import ScoreConfig
from selfalign.tasks.train_config import HpoConfig, LoraConfig, MrpoConfig, TrainConfig


@pytest.mark.parametrize("build, message", [
    (lambda: GenerateConfig(k=1), "generate.k: 1 must be >= 2"),
    (lambda: ScoreConfig(reference="best"), "score.reference: 'best' is not one of ['initial', 'previous', 'sft']"),
    (lambda: PairsConfig(max_chars=3), "pairs.max_chars: 3 must be > pairs.min_chars=4"),
    (lambda: EvaluateConfig(judge_url="ftp://x"), "evaluate.judge_url: 'ftp://x' must be an http(s) URL"),
    (lambda: LoraConfig(target_modules=["all-linear", "q_proj"]), "train.lora.target_modules: ['all-linear', 'q_proj']"),
    (lambda: MrpoConfig(references=["org/a"], tokenizers=["", ""]), "train.mrpo.tokenizers: ['', ''] must give one"),
    (lambda: HpoConfig(nll="median"), "train.hpo.nll: 'median' is not one of ['mean', 'sum']"),
    (lambda: TrainConfig(zero_stage=4), "train.zero_stage: 4 is not one of [0, 1, 2, 3, 'auto']"),
    (lambda: TrainConfig(loss="mrpo"), "train.mrpo.references: [] must list at least one"),
])
def test_a_section_names_its_bad_key_and_value(build, message):
    with pytest.raises(ConfigError) as e:
        build()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_values_parse_into_typed_fields():
    t = parse_section(TrainConfig, {"zero_stage": 2, "lora": {"enabled": True, "target_modules": "q_proj, v_proj"},
                                    "hpo": {"rewards": "a.b:c", "reward_weights": 0.5}, "mrpo": {"references": ["org/a", "org/b"]}}, "train")
    assert t.zero_stage == 2 and t.lora.target_modules == ["q_proj", "v_proj"] and t.hpo.reward_weights == [0.5]
    assert t.mrpo.reference_list() == [("org/a", ""), ("org/b", "")]
    assert parse_section(MrpoConfig, {"tokenizers": ""}, "train.mrpo").tokenizers == []
    for raw, message in [({"zero_stage": "two"}, "train.zero_stage: expected an integer or auto, got 'two'"),
                         ({"zero_stage": True}, "train.zero_stage: expected an integer or auto, got True"),
                         ({"lora": {"r": 2.5}}, "train.lora.r: expected an integer, got 2.5"),
                         ({"lora": [1]}, "train.lora: expected a mapping, got [1]"),
                         ({"hpo": {"reward_weights": [1, "x"]}}, "train.hpo.reward_weights: expected numbers, got [1, 'x']"),
                         ({"lora_r": 8}, "unknown config key train.lora_r (train.lora.r? known in train:")]:
        with pytest.raises(ConfigError) as e:
            parse_section(TrainConfig, raw, "train")
        assert str(e.value).startswith(message)


def test_checking_a_config_imports_no_torch(tmp_path):
    import subprocess

    code = ("import sys; from selfalign.flows.config import load_config; load_config('deploy/presets/demo.yaml');"
            "print([m for m in ('torch', 'vllm', 'transformers') if m in sys.modules])")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_nothing_in_tasks_imports_flows():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in (root / "tasks").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.startswith("selfalign.flows") for n in names), f"{path.name} imports {names}"
