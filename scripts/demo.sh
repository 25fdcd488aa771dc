#!/usr/bin/env bash
# The demo: multi-round DICE on the embedded default (deploy/presets/demo.yaml), on CPU or GPU.
# Sets up .venv on first use. Extra arguments are config overrides, e.g. --run.rounds=2.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/selfalign run deploy/presets/demo.yaml "$@"
