#!/usr/bin/env bash
# The tests. Sets up .venv on first use. Default: everything except `slow` and `gpu`; pass
# `--all` for the whole suite (slow end-to-end runs included; gpu tests skip without CUDA), or any
# pytest arguments. Test files run in SELFALIGN_TEST_WORKERS (default 2) processes, a file per
# process so that its module fixtures run once; the end-to-end tests spend much of their time
# waiting on servers, schedules and subprocess start-up, so two overlap well even on two cores.
# SELFALIGN_TEST_WORKERS=0 runs everything in one process.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
workers="${SELFALIGN_TEST_WORKERS:-2}"
par=()
[ "$workers" = 0 ] || par=(-n "$workers" --dist loadfile)
if [ "${1:-}" = "--all" ]; then
  shift
  exec .venv/bin/pytest -m "slow or not slow" "${par[@]}" "$@"
fi
exec .venv/bin/pytest -m "not slow" "${par[@]}" "$@"
