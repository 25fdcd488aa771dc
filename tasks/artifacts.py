"""Run-directory layout and atomic file I/O. Every stage writes its output under a temporary name and
renames it into place, with a manifest of what produced it, so a crashed run never leaves a
half-written table that a rerun would take for finished work."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq


def round_dir(run_dir: Path, r: int) -> Path:
    d = Path(run_dir) / f"round_{r}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_table(path: Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    tmp = _tmp(path)
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_table(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def write_json(path: Path, obj: Any) -> Path:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def publish_dir(tmp_dir: Path, final_dir: Path) -> Path:
    """Move a fully written directory into place, replacing an older one."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    return final_dir


def fingerprint(paths: Iterable[Path | str]) -> str:
    """Content hash of files or directories (all files under them, by relative name)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def manifest_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".manifest.json")


def is_done(output: Path, key: dict[str, Any]) -> bool:
    """True when `output` exists and its manifest records the same inputs and config."""
    m = manifest_path(output)
    return Path(output).exists() and m.exists() and read_json(m).get("key") == key


def mark_done(output: Path, key: dict[str, Any]) -> None:
    # The token changes every time the stage really runs, so stages downstream (whose keys include
    # it through `input_token`) rerun whenever this one did.
    write_json(manifest_path(output), {"key": key, "token": uuid.uuid4().hex})


def shard_path(output: Path, index: int) -> Path:
    """The file of shard `index` of a stage output written in parts (`samples.shard-00003.parquet`)."""
    output = Path(output)
    return output.with_name(f"{output.stem}.shard-{index:05d}{output.suffix}")


def remove_shards(output: Path) -> None:
    """Deletes the shards of `output` and their manifests, once `output` and its manifest are written."""
    output = Path(output)
    for f in output.parent.glob(f"{output.stem}.shard-*{output.suffix}*"):
        f.unlink(missing_ok=True)


def input_token(path: Path | str) -> str:
    """What a downstream stage records about one of its inputs: the producing stage's run token
    when the input is a stage output, else the path with its size and modification time."""
    p = Path(path)
    m = manifest_path(p)
    if m.exists():
        return read_json(m)["token"]
    if p.is_file():
        st = p.stat()
        return f"{p}:{st.st_size}:{int(st.st_mtime)}"
    return str(path)
