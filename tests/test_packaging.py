"""Packaging and lint: Hugging Face ships a package named `kernels` that transformers probes for and
imports, so ours must never be importable under that name (the layout note in pyproject.toml); the
code passes the configured ruff checks, and kernels/ passes mypy."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_folder_is_not_a_top_level_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert not (ROOT / "tests" / "__init__.py").exists()


def test_nothing_of_ours_imports_as_top_level_kernels(tmp_path):
    # Installed: outside the repository nothing answers to `kernels`.
    out = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels'))"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None"
    # From the repository root (sys.path[0], as for Prefect deployments and `python -m`), the bare
    # folder is at most an empty namespace: transformers' probe must not take it for Hugging Face's
    # package, and none of our modules may load under the name `kernels`.
    code = ("import sys, selfalign.kernels.losses, transformers.utils.import_utils as u;"
            "print(u.is_kernels_available(), sorted(m for m in sys.modules if m.split('.')[0] == 'kernels' and m != 'kernels'),"
            "getattr(sys.modules.get('kernels'), '__file__', None))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False [] None"


def test_namespace_imports():
    for mod in ("selfalign.kernels.losses", "selfalign.kernels.pairs", "selfalign.tasks.score", "selfalign.flows.config"):
        assert importlib.util.find_spec(mod) is not None


def test_the_code_passes_ruff():
    """The lint configured in pyproject.toml ([tool.ruff]) is clean."""
    ruff = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(ruff), "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_the_kernels_pass_mypy():
    """The math modules type-check under the mypy settings of pyproject.toml ([tool.mypy])."""
    mypy = Path(sys.executable).with_name("mypy")
    proc = subprocess.run([str(mypy)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
