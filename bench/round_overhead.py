"""One demo round end to end through the real CLI, its wall time split by stage, and the share spent
outside the stages' own work (Prefect, MLflow, process start, flow bookkeeping).

Runs `selfalign run deploy/presets/demo.yaml --run.rounds=1` with small settings (those of
tests/test_e2e.py; extra `--section.key=value` arguments are passed on) in a fresh run directory,
timing the CLI process from outside. A one-round run is round 0 (evaluate pi_0; its vLLM engine also
draws round 1's samples) and round 1 (generate, score, pairs, train, evaluate). Stage seconds come
from what the stages write into the run directory:

  evaluate   round_<r>/evaluate.stats.json  eval/seconds (vLLM worker, engine start included)
  generate   round_1/generate.stats.json    generate/seconds, counted only when the stage ran (it is
             skipped when round 0's evaluation engine already drew the samples: no double count)
  score      round_1/score.stats.json       score/seconds
  pairs      round_1/pairs.stats.json       pairs/seconds
  train      the stage's own line "train: N steps in X s" (worker process start, DeepSpeed, model
             load and save included); round_1/train.steps.json gives the optimiser loop alone

Outside = CLI wall - sum of the stages. It is split by the CLI's log timestamps into: before the
flow (interpreter and imports, Prefect's temporary server), inside the flow but outside the stages
(Prefect task/flow runs, MLflow runs and metrics, plots, data loading), after the flow.
Last line: JSON with ours = the outside share in %, baseline = the 10% goal, ratio = goal / ours
(> 1: within the goal).

    .venv/bin/python bench/round_overhead.py
    .venv/bin/python bench/round_overhead.py --data.prompts_per_round=96    # more work per round
    .venv/bin/python bench/round_overhead.py --full     # the demo preset's own sizes (384 prompts x 8)
    .venv/bin/python bench/round_overhead.py --prefect-server   # against a Prefect server already running
                                                                # (a deployment's case), started before the clock
    .venv/bin/python bench/round_overhead.py --existing-home    # a home whose Prefect database exists (a
                                                                # user's later runs); made before the clock

A new home's temporary server copies the empty database that the first new home on the machine saved
(flows/server.py, database_template); the header and the JSON say which it had ("prefect_database":
existing, template, or migrated for a machine's first run).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--run.rounds=1", "--data.prompts_per_round=24", "--generate.k=4", "--pairs.min_valid=2",
         "--data.max_eval_prompts=24", "--evaluate.samples=2", "--train.max_steps=3", "--train.batch_size=8",
         "--train.micro_batch_size=4"]
GOAL = 10.0
_STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \|")


def _stamps(log: str, day: dt.date) -> list[tuple[float, str]]:
    out = []
    for line in log.splitlines():
        m = _STAMP.match(line)
        if m:
            h, mi, s, ms = (int(x) for x in m.groups())
            t = dt.datetime.combine(day, dt.time(h, mi, s, ms * 1000)).timestamp()
            out.append((t, line))
    return out


def _first(stamps, needle: str) -> float:
    return next(t for t, line in stamps if needle in line)


def _last(stamps, needle: str) -> float:
    return [t for t, line in stamps if needle in line][-1]


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


@contextlib.contextmanager
def running_prefect(home: Path, wanted: bool):
    """A Prefect server started (and healthy) before the timed run, as a deployment has one; its
    API URL, or None when not wanted."""
    if not wanted:
        yield None
        return
    from selfalign.flows.server import services

    port = common.free_port()
    prefect = services(home, "127.0.0.1", port, common.free_port())[0]
    prefect.start()
    try:
        deadline = time.time() + 180
        while not prefect.healthy():
            if not prefect.alive() or time.time() > deadline:
                raise SystemExit(f"the Prefect server did not start:\n{prefect.log_tail()}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        prefect.stop()


def main() -> None:
    extra = sys.argv[1:]
    if any(a in ("-h", "--help") for a in extra):
        print(__doc__)
        return
    small = SMALL
    if "--full" in extra:  # the demo preset's own sizes, one round
        extra.remove("--full")
        small = ["--run.rounds=1"]
    with_server = "--prefect-server" in extra
    if with_server:
        extra.remove("--prefect-server")
    existing_home = "--existing-home" in extra
    if existing_home:
        extra.remove("--existing-home")
    with tempfile.TemporaryDirectory() as tmp, running_prefect(Path(tmp) / "server", with_server) as api:
        tmp = Path(tmp)
        run = tmp / "run"
        env = dict(os.environ, SELFALIGN_HOME=str(tmp / "home"), HF_HUB_OFFLINE="1")
        if api:
            env["PREFECT_API_URL"] = api
        if existing_home:  # the database a first run would have created, made by the same server
            from selfalign.flows.server import TemporaryPrefect

            first = TemporaryPrefect(tmp / "home" / "prefect")
            first.start()
            first.wait()
            first.stop()
        # How the temporary server gets its database: the home's own, a copy of the migrated template
        # (flows/server.database_template, saved by the first new home on this machine), or migrated.
        from selfalign.flows.server import database_template

        database = ("existing" if existing_home else "template" if database_template().is_file() else "migrated")
        cmd = [sys.executable, "-m", "selfalign.flows.cli", "run", str(ROOT / "deploy" / "presets" / "demo.yaml"),
               *small, f"--run.dir={run}", *extra]
        print(f"# round_overhead: {' '.join(['selfalign run deploy/presets/demo.yaml', *small, *extra])}"
              f"{' against a running Prefect server' if api else ''}{' in an existing home' if existing_home else ''}"
              f"{'' if api else f'; Prefect database: {database}'}; load average {common.load_average():.1f}",
              flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        t1 = time.time()
        if proc.returncode != 0:
            raise SystemExit(f"the run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        log = proc.stdout + "\n" + proc.stderr
        r0, r1 = run / "round_0", run / "round_1"
        stamps = _stamps(log, dt.date.fromtimestamp(t0))
        gen_skipped = "samples.parquet: up to date, skipped" in log
        m = re.search(r"train: \d+ steps in ([\d.]+)s", log)
        steps = _read(r1 / "train.steps.json").get("steps", [])
        stages = {
            "evaluate r0 (+ round 1 samples)": _read(r0 / "evaluate.stats.json")["eval/seconds"],
            "generate r1": 0.0 if gen_skipped else _read(r1 / "generate.stats.json")["generate/seconds"],
            "score r1": _read(r1 / "score.stats.json")["score/seconds"],
            "pairs r1": _read(r1 / "pairs.stats.json")["pairs/seconds"],
            "train r1": float(m.group(1)) if m else steps[-1]["seconds"],
            "evaluate r1": _read(r1 / "evaluate.stats.json")["eval/seconds"],
        }
        rounds = {r["round"]: r.get("round/seconds") for r in _read(run / "summary.json").get("rounds", [])}

    total = t1 - t0
    staged = sum(stages.values())
    outside = total - staged
    flow_begin = _first(stamps, "Beginning flow run")
    flow_end = _last(stamps, "Finished in state")
    phases = {"before the flow (imports, Prefect server start)": flow_begin - t0,
              "in the flow, outside the stages": (flow_end - flow_begin) - staged,
              "after the flow": t1 - flow_end}
    print(f"  CLI wall {total:7.1f} s   (round 0 {rounds.get(0, float('nan')):.1f} s, round 1 "
          f"{rounds.get(1, float('nan')):.1f} s by the CLI's per-round seconds)")
    for name, s in stages.items():
        print(f"  {name:42s} {s:7.1f} s  {100 * s / total:5.1f}%")
    if steps:
        print(f"  {'(train: optimiser loop alone)':42s} {steps[-1]['seconds']:7.1f} s")
    print(f"  {'outside the stages':42s} {outside:7.1f} s  {100 * outside / total:5.1f}%")
    for name, s in phases.items():
        print(f"    {name:40s} {s:7.1f} s")
    share = 100 * outside / total
    common.emit("round_overhead", share, GOAL, "% of round wall outside the stages", ratio=GOAL / share,
                ratio_is="goal / ours (> 1: within the goal)", total_s=round(total, 1), outside_s=round(outside, 1),
                stages_s={k: round(v, 1) for k, v in stages.items()},
                phases_s={k: round(v, 1) for k, v in phases.items()}, overrides=small + extra,
                prefect_server="running" if with_server else "temporary", existing_home=existing_home,
                prefect_database=None if with_server else database,
                load_average=round(common.load_average(), 1))


if __name__ == "__main__":
    main()
