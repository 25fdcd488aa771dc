#!/usr/bin/env bash
# The tests. Sets up .venv on first use. Default: everything except `slow` and `gpu`; pass
# `--all` for the whole suite (slow end-to-end runs included; gpu tests skip without CUDA), or any
# pytest arguments.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
if [ "${1:-}" = "--all" ]; then
  shift
  exec .venv/bin/pytest -m "slow or not slow" "$@"
fi
exec .venv/bin/pytest -m "not slow" "$@"
