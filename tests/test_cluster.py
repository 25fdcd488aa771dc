"""Generation and scoring workers on a Ray cluster (tasks/cluster.py): the config section, how jobs
are prepared and dealt, what a worker does on its node (skips shards already written, names a node
that does not see the run folder), and, slow, the demo through the CLI on a 2-node Ray cluster of
this machine, one node killed mid-stage: the tables of one local worker, bit for bit."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfalign.flows.config import ConfigError, load_config
from selfalign.tasks import artifacts, cluster, generate
from selfalign.tasks.cluster_config import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model.policy": "pi0", "model.reference": "sft", "data.prompts": "p", "data.eval_prompts": "e",
        "data.offline_pairs": "o", "generate.k": 2, "pairs.min_valid": 2, "generate.shard_size": 2}


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["", "auto", "127.0.0.1:6379", "head-0.cluster.local:6379", "ray://10.0.0.5:10001",
                                     "[fd00::5]:6379"])
def test_cluster_addresses_that_load(address):
    assert load_config(None, BASE | {"cluster.address": address}).cluster.address == address


@pytest.mark.parametrize("key, value, message", [
    ("address", "head-0", "cluster.address: 'head-0' must be empty, auto, host:port or ray://host:port"),
    ("address", "head-0:0", "cluster.address: 'head-0:0' must be"),
    ("address", "head-0:70000", "cluster.address: 'head-0:70000' must be"),
    ("address", "http://head-0:8265", "cluster.address: 'http://head-0:8265' must be"),
    ("cpus_per_worker", 0, "cluster.cpus_per_worker: 0 must be >= 1"),
    ("max_retries", -1, "cluster.max_retries: -1 must be >= 0"),
])
def test_bad_cluster_values_are_named(key, value, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE | {f"cluster.{key}": value})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_no_cluster_key_no_cluster():
    assert load_config(None, BASE).cluster == ClusterConfig()


# --- dealing and preparing jobs -----------------------------------------------------------------

def _job(tmp_path: Path, n_runs: int) -> dict:
    prompts = [{"id": f"p{i}", "prompt": f"{i}?", "ids": [i]} for i in range(2 * n_runs)]
    runs = [{"output": os.path.relpath(artifacts.shard_path(tmp_path / "samples.parquet", i)), "first": 2 * i, "count": 2,
             "n": 2, "seed": i, "manifest": {"shard": i}} for i in range(n_runs)]
    return {"model": os.path.relpath(tmp_path), "prompts": prompts, "runs": runs, "seed": 1, "threads": 0}


@pytest.mark.parametrize("shards", [1, 2])
def test_every_worker_goes_to_the_cluster_with_absolute_paths(tmp_path, monkeypatch, shards):
    """With cluster.address even one worker is a Ray task (the flow's machine may have no GPU);
    jobs carry absolute paths (Ray workers run in folders of their own) and CPU threads from
    cluster.cpus_per_worker, and no local cores or devices."""
    seen = []
    monkeypatch.setattr(cluster, "run_generate_worker",
                        lambda c, job, path, kv, tp, log=print: seen.append((c, job, path, tp)))
    cfg = load_config(None, BASE | {"cluster.address": "auto", "cluster.cpus_per_worker": 3, "generate.shards": shards,
                                    "generate.tensor_parallel_size": 2})
    generate.run_workers(cfg.generate, _job(tmp_path, 3), tmp_path, lambda m: None, cluster=cfg.cluster)
    assert len(seen) == shards
    dealt = sorted(Path(r["output"]).name for _, job, _, _ in seen for r in job["runs"])
    assert dealt == [f"samples.shard-0000{i}.parquet" for i in range(3)]
    for c, job, path, tp in seen:
        assert c.address == "auto" and tp == 2 and job["threads"] == 3
        assert Path(job["model"]) == tmp_path.resolve() and all(Path(r["output"]).is_absolute() for r in job["runs"])
        assert "cpus" not in job and "devices" not in job


def test_a_worker_drawn_again_skips_the_shards_already_written(tmp_path, monkeypatch):
    """A Ray task retried after its node died draws only the shards its earlier attempt did not
    write with their manifests."""
    job = generate.worker_jobs(_job(tmp_path, 3), 1)[0]
    job = cluster.prepare_generate_job(ClusterConfig(address="auto"), job, 0)
    done = Path(job["runs"][1]["output"])
    artifacts.write_table(done, [{"x": 1}])
    artifacts.mark_done(done, job["runs"][1]["manifest"])
    drawn = []
    monkeypatch.setattr(generate, "run_vllm", lambda j, path, kv, log=print: drawn.append(j) or [])
    monkeypatch.setattr(cluster, "node_name", lambda: "node-a")
    path = artifacts.write_json(tmp_path / "generate_job.worker-0.json", job)
    res = cluster.generate_on_node(str(path), 0.5)
    assert res["drawn"] == ["samples.shard-00000.parquet", "samples.shard-00002.parquet"] and res["skipped"] == 1
    assert [r["seed"] for r in drawn[0]["runs"]] == [0, 2] and drawn[0]["prompts"] == job["prompts"]
    assert json.loads(path.read_text()) == job  # the job stays whole for a later attempt


def test_a_node_that_does_not_see_the_run_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "node_name", lambda: "10.0.0.7 (node 1234abcd)")
    with pytest.raises(cluster.SharedStorageError, match=r"node 10.0.0.7 \(node 1234abcd\) does not see .*missing.json"):
        cluster.generate_on_node(str(tmp_path / "missing.json"), 1.0)
    marker = tmp_path / "marker"
    assert not cluster.answer_marker(marker, "t0k", "n1")
    marker.write_text("other")
    assert not cluster.answer_marker(marker, "t0k", "n1")
    marker.write_text("t0k")
    assert cluster.answer_marker(marker, "t0k", "n1") and (tmp_path / "marker.n1").read_text() == "t0k"
    e = cluster.storage_error("10.0.0.7", "1234abcdef", tmp_path)
    assert str(e) == f"node 10.0.0.7 (node 1234abcd) does not see the run folder {tmp_path}: put it on a filesystem " \
                     "every node mounts at the same path"


# --- a 2-node Ray cluster on this machine -------------------------------------------------------

CLI = [sys.executable, "-m", "selfalign.flows.cli", "run", str(ROOT / "deploy" / "presets" / "demo.yaml")]
SMALL = ["--run.rounds=1", "--data.prompts_per_round=16", "--generate.k=4", "--generate.shard_size=2",
         "--generate.kv_cache_gib=0.25", "--pairs.min_valid=2", "--data.max_eval_prompts=8", "--evaluate.samples=2",
         "--train.max_steps=2", "--train.batch_size=8", "--train.micro_batch_size=4"]
TABLES = ["round_0/eval_greedy.parquet", "round_1/samples.parquet", "round_1/scores.parquet", "round_1/pairs.parquet",
          "round_1/eval_greedy.parquet"]

# Runs inside a network namespace of its own that holds only the loopback interface: Ray binds its
# servers to the node's address, and on Linux it replaces a loopback --node-ip-address with the
# machine's routable one; alone with `lo`, that address is 127.0.0.1. Two `ray start --block` nodes
# of 1 CPU each (so 2 workers take one node each). First a third node D that does not see the run
# folder joins: the run stops at its start; D leaves. Then the CLI on the demo with 2 generation and 2
# scoring workers; once node B's vLLM worker has written a shard, node B is killed (SIGKILL to all its
# processes, as a machine lost) and a node C joins; then the CLI again on the same folder.
CLUSTER = r'''
import json, os, signal, subprocess, sys, time
from pathlib import Path
import psutil
from selfalign.tasks import artifacts

args = json.loads(sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
tmp = Path(args["ray_tmp"])
env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=80000000",
          "--disable-usage-stats"]
ray = str(Path(sys.executable).with_name("ray"))
nodes = {"A": subprocess.Popen([ray, "start", "--head", "--port=0", "--include-dashboard=false", f"--temp-dir={tmp}",
                                *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)}
address_file = tmp / "ray_current_cluster"
while not address_file.exists():
    assert nodes["A"].poll() is None, "the head did not start"
    time.sleep(0.5)
address = address_file.read_text().strip()

def join(name, hide=None):
    cmd = [ray, "start", f"--address={address}", *common]
    if hide:  # a node that does not see the shared folder: an empty tmpfs over it, in a mount namespace of its own
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"',
               hide, *cmd]
    nodes[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def alive():
    import ray as ray_api
    ray_api.init(address=address, log_to_driver=False)
    ids = [n["NodeID"] for n in ray_api.nodes() if n["Alive"]]
    ray_api.shutdown()
    return ids

def wait_alive(n):
    while len(ids := alive()) != n:
        time.sleep(0.5)
    return ids

def tree(name):
    try:
        root = psutil.Process(nodes[name].pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []

listening = set()
def poll_sockets():
    for c in psutil.net_connections("inet"):
        if c.status == psutil.CONN_LISTEN:
            listening.add((c.laddr.ip, c.laddr.port))

def workers(name):
    out = []
    for p in tree(name):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "selfalign.tasks.vllm_worker" in cmd:
            out.append(cmd[-1])
    return out

def run_cli(kill=None, extra=()):
    cli = [a.replace("{address}", address) for a in args["cli"]] + list(extra)
    proc = subprocess.Popen(cli, env=dict(env, **args["env"]), cwd=args["cwd"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, killed = {"A": set(), "B": set()}, None
    import threading
    out = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        poll_sockets()
        for name in seen:
            seen[name] |= set(workers(name))
        if kill and not killed:
            for job in workers(kill):
                runs = json.loads(Path(job).read_text())["runs"]
                if any(artifacts.manifest_path(Path(r["output"])).exists() for r in runs):
                    killed = [Path(r["output"]).name for r in runs]
                    for p in tree(kill):
                        try:
                            p.send_signal(signal.SIGKILL)
                        except psutil.Error:
                            pass
                    nodes[kill].wait()
                    join("C")
                    break
        time.sleep(0.1)
    reader.join()
    return {"rc": proc.returncode, "log": "".join(out), "seen": {k: sorted(v) for k, v in seen.items()}, "killed": killed}

join("B")
try:
    two = wait_alive(2)
    join("D", hide=args["shared"])
    hidden = [n for n in wait_alive(3) if n not in two]
    unshared = run_cli(extra=[f"--run.dir={args['shared']}/unshared"])
    nodes["D"].terminate()
    nodes["D"].wait(120)
    wait_alive(2)
    first = run_cli(kill="B")
    again = run_cli()
    poll_sockets()
finally:
    for name, p in nodes.items():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for name, p in nodes.items():
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            for q in tree(name):
                q.kill()
import socket
print("RESULT " + json.dumps({"unshared": unshared, "hidden": hidden, "first": first, "again": again, "listening": sorted(listening),
                              "interfaces": [n for _, n in socket.if_nameindex()]}))
'''


def _own_network() -> list[str] | None:
    """The command prefix that runs a command in a network namespace of its own (root: unshare -n;
    otherwise inside a user namespace), or None where neither works or `ip` is missing."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return None
    for prefix in (["unshare", "--net"], ["unshare", "--user", "--map-root-user", "--net"]):
        if subprocess.run(prefix + ["ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0:
            return prefix
    return None


@pytest.mark.slow
def test_a_two_node_ray_cluster_writes_the_tables_of_one_worker_and_survives_a_lost_node(tmp_path):
    pytest.importorskip("ray")
    prefix = _own_network()
    if prefix is None:
        pytest.skip("no network namespace of its own here (unshare, ip)")
    env = {"SELFALIGN_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    one = subprocess.run(CLI + SMALL + [f"--run.dir={tmp_path / 'one'}"], cwd=tmp_path, env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=1200)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="sa-ray-")  # short: Ray's socket paths must stay under 108 bytes
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER)
    over = ["--generate.shards=2", "--score.shards=2", "--cluster.address={address}", f"--run.dir={tmp_path / 'ray'}"]
    arg = {"ray_tmp": ray_tmp, "cli": CLI + SMALL + over, "env": env, "cwd": str(tmp_path), "shared": str(tmp_path)}
    try:
        proc = subprocess.run(prefix + [sys.executable, str(script), json.dumps(arg)], capture_output=True, text=True,
                              timeout=2400)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "RESULT " in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    first, again = res["first"], res["again"]
    # a node that does not see the run folder stops the run at its start, named in one line
    bad = [line for line in res["unshared"]["log"].splitlines() if line.startswith("run: config error: ")]
    assert res["unshared"]["rc"] == 2 and len(bad) == 1, res["unshared"]["log"][-3000:]
    assert bad[0].startswith(f"run: config error: cluster.address: node 127.0.0.1 (node {res['hidden'][0][:8]}) "
                             f"does not see the run folder {tmp_path / 'unshared'}: "), bad
    assert first["rc"] == 0, first["log"][-5000:]
    assert again["rc"] == 0, again["log"][-5000:]
    # generation on both nodes, until node B was killed with a shard written
    assert first["seen"]["A"] and first["seen"]["B"] and first["killed"], first["seen"]
    # its task ran again elsewhere and drew only the shards still missing
    assert "already drawn by an earlier attempt" in first["log"], first["log"][-5000:]
    scored = {line.split("(node ", 1)[1][:8] for line in first["log"].splitlines() if ": scored part " in line}
    assert len(scored) == 2, first["log"][-5000:]  # scoring on two nodes (A and C)
    assert "score-worker-1" in first["log"] and "generate-worker-1" in first["log"]
    assert "samples.parquet: up to date, skipped" in again["log"] and "scores.parquet: up to date, skipped" in again["log"]
    # no socket beyond loopback: the namespace holds `lo` only, and every listener is bound to it
    assert res["interfaces"] == ["lo"]
    assert res["listening"] and all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip, _ in res["listening"]), \
        res["listening"]
    for name in TABLES:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
