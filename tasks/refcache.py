"""On-disk cache of reference log-probs for replay pairs.

A replay (offline) pair's reference log-probs depend only on the reference model, the dtype it runs
in and the pair's text as the model sees it. Generated pairs get theirs from the score stage; replay
pairs would need a reference forward in every training stage that sees them. The cache stores each
summed response log-prob once, under

    file  = <cache dir>/<model fingerprint>-<dtype>-<device type>.jsonl
    entry = sha256(prompt text, response text, prompt ids, response ids) -> float

The model fingerprint is a content hash of every file in the model directory (weights, config,
tokenizer and chat template), so a retrained, merged or re-saved model never hits another's values;
the token ids carry the template's rendering of the text. Hashing a large model takes seconds, so
fingerprints are memoised in <cache dir>/fingerprints.json against the files' sizes and modification
times. Models given by hub id (no local directory) are not cached.

Entries are appended as JSON lines and flushed; a line torn by a crash is skipped when read. Reads
and writes are safe with several ranks because only rank 0 writes (see `train_worker`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Sequence

from selfalign.tasks import artifacts, procs


def default_dir() -> Path:
    """$SELFALIGN_CACHE_DIR/ref-logps, else $XDG_CACHE_HOME (or ~/.cache)/selfalign/ref-logps."""
    return procs.cache_dir("ref-logps")


def resolve_dir(setting: str) -> Path | None:
    """`train.ref_cache`: "auto" -> the user cache directory, "off" -> None, else that path."""
    if setting == "off":
        return None
    return default_dir() if setting == "auto" else Path(setting).expanduser()


def _stat_signature(model_dir: Path) -> list[list]:
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    return [[str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def model_fingerprint(model: str, cache_dir: Path) -> str | None:
    """Content hash of a local model directory (memoised by file sizes and mtimes), None for a hub id."""
    d = Path(model)
    if not d.is_dir():
        return None
    d = d.resolve()
    memo_path = cache_dir / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    sig = _stat_signature(d)
    hit = memo.get(str(d))
    if hit and hit.get("files") == sig:
        return hit["fingerprint"]
    fp = artifacts.fingerprint([d])
    memo[str(d)] = {"files": sig, "fingerprint": fp}
    cache_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(memo_path, memo)
    return fp


def entry_key(prompt: str, response: str, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> str:
    blob = json.dumps([prompt, response, list(prompt_ids), list(response_ids)], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class LogpCache:
    """The cached log-probs of one (model fingerprint, dtype, device type)."""

    def __init__(self, cache_dir: Path, fingerprint: str, dtype: str, device_type: str):
        self.path = Path(cache_dir) / f"{fingerprint}-{dtype}-{device_type}.jsonl"
        self.values: dict[str, float] = {}
        self.hits = self.misses = 0
        if self.path.exists():
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        k, v = json.loads(line)
                    except (ValueError, TypeError):
                        continue  # a line torn by a crash
                    if isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v):
                        self.values[k] = float(v)

    def get(self, key: str) -> float | None:
        v = self.values.get(key)
        if v is None:
            self.misses += 1
        else:
            self.hits += 1
        return v

    def put(self, items: dict[str, float]) -> None:
        new = {k: v for k, v in items.items() if k not in self.values and math.isfinite(v)}
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            # a crash can tear only the last line: start a fresh one after a torn write
            end = f.seek(0, os.SEEK_END)
            if end > 0 and os.pread(f.fileno(), 1, end - 1) != b"\n":
                f.write(b"\n")
            f.write("".join(json.dumps([k, v]) + "\n" for k, v in new.items()).encode())
            f.flush()
            os.fsync(f.fileno())
        self.values.update(new)
