"""Progress of the long stages: vLLM's progress as a few log lines, passed from the worker process
to the stage's log; none in CI."""
import subprocess
import sys

import pytest

from selfalign.tasks import artifacts, generate, procs


def test_progress_lines_every_fifth(capsys, monkeypatch):
    pytest.importorskip("vllm")
    from selfalign.tasks.vllm_worker import progress_bar

    monkeypatch.setenv("TQDM_DISABLE", "1")  # tqdm's own switch does not turn the lines' clock off
    bar = progress_bar("samples")(total=10, desc="Processed prompts", dynamic_ncols=True, postfix="")
    for _ in range(10):
        bar.update(1)
        assert bar.format_dict["elapsed"] > 0  # vLLM divides by it
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(", ")[0] for line in lines] == [
        f"{procs.PROGRESS}vLLM samples: {n}/10 sequences" for n in (2, 4, 6, 8, 10)]
    # the loop that adds requests is wrapped too (an iterable, no total): it passes through silently
    assert list(progress_bar("x")(range(3), desc="Adding requests")) == [0, 1, 2]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", ["CI", "TQDM_DISABLE"])
@pytest.mark.parametrize("value, quiet", [("true", True), ("1", True), ("false", False), (None, False)])
def test_quiet_in_ci_or_without_progress_bars(monkeypatch, name, value, quiet):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    if value is not None:
        monkeypatch.setenv(name, value)
    assert procs.quiet() is quiet


FAKE_WORKER = """
import json, sys
from pathlib import Path
from selfalign.tasks import artifacts
job = json.loads(Path(sys.argv[-1]).read_text())
print("INFO engine noise", flush=True)
print("{p}vLLM samples: 1/2 sequences, 5/s", flush=True)
artifacts.write_table(Path(job["runs"][0]["output"]), [{{"k": 0}}, {{"k": 1}}])
print("more noise", file=sys.stderr, flush=True)
sys.exit(int(job.get("fail", 0)))
"""


@pytest.fixture
def fake_worker(monkeypatch, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER.format(p=procs.PROGRESS))
    real = subprocess.Popen
    monkeypatch.setattr(procs.subprocess, "Popen", lambda cmd, **kw: real([sys.executable, str(script), cmd[-1]], **kw))


def test_run_vllm_passes_progress_on_and_keeps_the_tail(fake_worker, tmp_path):
    logged = []
    job = {"model": "m", "runs": [{"output": str(tmp_path / "s.parquet")}]}
    rows = generate.run_vllm(job, tmp_path / "job.json", 1.0, logged.append)
    assert rows == [[{"k": 0}, {"k": 1}]]
    assert logged[0] == "vLLM samples: 1/2 sequences, 5/s" and logged[1].startswith("vLLM: 2 samples in")
    with pytest.raises(RuntimeError, match="(?s)exit 3.*engine noise.*more noise"):
        generate.run_vllm(job | {"fail": 3}, tmp_path / "job.json", 1.0, logged.append)
    assert artifacts.read_table(tmp_path / "s.parquet") == [{"k": 0}, {"k": 1}]
