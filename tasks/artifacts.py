"""Run-directory layout and atomic file I/O. Every stage writes its output under a temporary name and
renames it into place, with a manifest of what produced it, so a crashed run never leaves a
half-written table that a rerun would take for finished work."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
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


# Files up to this size are recorded by a content hash; larger ones (model weights) by size and
# modification time, which a truncation or a rewrite changes, so a skip check never reads gigabytes.
HASHED_BYTES = 64 << 20


def content_record(output: Path) -> dict[str, list]:
    """What `output` (a file, or a folder's files by relative name) holds: [size, sha256 or mtime_ns]."""
    output = Path(output)
    files = sorted(f for f in output.rglob("*") if f.is_file()) if output.is_dir() else [output]
    record = {}
    for f in files:
        st = f.stat()
        if st.st_size <= HASHED_BYTES:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            record[str(f.relative_to(output)) if output.is_dir() else f.name] = [st.st_size, h.hexdigest()]
        else:
            record[str(f.relative_to(output)) if output.is_dir() else f.name] = [st.st_size, st.st_mtime_ns]
    return record


def why_not_done(output: Path, key: dict[str, Any], settings: dict[str, Any] | None = None) -> str:
    """Why `output` must be made again ("" when it is up to date): missing, made from other inputs
    or config (naming the parts of the key that differ, and the config keys among `settings` whose
    values differ from those recorded), or changed since it was written."""
    m = manifest_path(output)
    if not Path(output).exists() or not m.exists():
        return "not made yet"
    try:
        manifest = read_json(m)
    except (OSError, ValueError):
        return f"its manifest {m.name} is unreadable"
    old = manifest.get("key") or {}
    if old != key:
        changed = sorted(k for k in old.keys() | key.keys() if old.get(k) != key.get(k))
        before = manifest.get("settings") or {}
        if settings and before:
            keys = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
            if keys:
                shown = ", ".join(f"{k} {before.get(k)!r} -> {settings.get(k)!r}" for k in keys[:5])
                changed = [c for c in changed if c != "config"] + [shown + (", ..." if len(keys) > 5 else "")]
        return f"its inputs or config changed ({', '.join(changed)})"
    if "content" in manifest:  # manifests written before contents were recorded are trusted
        now = content_record(output)
        if now != manifest["content"]:
            bad = sorted(k for k in now.keys() | manifest["content"].keys() if now.get(k) != manifest["content"].get(k))
            return f"its files changed since they were written ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    return ""


def is_done(output: Path, key: dict[str, Any]) -> bool:
    """True when `output` exists, its manifest records the same inputs and config, and its files
    are what was written."""
    return not why_not_done(output, key)


def mark_done(output: Path, key: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
    # The token changes every time the stage really runs, so stages downstream (whose keys include
    # it through `input_token`) rerun whenever this one did. `settings` only explain a later rerun.
    record = {"key": key, "token": uuid.uuid4().hex, "content": content_record(output)}
    if settings:
        record["settings"] = settings
    write_json(manifest_path(output), record)


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


def same_weights(a: str, b: str) -> bool:
    """True when two local model folders hold the same weights (the same folder, or safetensors
    files of equal names and contents); False for hub ids, which are not read here."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.is_dir() and pb.is_dir()):
        return False
    if pa.resolve() == pb.resolve():
        return True
    fa, fb = sorted(pa.glob("*.safetensors")), sorted(pb.glob("*.safetensors"))
    if not fa or [(f.name, f.stat().st_size) for f in fa] != [(f.name, f.stat().st_size) for f in fb]:
        return False
    return fingerprint(fa) == fingerprint(fb)


class RunLocked(RuntimeError):
    """Another process holds the run folder; the message names it."""


_held: dict[Path, int] = {}  # run folders this process has locked: locking again is a no-op


@contextmanager
def run_lock(run_dir: Path):
    """Holds `<run_dir>/.lock` (an exclusive flock) while the block runs, so that two runs never
    write one folder; raises RunLocked naming the holder (pid, host, start time). The kernel drops
    the lock when its process dies, so a stale lock file is simply taken over."""
    import fcntl
    import socket
    import time

    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunLocked(f"run folder {run_dir} is in use by {holder}; wait for that run to end "
                        f"(or stop it), or pick another run.name") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
    _held[run_dir] = fd
    try:
        yield
    finally:
        del _held[run_dir]
        if created and [p.name for p in run_dir.iterdir()] == [".lock"]:  # a run that stopped before starting
            path.unlink()
            run_dir.rmdir()
        os.close(fd)  # releases the lock
