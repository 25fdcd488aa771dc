"""Deployments: deploy/prefect.yaml stays equal to the demo preset; `selfalign deploy` pins what a
worker would resolve differently and refuses bad input. The whole path (server, a scheduled chain of
runs through a process worker, both UIs) is tests/test_schedule.py."""
import json
import urllib.request
from pathlib import Path

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
