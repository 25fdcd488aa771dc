"""Scheduled continual bootstrapping as a user sets it up: `selfalign server`, `selfalign deploy` of the
demo with a `continual` chain and a cron schedule, and a process worker. The scheduler creates two
runs on its own; they run one after the other; the second starts from the model the first promoted
to @champion, on prompts the first did not use. Both runs are linked both ways (MLflow tags with the
Prefect flow run, a Prefect artifact with the MLflow run), and (with Chromium) both UIs show the
scheduled runs and the round's pairs as a table. Screenshots go to $SELFALIGN_TEST_ARTIFACTS."""
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_deploy import DEMO, ROOT, SMALL, api
from test_server import Server, client_env, free_port
from test_ui import CHROMIUM, Browser

pytestmark = pytest.mark.slow

CHAIN = ["--run.name=chain", "--continual.alias=champion", "--continual.margin=-1", "--tracking.log_model=artifact",
         "--tracking.registered_model_name=chain", "--data.prompts_per_round=16"]
DONE = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def two_firings(lead: float) -> tuple[str, list[datetime.datetime]]:
    """A daily cron schedule (UTC) firing at two consecutive minutes, the first at least `lead` seconds
    away, both in the same hour (so one cron line names both)."""
    at = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=lead + 60)).replace(second=0,
                                                                                                     microsecond=0)
    if at.minute == 59:
        at += datetime.timedelta(minutes=1)
    return f"{at.minute},{at.minute + 1} {at.hour} * * *", [at, at + datetime.timedelta(minutes=1)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Server, deployment and worker; yields once both scheduled runs have ended."""
    tmp = tmp_path_factory.mktemp("schedule")
    pport, mport = free_port(), free_port()
    srv = Server(tmp / "home", pport, mport)
    worker = None
    try:
        srv.wait_for("stops both servers", timeout=300)
        mlflow_uri = f"http://127.0.0.1:{mport}"
        env = client_env(tmp, pport) | {"MLFLOW_TRACKING_URI": mlflow_uri, "PREFECT_WORKER_QUERY_SECONDS": "2",
                                        "HF_HUB_OFFLINE": "1"}
        cron, firings = two_firings(90)
        dep = subprocess.run([sys.executable, "-m", "selfalign.flows.cli", "deploy", str(DEMO), *SMALL, *CHAIN,
                              "--name", "nightly", "--pool", "test-pool", "--cron", cron],
                             cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
        assert dep.returncode == 0, dep.stdout + dep.stderr
        assert "one run at a time" in dep.stdout
        [d] = api(pport, "/deployments/filter", {"deployments": {"name": {"any_": ["nightly"]}}})
        # what a worker elsewhere would resolve differently is pinned: the run folder, the MLflow server
        assert d["work_pool_name"] == "test-pool" and d["schedules"][0]["schedule"]["cron"] == cron
        params = d["parameters"]["config"]
        assert params["run"]["dir"] == str(tmp / "runs" / "chain") and params["tracking"]["uri"] == mlflow_uri
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert d["global_concurrency_limit"]["limit"] == 1 and d["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "test-pool",
                                   "--type", "process"], cwd=tmp, env=env, stdout=open(tmp / "worker.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        log = lambda: (tmp / "worker.log").read_text()[-8000:]
        t0 = time.time()
        made: list = []
        while True:
            try:
                made = sorted(api(pport, "/flow_runs/filter", {"deployments": {"id": {"any_": [d["id"]]}}}),
                              key=lambda fr: fr["expected_start_time"])[:2]
            except OSError:  # timed out (its SQLite busy with a run's writes, the machine loaded): ask again
                pass
            else:
                if len(made) == 2 and all(fr["state_type"] in DONE for fr in made):
                    break
            assert time.time() - t0 < 2400, f"{[(fr['name'], fr['state_type']) for fr in made]}; worker log:\n{log()}"
            time.sleep(5)
        yield {"tmp": tmp, "deployment": d, "runs": made, "firings": firings, "pport": pport, "mlflow": mlflow_uri,
               "log": log()}
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


def test_two_scheduled_runs_form_a_chain(chain):
    from mlflow.tracking import MlflowClient

    first, second = chain["runs"]
    assert [fr["state_type"] for fr in (first, second)] == ["COMPLETED", "COMPLETED"], chain["log"]
    # the scheduler made both (no manual run), at the cron's times
    assert first["auto_scheduled"] and second["auto_scheduled"]
    assert [datetime.datetime.fromisoformat(fr["expected_start_time"]) for fr in (first, second)] == chain["firings"]
    # one at a time: the second started after the first had ended
    first, second = (api(chain["pport"], f"/flow_runs/{fr['id']}") for fr in (first, second))
    assert datetime.datetime.fromisoformat(second["start_time"]) >= datetime.datetime.fromisoformat(first["end_time"])
    for fr in (first, second):
        subflows = api(chain["pport"], "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [fr["id"]]}}})
        assert [s["name"] for s in subflows] == ["chain-round-1"] and subflows[0]["state_type"] == "COMPLETED"

    folders = sorted(p for p in (chain["tmp"] / "runs" / "chain").iterdir() if (p / "continual.json").is_file())
    assert len(folders) == 2  # each run in a fresh folder
    one, two = ([json.loads((f / name).read_text()) for name in ("continual.json", "continual_decision.json")]
                for f in folders)
    assert one[0]["version"] is None and one[1]["promoted"]  # the first starts from the preset's model
    assert two[0]["version"] == one[1]["version"] and two[1]["from_version"] == one[1]["version"]
    client = MlflowClient(chain["mlflow"])
    promoted = client.get_model_version(name="chain", version=one[1]["version"])
    assert two[0]["model"] == promoted.tags["selfalign.model_dir"]
    used_first = set(json.loads((folders[0] / "used_prompts.json").read_text()))
    assert len(used_first) == 16 and set(two[0]["excluded_prompts"]) == used_first

    # linked both ways: each MLflow parent run names its Prefect flow run, each flow run's artifact the MLflow run
    exp = client.get_experiment_by_name("selfalign")
    parents = client.search_runs([exp.experiment_id], "tags.`continual.decision` = 'promoted'")
    by_flow_run = {r.data.tags["prefect.flow_run_id"]: r for r in parents}
    assert set(by_flow_run) == {first["id"], second["id"]}
    for fr in (first, second):
        run = by_flow_run[fr["id"]]
        url = run.data.tags["prefect.flow_run_url"]
        assert url.startswith(f"http://127.0.0.1:{chain['pport']}/") and url.endswith(f"/flow-run/{fr['id']}")
        [artifact] = api(chain["pport"], "/artifacts/filter", {"artifacts": {"key": {"any_": ["round-table"]}},
                                                                 "flow_runs": {"id": {"any_": [fr["id"]]}}})
        assert f"/runs/{run.info.run_id}" in artifact["data"]
        rounds = [r for r in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")]
        assert {r.info.run_name for r in rounds} == {"round_1"}
        tables = {a.path for a in client.list_artifacts(rounds[0].info.run_id, "tables")}
        assert {"tables/pairs.json", "tables/samples.json", "tables/eval_answers.json"} <= tables
        plots = {a.path for a in client.list_artifacts(rounds[0].info.run_id, "plots")}
        assert plots == {f"plots/{n}.png" for n in ("reward_margins", "lengths", "alpha_sweep", "rounds")}
        assert "eval/preferred_rate" in rounds[0].data.metrics and "loss" in rounds[0].data.metrics

    # `selfalign compare` over HTTP: the latest run of the name, round 0 (the champion) and round 1
    cmp = subprocess.run([sys.executable, "-m", "selfalign.flows.cli", "compare", "chain", "--uri", chain["mlflow"]],
                         cwd=chain["tmp"], env=client_env(chain["tmp"], chain["pport"]), capture_output=True, text=True,
                         timeout=120)
    assert cmp.returncode == 0, cmp.stderr
    table = cmp.stdout.splitlines()
    assert by_flow_run[second["id"]].info.run_id in table[0] and [line.split()[0] for line in table[2:]] == ["0", "1"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_both_uis_show_the_scheduled_runs_and_the_pairs_table(chain, tmp_path):
    from mlflow.tracking import MlflowClient

    shots = Path(os.environ.get("SELFALIGN_TEST_ARTIFACTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    first, second = chain["runs"]
    browser = Browser(tmp_path / "profile")
    try:
        browser.goto(f"http://127.0.0.1:{chain['pport']}/deployments/deployment/{chain['deployment']['id']}")
        browser.wait_text(["nightly", first["name"], second["name"]], timeout=120)
        browser.screenshot(shots / "prefect_scheduled_runs.png")

        client = MlflowClient(chain["mlflow"])
        exp = client.get_experiment_by_name("selfalign")
        [parent] = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{second['id']}'")
        [round_1] = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        pairs = json.loads(Path(client.download_artifacts(round_1.info.run_id, "tables/pairs.json", str(tmp_path))).read_text())
        assert "mlflow.loggedArtifacts" in round_1.data.tags  # what makes the UI show the file as a table
        prompt = str(pairs["data"][0][pairs["columns"].index("prompt")])[:30]
        url = f"{chain['mlflow']}/#/experiments/{exp.experiment_id}/runs/{round_1.info.run_id}/artifacts/tables/pairs.json"
        browser.goto(url)
        # the artifact view renders the table: its column headers and the first pair's prompt
        browser.wait_text(["chosen", "rejected", "chosen_len", prompt], timeout=120)
        browser.screenshot(shots / "mlflow_pairs_table.png")
        assert browser.js("document.querySelectorAll('table th, [role=columnheader]').length") >= 4
        browser.goto(f"{chain['mlflow']}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}")
        browser.wait_text(["prefect.flow_run_url", "continual.decision"], timeout=120)
        browser.screenshot(shots / "mlflow_chain_run.png")
        # the MLflow run's link opens its flow run in the Prefect UI, with the run's round sub-flow
        browser.goto(parent.data.tags["prefect.flow_run_url"])
        browser.wait_text([second["name"], "Completed"], timeout=120)
    finally:
        browser.close()
