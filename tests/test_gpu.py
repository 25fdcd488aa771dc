"""CUDA paths: DeepSpeed ZeRO training on the GPU (NCCL) and scoring on the GPU against the CPU.
Skipped without CUDA (CI); run where a GPU is available."""
import math
from pathlib import Path

import pytest

from selfalign.flows.config import load_config

pytestmark = pytest.mark.gpu


def _cfg(model, run_dir, **over):
    base = {"model.policy": model, "model.reference": model, "data.prompts": "p", "data.eval_prompts": "e",
            "data.offline_pairs": "o", "run.dir": str(run_dir), "train.lr": 1e-3, "train.max_steps": 6,
            "train.batch_size": 4, "train.micro_batch_size": 2}
    return load_config(None, base | over)


@pytest.mark.parametrize("zero_stage, dtype", [(2, "float32"), (3, "bfloat16")])
def test_deepspeed_training_on_cuda(tiny_model, tmp_path, replay_pairs, zero_stage, dtype):
    from selfalign.tasks.train import run_train

    cfg = _cfg(tiny_model, tmp_path, **{"train.zero_stage": zero_stage, "model.dtype": dtype})
    steps = run_train(cfg, tiny_model, replay_pairs(), tmp_path / "model", seed=0, log=print)
    assert len(steps) == 6
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-2 if dtype == "bfloat16" else 1e-4)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_cuda_scores_match_cpu(tiny_model):
    import torch

    from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
    from selfalign.tasks.score import load_model, logps_of

    tok = load_tokenizer(tiny_model)
    seqs = [(encode_prompt(tok, f"What is {a} + 11?"), encode_response(tok, "x" * a)) for a in range(10, 40, 3)]
    cpu = logps_of(load_model(tiny_model, device="cpu"), seqs, tok.pad_token_id)
    gpu = logps_of(load_model(tiny_model, device="cuda"), seqs, tok.pad_token_id)
    assert torch.cuda.is_available()
    assert gpu == pytest.approx(cpu, rel=1e-4, abs=1e-3)
