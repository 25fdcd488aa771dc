#!/usr/bin/env bash
# One command for a GPU machine that has torch but no package index and no vLLM: the gpu tests, the
# training / scoring / log-prob memory benchmarks, and the training MFU of a ~1B-parameter Llama DPO
# step against the matmul peak it measures first. Every result goes to one file, a JSON line per
# step (with the device named): $OUT/gpu.jsonl if OUT is set, else bench/results/gpu.jsonl.
# Each step has its own time limit, so the whole takes under 8 minutes; a step whose module is
# missing on the machine (TRL, say) is recorded as skipped, not failed.
#
#   bash bench/gpu.sh              # on the GPU machine, from the project root
#   bash bench/gpu.sh --dry-run    # the same steps at smoke sizes on the CPU (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
out="${OUT:-bench/results}"
mkdir -p "$out"
results="$out/gpu.jsonl"
: > "$results"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
# Without a package index the project is installed from this folder alone, without its dependencies.
if ! "$py" -c "import selfalign.flows" 2>/dev/null; then
  "$py" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "gpu.sh: could not install selfalign" >&2
fi
device=$("$py" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
echo "gpu.sh: device $device, results in $results" >&2

# record NAME RC LOG: the last JSON line of LOG, or a line saying how the step ended.
record() {
  "$py" - "$1" "$2" "$3" "$device" "$results" <<'EOF'
import json, sys
name, rc, log, device, results = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
lines = open(log, errors="replace").read().splitlines()
row = None
for line in reversed(lines):
    if line.startswith("{"):
        try:
            row = json.loads(line)
            break
        except ValueError:
            pass
missing = next((l.split("No module named ")[1].strip("'\"") for l in lines if "No module named " in l), "")
if row is None:
    status = "skipped" if missing else "done" if rc == 0 else "timeout" if rc == 124 else "failed"
    row = {"bench": name, "status": status,
           "why": f"module {missing} is not installed" if missing else "\n".join(lines[-5:])}
row.update({"step": name, "rc": rc, "device": device})
with open(results, "a") as f:
    f.write(json.dumps(row) + "\n")
print(f"  {name}: rc {rc}, {row.get('status') or ('ratio ' + str(row['ratio']) if 'ratio' in row else 'mfu ' + str(row.get('mfu')))}",
      file=sys.stderr)
EOF
}

# step NAME SECONDS COMMAND...: runs it with a time limit, its output in $out/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  record "$name" $? "$out/$name.log"
}

if [ $dry = 1 ]; then
  quick=(--quick --device cpu)
  step gpu-tests 300 "$py" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
else
  quick=()
  step gpu-tests 150 "$py" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
fi
# pytest's summary line, as JSON, so the results file holds it too
"$py" - "$out/gpu-tests.log" "$results" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1], errors="replace").read().splitlines() if " in " in l and ("passed" in l or "skipped" in l or "failed" in l)]
rows = [json.loads(l) for l in open(sys.argv[2])]
rows[-1]["summary"] = lines[-1].strip("= ") if lines else ""
open(sys.argv[2], "w").write("".join(json.dumps(r) + "\n" for r in rows))
EOF
step train_vs_trl 120 "$py" bench/train_vs_trl.py "${quick[@]}"
step score_vs_hf 90 "$py" bench/score_vs_hf.py "${quick[@]}"
step logps_memory 60 "$py" bench/logps_memory.py ${quick:+--device cpu --tokens 512 --vocabs 1000}
step mfu 120 "$py" bench/mfu.py "${quick[@]}"
echo "gpu.sh: done; $(wc -l < "$results") results in $results" >&2
