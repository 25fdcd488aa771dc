"""Smoke runs of the side-by-side benchmarks at tiny sizes (--quick): they run, both sides agree, and
the last line is the JSON the README quotes. No timings are checked. The scoring, training, memory and
MFU benchmarks run inside bench/gpu.sh's dry run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str, timeout: int = 600) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"bench", "ours", "baseline", "unit", "ratio"} <= set(out)
    assert out["bench"] == name.removesuffix(".py") and out["ours"] > 0 and out["baseline"] > 0
    return out


@pytest.mark.slow
def test_generate_vs_hf_quick():
    out = run_bench("generate_vs_hf.py", "--quick", "--vllm-sampler")
    assert out["tokens_ours"] > 0 and out["tokens_baseline"] > 0 and out["vllm_sampler"] > 0


@pytest.mark.slow
def test_topp_sampling_quick():
    out = run_bench("topp_sampling.py", "--quick")
    assert out["top_p"] == 0.9


@pytest.mark.slow
def test_draw_sampling_quick():
    out = run_bench("draw_sampling.py", "--quick")
    assert out["shapes"] == "8x1000" and out["ours"] > 0 and out["baseline"] > 0


@pytest.mark.slow
def test_gpu_sh_dry_run(tmp_path):
    """bench/gpu.sh --dry-run: every step of the GPU script runs at smoke sizes on the CPU and leaves
    one JSON line in the results file, with the device named."""
    import os

    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=1500, cwd=ROOT, env=dict(os.environ, OUT=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ["gpu-tests", "train_vs_trl", "score_vs_hf", "logps_memory", "mfu"]
    assert all(r["device"] == "cpu" for r in rows)
    assert "skipped" in rows[0]["summary"] and (rows[0]["rc"], rows[0]["status"]) == (0, "done")  # no CUDA here
    for r in rows[1:]:
        assert r["rc"] == 0 or r.get("status") == "skipped", r  # TRL is a bench-only extra
    for r in rows[1:-1]:  # the side-by-side ones
        assert r.get("status") == "skipped" or (r["bench"] == r["step"] and r["ours"] > 0 and r["baseline"] > 0), r
    trl = rows[1]
    assert trl.get("status") == "skipped" or (trl["loss_agree"] and trl["loss_tol"] == 1e-4), trl
    mfu = rows[-1]
    assert mfu["bench"] == "mfu" and 0 < mfu["mfu"] and mfu["peak_tflops"] > 0 and mfu["tokens_per_step"] > 0
