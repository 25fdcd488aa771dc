import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]

# The reference log-prob cache (train.ref_cache=auto) of this test session, not the user's.
if "SELFALIGN_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["SELFALIGN_CACHE_DIR"] = tempfile.mkdtemp(prefix="selfalign-test-cache-")


@pytest.fixture(autouse=True)
def _own_environment():
    """Each test's environment to itself: a command run in-process (`cli.main`) sets its defaults in
    os.environ (TQDM_DISABLE in CI, Prefect's home), and mlflow.set_tracking_uri/set_registry_uri
    set process-wide URIs that outrank a client's own; a later test in the same pytest process (or
    its subprocesses) would inherit them."""
    saved = dict(os.environ)
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-init 2-layer Llama with the demo's character tokenizer, saved and reloaded through
    the ordinary from_pretrained path (head_dim 32, as vLLM's CPU attention needs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfalign.tasks.toy import build_tokenizer

    out = tmp_path_factory.mktemp("tiny") / "model"
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def pytest_collection_modifyitems(config, items):
    # Files with end-to-end (slow) tests first: with files dealt to test processes one at a time
    # (scripts/test.sh), the short files then fill the end instead of one long file running alone.
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_replay_pairs(path: Path, n: int = 8) -> Path:
    """A pair table of `n` offline (replay) pairs, reference log-probs still to be computed."""
    import math

    from selfalign.tasks import artifacts

    rows = [{"source": "offline", "prompt_id": f"o{i}", "prompt": f"What is {10 + i} + 20?",
             "chosen": f"The sum of {10 + i} and 20 is {30 + i}. Happy to help!", "rejected": f"{30 + i}",
             "chosen_ids": [], "rejected_ids": [], "ref_chosen_logp": math.nan, "ref_rejected_logp": math.nan}
            for i in range(n)]
    artifacts.write_table(path, rows)
    return path


@pytest.fixture
def replay_pairs(tmp_path):
    return lambda name="pairs": write_replay_pairs(tmp_path / f"{name}.parquet")


def _naive_logp(model, prompt_ids, response_ids) -> float:
    """One sequence at a time, no padding, the textbook formula."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    n = len(prompt_ids)
    return sum(logp[n - 1 + t, tok].item() for t, tok in enumerate(response_ids))


@pytest.fixture
def naive_logp():
    """Summed response log-prob of one (prompt, response) by the naive formula: the slow reference."""
    return _naive_logp
