"""The on-disk cache of replay pairs' reference log-probs (tasks/refcache.py): keyed by the model's
content, dtype and text; a second training stage on the same model and replay pairs computes no
reference forward and trains exactly as the first; torn lines and changed models never give wrong
values."""
import json
import math
import os

import pytest

from selfalign.flows.config import load_config
from selfalign.tasks import artifacts, refcache
from selfalign.tasks.train import run_train


def test_cache_round_trip_and_torn_line(tmp_path):
    c = refcache.LogpCache(tmp_path, "fp", "float32", "cpu")
    k1 = refcache.entry_key("p", "r", [1, 2], [3])
    assert c.get(k1) is None
    c.put({k1: -1.5, "nan": math.nan})
    with open(c.path, "ab") as f:
        f.write(b'["torn", -2')  # a write cut short by a crash
    again = refcache.LogpCache(tmp_path, "fp", "float32", "cpu")
    assert again.get(k1) == -1.5 and again.get("torn") is None and again.get("nan") is None
    k2 = refcache.entry_key("p", "r2", [1, 2], [4])
    again.put({k2: -0.25})  # starts on a fresh line after the torn one
    third = refcache.LogpCache(tmp_path, "fp", "float32", "cpu")
    assert third.get(k1) == -1.5 and third.get(k2) == -0.25
    # another dtype or device type is another file
    assert refcache.LogpCache(tmp_path, "fp", "bfloat16", "cpu").get(k1) is None
    # the key covers text and ids: the same ids with another text (or template) miss
    assert refcache.entry_key("p ", "r", [1, 2], [3]) != k1 and refcache.entry_key("p", "r", [1, 2], [3, 3]) != k1


def test_fingerprint_follows_content_not_path(tmp_path, tiny_model):
    import shutil

    cache = tmp_path / "cache"
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model, a)
    shutil.copytree(tiny_model, b)
    fa = refcache.model_fingerprint(str(a), cache)
    assert fa == refcache.model_fingerprint(str(b), cache) == refcache.model_fingerprint(str(a), cache)
    memo = json.loads((cache / "fingerprints.json").read_text())
    assert str(a.resolve()) in memo
    # same size, new content (one flipped byte in the weights): a new fingerprint
    w = b / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    assert refcache.model_fingerprint(str(b), cache) != fa
    assert refcache.model_fingerprint("org/hub-model-id", cache) is None
    assert refcache.resolve_dir("off") is None and refcache.resolve_dir(str(tmp_path)) == tmp_path


def _train(model, run_dir, pairs, cache, **over):
    cfg = load_config(None, {"model.policy": model, "model.reference": model, "data.prompts": "p",
                             "data.eval_prompts": "e", "data.offline_pairs": "o", "run.dir": str(run_dir),
                             "train.lr": 1e-3, "train.max_steps": 2, "train.batch_size": 4,
                             "train.micro_batch_size": 2, "train.ref_cache": str(cache)} | over)
    out = run_dir / "model"
    out.parent.mkdir(parents=True)
    lines: list[str] = []
    steps = run_train(cfg.train, cfg.model, model, pairs, out, seed=0, log=lines.append)
    return steps, "\n".join(lines)


@pytest.mark.slow
def test_second_stage_takes_reference_logps_from_the_cache(tiny_model, tmp_path, replay_pairs, naive_logp):
    from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
    from selfalign.tasks.lm_logps import load_model

    cache = tmp_path / "cache"
    pairs = replay_pairs()
    steps1, log1 = _train(tiny_model, tmp_path / "first", pairs, cache)
    assert "8 replay pairs: 0 from the cache, 8 computed" in log1
    steps2, log2 = _train(tiny_model, tmp_path / "second", pairs, cache)
    assert "8 replay pairs: 8 from the cache, 0 computed" in log2
    assert [s["loss"] for s in steps2] == [s["loss"] for s in steps1]
    assert steps1[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)

    # what the cache holds is the reference log-prob by the naive formula
    (f,) = [p for p in cache.glob("*.jsonl")]
    assert f.name.endswith("-float32-cpu.jsonl")
    stored = dict(json.loads(line) for line in f.read_text().splitlines() if line)
    assert len(stored) == 16
    tok, model = load_tokenizer(tiny_model), load_model(tiny_model, device="cpu")
    for r in artifacts.read_table(pairs)[:3]:
        p = encode_prompt(tok, r["prompt"])
        for side in ("chosen", "rejected"):
            ids = encode_response(tok, r[side])
            assert stored[refcache.entry_key(r["prompt"], r[side], p, ids)] == pytest.approx(
                naive_logp(model, p, ids), abs=1e-4)

    # the trained model of the first stage is another model: nothing from the cache
    _, log3 = _train(str(tmp_path / "first" / "model"), tmp_path / "third", pairs, cache)
    assert "0 from the cache, 8 computed" in log3
    # off: computed every time, nothing written
    _, log4 = _train(tiny_model, tmp_path / "fourth", pairs, "off")
    assert "0 from the cache, 8 computed" in log4
