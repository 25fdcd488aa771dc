"""Run-folder guarantees (tasks/artifacts.py): a stage output is trusted only while its files are
what was written, a run folder has one writer at a time, and policy = reference is recognised."""
import os
import subprocess
import sys

import pytest

from selfalign.tasks import artifacts


def test_a_damaged_output_is_not_taken_for_finished_work(tmp_path):
    out = tmp_path / "scores.parquet"
    artifacts.write_table(out, [{"a": i} for i in range(100)])
    artifacts.mark_done(out, {"config": "x"})
    assert artifacts.is_done(out, {"config": "x"})
    assert "changed (config)" in artifacts.why_not_done(out, {"config": "y"})
    with open(out, "r+b") as f:  # half-truncated, as a full disk or a killed copy leaves it
        f.truncate(out.stat().st_size // 2)
    assert not artifacts.is_done(out, {"config": "x"})
    assert "files changed since they were written (scores.parquet)" in artifacts.why_not_done(out, {"config": "x"})
    assert artifacts.why_not_done(tmp_path / "missing.parquet", {}) == "not made yet"


def test_a_model_folder_without_its_weights_is_not_done(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(artifacts, "HASHED_BYTES", 1024)  # the weights count as a large file: size and mtime
    artifacts.mark_done(model, {"k": 1})
    assert artifacts.is_done(model, {"k": 1})
    (model / "model.safetensors").unlink()
    assert "model.safetensors" in artifacts.why_not_done(model, {"k": 1})


def test_old_manifests_without_contents_are_trusted(tmp_path):
    out = tmp_path / "pairs.parquet"
    artifacts.write_table(out, [{"a": 1}])
    artifacts.write_json(artifacts.manifest_path(out), {"key": {"k": 1}, "token": "t"})
    assert artifacts.is_done(out, {"k": 1})


HOLD = """
import sys, time
from selfalign.tasks.artifacts import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_on_a_folder_stops_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(artifacts.RunLocked, match=f"in use by pid {holder.pid} on "):
            with artifacts.run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file stays, and is taken over
    assert (tmp_path / ".lock").exists()
    with artifacts.run_lock(tmp_path):
        with artifacts.run_lock(tmp_path):  # the same process again: no deadlock
            assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


def test_same_weights(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, data in ((a, b"1234"), (b, b"1234"), (c, b"1235")):
        d.mkdir()
        (d / "model.safetensors").write_bytes(data)
    assert artifacts.same_weights(str(a), str(a)) and artifacts.same_weights(str(a), str(b))
    assert not artifacts.same_weights(str(a), str(c)) and not artifacts.same_weights("org/model", "org/model")
