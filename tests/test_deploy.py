"""Deployments: deploy/prefect.yaml stays equal to the demo preset; `selfalign deploy` pins what a
worker would resolve differently; and (slow) the whole path: server, process worker, deploy, run,
COMPLETED, MLflow runs with their plots, `selfalign compare` over HTTP."""
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from selfalign.flows.config import from_dict, load_config
from selfalign.flows.deploy import ENTRYPOINT, deployment_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "deploy" / "presets" / "demo.yaml"
PATH_KEYS = ["model.policy", "model.reference", "data.prompts", "data.eval_prompts", "data.offline_pairs",
             "data.heldout_pairs"]


def test_prefect_yaml_declares_the_demo_preset(monkeypatch):
    spec = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    [dep] = spec["deployments"]
    assert dep["entrypoint"] == ENTRYPOINT and (ROOT / ENTRYPOINT.split(":")[0]).is_file()
    assert dep["work_pool"]["name"] == "selfalign" and dep["schedules"][0]["cron"]
    monkeypatch.chdir(ROOT)  # a flow run's working directory: the project root
    declared = from_dict(dep["parameters"]["config"]).flat()
    preset = load_config(DEMO).flat()
    for key in PATH_KEYS:
        assert Path(declared.pop(key)).resolve() == Path(preset.pop(key)), key
    declared.pop("run.dir"), preset.pop("run.dir")
    assert declared == preset


def test_deployment_config_pins_run_dir_and_tracking_server(tmp_path, monkeypatch):
    cfg = load_config(DEMO, ["--run.name=nightly"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = deployment_config(cfg, cwd=tmp_path)
    assert d["run"]["dir"] == str(tmp_path / "runs" / "nightly") and d["tracking"]["uri"] == ""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert deployment_config(cfg, cwd=tmp_path)["tracking"]["uri"] == "http://127.0.0.1:5000"
    pinned = load_config(DEMO, ["--tracking.uri=sqlite:////x.db", f"--run.dir={tmp_path / 'r'}"])
    d = deployment_config(pinned, cwd=ROOT)
    assert d["tracking"]["uri"] == "sqlite:////x.db" and d["run"]["dir"] == str(tmp_path / "r")
    assert from_dict(d).flat() == from_dict(deployment_config(pinned)).flat()


def test_deploy_needs_a_server(monkeypatch, capsys):
    from selfalign.flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["deploy", str(DEMO), "--run.rounds=1", "--cron", "0 3 * * *"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err
    assert main(["deploy", str(DEMO), "--env", "NOEQUALS"]) == 2
    assert "--env 'NOEQUALS' must look like KEY=VALUE" in capsys.readouterr().err
    assert main(["deploy", str(DEMO), "--cron", "every night"]) == 2
    assert "Invalid cron string" in capsys.readouterr().err
    assert main(["deploy", str(DEMO), "--cron", "0 3 * * *", "--timezone", "Mars/Base"]) == 2
    assert "'Mars/Base' is not a known time zone" in capsys.readouterr().err


# The smallest run that exercises every stage (tests/test_e2e.py).
SMALL = ["--run.rounds=1", "--data.prompts_per_round=24", "--generate.k=4", "--pairs.min_valid=2",
         "--data.max_eval_prompts=24", "--evaluate.samples=2", "--train.max_steps=3", "--train.batch_size=8",
         "--train.micro_batch_size=4"]


def api(port: int, path: str, body: dict | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def cron_in(seconds: float) -> tuple[str, datetime.datetime]:
    """A daily cron schedule (UTC) whose next firing is the first whole minute at least `seconds` away."""
    at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds + 60)
    at = at.replace(second=0, microsecond=0)
    return f"{at.minute} {at.hour} * * *", at


@pytest.mark.slow
def test_a_cron_schedule_fires_and_the_worker_runs_the_demo_round(tmp_path):
    """The schedule, not a manual run: the server's scheduler creates the run from the cron
    schedule, the process worker picks it up at its time and runs the round to COMPLETED."""
    from test_server import Server, client_env, free_port

    pport, mport = free_port(), free_port()
    srv = Server(tmp_path / "home", pport, mport)
    worker = None
    try:
        srv.wait_for("stops both servers", timeout=300)
        mlflow_uri = f"http://127.0.0.1:{mport}"
        env = client_env(tmp_path, pport) | {"MLFLOW_TRACKING_URI": mlflow_uri, "PREFECT_WORKER_QUERY_SECONDS": "2",
                                             "HF_HUB_OFFLINE": "1"}
        cli = [sys.executable, "-m", "selfalign.flows.cli"]
        t0 = time.time()
        cron, fires_at = cron_in(90)
        dep = subprocess.run(cli + ["deploy", str(DEMO), *SMALL, "--run.name=deployed", "--name", "tiny",
                                    "--pool", "test-pool", "--cron", cron],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert dep.returncode == 0, dep.stdout + dep.stderr
        print(f"deploy: {time.time() - t0:.1f}s")
        assert "deployment selfalign-run/tiny" in dep.stdout and f"cron {cron!r}" in dep.stdout

        [d] = api(pport, "/deployments/filter", {"deployments": {"name": {"any_": ["tiny"]}}})
        assert d["work_pool_name"] == "test-pool" and d["schedules"][0]["schedule"]["cron"] == cron
        params = d["parameters"]["config"]
        assert params["run"]["dir"] == str(tmp_path / "runs" / "deployed") and params["tracking"]["uri"] == mlflow_uri
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]

        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "test-pool",
                                   "--type", "process"], cwd=tmp_path, env=env, stdout=open(tmp_path / "worker.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        # The scheduler made the run (no `prefect deployment run`): it is there, SCHEDULED for the cron time.
        t0 = time.time()
        while not (scheduled := api(pport, "/flow_runs/filter", {"deployments": {"id": {"any_": [d["id"]]}}})):
            assert time.time() - t0 < 120, "the scheduler created no run from the cron schedule"
            time.sleep(2)
        first = min(scheduled, key=lambda fr: fr["expected_start_time"])
        assert first["auto_scheduled"] and first["state_type"] == "SCHEDULED"
        assert datetime.datetime.fromisoformat(first["expected_start_time"]) == fires_at
        flow_run_id = first["id"]

        t0 = time.time()
        while True:
            fr = api(pport, f"/flow_runs/{flow_run_id}")
            if fr["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.time() - t0 < 1500, f"still {fr['state_type']}; worker log:\n" + (tmp_path / "worker.log").read_text()[-5000:]
            time.sleep(3)
        print(f"flow run: {time.time() - t0:.1f}s until {fr['state_type']}")
        assert fr["state_type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-8000:]
        subflows = api(pport, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}})
        assert [s["name"] for s in subflows] == ["deployed-round-1"] and subflows[0]["state_type"] == "COMPLETED"
        assert (tmp_path / "runs" / "deployed" / "round_1" / "model" / "config.json").is_file()

        from mlflow.tracking import MlflowClient

        client = MlflowClient(mlflow_uri)
        exp = client.get_experiment_by_name("selfalign")
        runs = client.search_runs([exp.experiment_id])
        [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        [child] = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert parent.info.run_name == "deployed" and child.info.run_name == "round_1"
        assert parent.info.status == child.info.status == "FINISHED"
        assert "eval/preferred_rate" in child.data.metrics and "loss" in child.data.metrics
        plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        assert plots == {f"plots/{n}.png" for n in ("reward_margins", "lengths", "alpha_sweep", "rounds")}
        assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {"plots/rounds.png"}

        cmp = subprocess.run(cli + ["compare", "deployed", "--uri", mlflow_uri], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert cmp.returncode == 0, cmp.stderr
        table = cmp.stdout.splitlines()
        assert parent.info.run_id in table[0] and [line.split()[0] for line in table[2:]] == ["0", "1"]
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(60)
        except subprocess.TimeoutExpired:
            srv.kill()
