"""Scale-out: generation and scoring on several concurrent workers (generate.shards, score.shards),
mapped as Prefect tasks in the pipeline, give the tables one worker gives, bit for bit; training on
several processes (the local launcher) keeps every rendezvous socket on 127.0.0.1 and trains the
model one process trains; the deepspeed launcher's multi-node command line comes from a hostfile."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from selfalign.flows.config import ConfigError, load_config
from selfalign.tasks import artifacts, generate, lm_logps, procs, score, train, train_nodes

BASE = {"model.policy": "pi0", "model.reference": "sft", "data.prompts": "p", "data.eval_prompts": "e",
        "data.offline_pairs": "o", "generate.k": 2, "pairs.min_valid": 2, "generate.shard_size": 2}
PROMPTS = [{"id": f"p{i}", "prompt": f"What is {i} + 1?"} for i in range(9)]  # 5 shards of 2 (the last 1)
KEY = {"config": "c", "prompts": [p["id"] for p in PROMPTS]}


def fake_rows(job: dict, run: dict) -> list[dict]:
    """What the vLLM worker would write for a run: a function of the run's prompts and seed only."""
    prompts = job["prompts"][run["first"]:run["first"] + run["count"]]
    return [{"prompt_id": p["id"], "prompt": p["prompt"], "k": k, "response": f"{p['id']}/{k}/{run['seed']}",
             "finish_reason": "stop", "n_tokens": 3} for p in prompts for k in range(run["n"])]


@pytest.fixture
def engine(monkeypatch):
    """vLLM jobs faked by their contract (each run's rows and manifest written as it completes);
    records each job; the job drawing `crash_on` (a shard file name) dies; with a `barrier` set, every
    job waits there for the others (a timeout if they do not run concurrently)."""
    state = type("State", (), {"jobs": [], "crash_on": None, "barrier": None, "lock": threading.Lock()})()

    def run_vllm(job, job_path, kv_cache_gib, log=print):
        with state.lock:
            state.jobs.append(job)
        if state.barrier:
            state.barrier.wait()
        for run in job["runs"]:
            if state.crash_on and Path(run["output"]).name == state.crash_on:
                raise RuntimeError("worker killed")
            artifacts.write_table(run["output"], fake_rows(job, run))
            artifacts.mark_done(run["output"], run["manifest"])
        return []

    monkeypatch.setattr(generate, "run_vllm", run_vllm)
    monkeypatch.setattr(generate, "build_job", lambda g, m, model, prompts, runs, seed: {
        "model": model, "prompts": prompts, "runs": runs, "seed": seed})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU: workers get cores, not GPUs
    return state


def _generate(cfg, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    return generate.run_generate(cfg.generate, cfg.model, "pi0", PROMPTS, out, out.parent, 1, KEY, lambda m: None)


def test_generation_workers_draw_disjoint_shards_and_join_the_same_table(engine, tmp_path):
    ref = tmp_path / "one" / "samples.parquet"
    _generate(load_config(None, BASE), ref)
    assert len(engine.jobs) == 1 and len(engine.jobs[0]["runs"]) == 5

    engine.jobs.clear()
    engine.barrier = threading.Barrier(2, timeout=30)  # the two workers run at the same time
    out = tmp_path / "two" / "samples.parquet"
    stats = _generate(load_config(None, BASE | {"generate.shards": 2}), out)
    engine.barrier = None
    jobs = sorted(engine.jobs, key=lambda j: j["runs"][0]["output"])
    assert len(jobs) == 2
    # shards dealt round-robin: worker 0 draws 0, 2, 4 and worker 1 draws 1, 3, each job holding
    # only its own prompts (runs re-based) and the seeds of one worker's run
    names = [[Path(r["output"]).name for r in j["runs"]] for j in jobs]
    assert names == [[f"samples.shard-0000{i}.parquet" for i in (0, 2, 4)],
                     [f"samples.shard-0000{i}.parquet" for i in (1, 3)]]
    assert [p["id"] for p in jobs[0]["prompts"]] == ["p0", "p1", "p4", "p5", "p8"]
    assert [(r["first"], r["count"]) for r in jobs[0]["runs"]] == [(0, 2), (2, 2), (4, 1)]
    assert [r["seed"] for r in jobs[1]["runs"]] == [generate.shard_seed(0, 1, i) for i in (1, 3)]
    if len(os.sched_getaffinity(0)) >= 2:  # each worker pinned to cores of its own
        assert [j["cpus"] for j in jobs] == [r["cpus"] for r in procs.worker_resources(2, 1, "generate.shards")]
    assert out.read_bytes() == ref.read_bytes() and stats["generate/samples"] == 18

    # more workers than shards still to draw: one worker per shard
    engine.jobs.clear()
    _generate(load_config(None, BASE | {"generate.shards": 8}), tmp_path / "eight" / "samples.parquet")
    assert len(engine.jobs) == 5 and all(len(j["runs"]) == 1 for j in engine.jobs)
    assert (tmp_path / "eight" / "samples.parquet").read_bytes() == ref.read_bytes()


def test_a_failed_worker_loses_its_shard_and_the_rerun_deals_only_the_missing_ones(engine, tmp_path):
    ref = tmp_path / "one" / "samples.parquet"
    _generate(load_config(None, BASE), ref)
    cfg = load_config(None, BASE | {"generate.shards": 2})
    out = tmp_path / "two" / "samples.parquet"
    engine.crash_on = "samples.shard-00003.parquet"  # worker 1 dies on its second shard
    with pytest.raises(RuntimeError, match="worker killed"):
        _generate(cfg, out)
    done = [i for i in range(5) if artifacts.is_done(artifacts.shard_path(out, i), KEY | {"shard": i})]
    assert done == [0, 1, 2, 4] and not out.exists()  # the other worker finished all of its shards
    engine.crash_on, engine.jobs[:] = None, []
    _generate(cfg, out)
    assert [[Path(r["output"]).name for r in j["runs"]] for j in engine.jobs] == [["samples.shard-00003.parquet"]]
    assert out.read_bytes() == ref.read_bytes()


def test_worker_counts_are_not_part_of_the_stage_keys():
    one, two = load_config(None, BASE), load_config(None, BASE | {"generate.shards": 2, "score.shards": 3})
    for c in (one, two):
        assert "generate.shards" not in c.generate.keyed() and "score.shards" not in c.score.keyed()
    assert one.generate.keyed() == two.generate.keyed() and one.score.keyed() == two.score.keyed()
    assert one.generate.keyed() != load_config(None, BASE | {"generate.k": 3}).generate.keyed()
    # the engine's thread count is: in bfloat16 it can change a few samples
    assert one.generate.keyed() != load_config(None, BASE | {"generate.threads": 1}).generate.keyed()
    for key in ("generate.shards", "score.shards"):
        with pytest.raises(ConfigError, match=f"{key}: 0 must be >= 1"):
            load_config(None, BASE | {key: 0})


def test_each_worker_gets_gpus_of_its_own(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert procs.worker_resources(2, 2, "generate.shards") == [{"devices": "4,5"}, {"devices": "6,7"}]
    assert procs.worker_resources(4, 1, "score.shards") == [{"devices": d} for d in "4567"]
    with pytest.raises(ValueError, match=r"generate.shards: 3 workers x 2 GPU\(s\) each need 6 GPUs, 4 are visible"):
        procs.worker_resources(3, 2, "generate.shards")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpus = sorted(os.sched_getaffinity(0))
    got = procs.worker_resources(2, 1, "generate.shards")
    if len(cpus) >= 2:  # disjoint cores, all of them used
        assert sorted(c for r in got for c in r["cpus"]) == cpus and not set(got[0]["cpus"]) & set(got[1]["cpus"])


def _sequences(tiny_model, n=40):
    import random

    from selfalign.tasks.data import load_tokenizer

    tok = load_tokenizer(tiny_model)
    rng = random.Random(0)
    vocab = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    return tok, [([rng.choice(vocab) for _ in range(rng.randint(3, 20))], [rng.choice(vocab) for _ in range(rng.randint(1, 40))])
                 for _ in range(n)]


@pytest.mark.parametrize("packing", [True, False])
def test_parts_of_the_batch_plan_merge_into_one_scorers_values(tiny_model, packing):
    tok, seqs = _sequences(tiny_model)
    model = lm_logps.load_model(tiny_model)
    whole = lm_logps.logps_of(model, seqs, tok.pad_token_id, 200, packing=packing)
    parts = [{"policy": lm_logps.logps_of(model, seqs, tok.pad_token_id, 200, packing=packing, part=(w, 3)),
              "ref": [0.0 if v is not None else None for v in
                      lm_logps.logps_of(model, seqs, tok.pad_token_id, 200, packing=packing, part=(w, 3))],
              "extra": []} for w in range(3)]
    assert all(sum(v is not None for v in p["policy"]) > 0 for p in parts)  # every worker has batches
    merged = score.merge_parts(parts)
    assert merged["policy"] == whole  # the same floats: each sequence in the same batch as before
    parts[1]["policy"][parts[1]["policy"].index(next(v for v in parts[1]["policy"] if v is not None))] = None
    with pytest.raises(RuntimeError, match="computed by 0 workers"):
        score.merge_parts(parts)


def _scored_samples(tiny_model, path: Path) -> Path:
    from selfalign.tasks.data import encode_response, load_tokenizer

    tok = load_tokenizer(tiny_model)
    rows = [{"prompt_id": f"p{i}", "prompt": f"What is {i} + 1?", "k": k,
             "response": f"The sum is {i + 1 + k}." * (1 + k), "response_ids": encode_response(tok, f"The sum is {i + 1 + k}." * (1 + k)),
             "finish_reason": "length" if (i, k) == (2, 1) else "stop", "n_tokens": 0}
            for i in range(12) for k in range(3)]
    return artifacts.write_table(path, rows)


HELDOUT = [{"prompt": "What is 3 + 4?", "chosen": "The sum of 3 and 4 is 7.", "rejected": "8"},
           {"prompt": "What is 5 + 5?", "chosen": "10", "rejected": "The sum of 5 and 5 is 11!"}]


@pytest.mark.slow
def test_two_scoring_workers_write_the_scores_of_one(tiny_model, tmp_path):
    """Real worker processes (threads each; no Prefect): the merged table equals the in-process one."""
    samples = _scored_samples(tiny_model, tmp_path / "samples.parquet")
    over = {"model.policy": tiny_model, "model.reference": tiny_model, "score.batch_tokens": 120,
            "train.loss": "mrpo", "train.mrpo.references": tiny_model}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    logged = []
    one, two = load_config(None, BASE | over), load_config(None, BASE | over | {"score.shards": 2})
    refs = one.train.extra_references()
    s1 = score.run_score(one.score, one.model, samples, tiny_model, tiny_model, HELDOUT,
                         tmp_path / "one" / "scores.parquet", lambda m: None, references=refs)
    s2 = score.run_score(two.score, two.model, samples, tiny_model, tiny_model, HELDOUT,
                         tmp_path / "two" / "scores.parquet", logged.append, references=refs)
    assert (tmp_path / "two" / "scores.parquet").read_bytes() == (tmp_path / "one" / "scores.parquet").read_bytes()
    rows = artifacts.read_table(tmp_path / "one" / "scores.parquet")
    assert sum(math.isfinite(r["policy_logp"]) for r in rows) == 35 and all(len(r["mrpo_ref_logps"]) == 1 for r in rows)
    assert s1["eval/pair_accuracy"] == s2["eval/pair_accuracy"] and s2["score/sequences"] == 39
    assert any(m.startswith("[worker 1] score[ref]") for m in logged)
    assert not list((tmp_path / "two").glob("score_part.*"))  # parts removed once merged


FLOW = r'''
import json, sys, threading
from pathlib import Path
from prefect import flow
from prefect.context import TaskRunContext
from selfalign.flows import stages
from selfalign.flows.config import from_dict
from selfalign.tasks import artifacts, generate
from selfalign.tasks.data import encode_response, load_tokenizer

args = json.loads(sys.argv[1])
tok = load_tokenizer(args["model"])
seen = []
n = args["config"]["generate"]["shards"]
together = threading.Barrier(n, timeout=60)  # a timeout unless the n workers run at the same time

def run_vllm(job, job_path, kv_cache_gib, log=print):
    ctx = TaskRunContext.get()
    seen.append({"task": ctx.task_run.name, "shards": [Path(r["output"]).name for r in job["runs"]]})
    together.wait()
    for run in job["runs"]:
        ps = job["prompts"][run["first"]:run["first"] + run["count"]]
        rows = [{"prompt_id": p["id"], "prompt": p["prompt"], "k": k, "response": f"{p['id']} {k} {run['seed'] % 97}",
                 "response_ids": encode_response(tok, f"{p['id']} {k} {run['seed'] % 97}"), "finish_reason": "stop",
                 "n_tokens": 3, "special_tokens": 0} for p in ps for k in range(run["n"])]
        artifacts.write_table(run["output"], rows)
        artifacts.mark_done(run["output"], run["manifest"])
    return []

stages.run_vllm = generate.run_vllm = run_vllm
generate.build_job = lambda g, m, model, prompts, runs, seed: {"model": model, "prompts": prompts, "runs": runs, "seed": seed}

@flow
def stage_flow(config: dict) -> list:
    cfg = from_dict(config)
    samples, _ = stages.generate_task(cfg, 1, args["model"], args["prompts"])
    scores, _ = stages.score_task(cfg, 1, samples, args["model"], args["model"], [])
    return [str(samples), str(scores)]

print("RESULT " + json.dumps({"paths": stage_flow(args["config"]), "seen": seen}))
'''


def _prefect_env(tmp_path: Path) -> dict:
    """No Prefect server configured: the flow starts its own temporary one, stores under tmp_path."""
    home = tmp_path / "prefect"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return dict(env, PREFECT_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
                PREFECT_MEMO_STORE_PATH=str(home / "memo"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", CUDA_VISIBLE_DEVICES="",
                HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")


@pytest.mark.slow
def test_the_pipeline_maps_worker_tasks_and_joins_the_same_tables(tiny_model, tmp_path):
    """generate_task and score_task in a flow with no Prefect server configured (the flow's own
    temporary one): the workers are mapped task runs, run concurrently, and samples and scores equal
    one worker's."""
    script = tmp_path / "flow.py"
    script.write_text(FLOW)
    prompts = PROMPTS[:5]
    results = {}
    for n in (1, 2):
        cfg = load_config(None, BASE | {"model.policy": tiny_model, "model.reference": tiny_model,
                                        "run.dir": str(tmp_path / f"run{n}"), "generate.shards": n,
                                        "score.shards": n, "score.batch_tokens": 64})
        arg = json.dumps({"config": cfg.to_dict(), "model": tiny_model, "prompts": prompts})
        proc = subprocess.run([sys.executable, str(script), arg], env=_prefect_env(tmp_path), capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[n] = json.loads(proc.stdout.split("RESULT ", 1)[1])
        log = proc.stdout + proc.stderr
        if n == 2:
            assert "score-worker-0" in log and "score-worker-1" in log
    assert sorted(s["task"] for s in results[2]["seen"]) == ["generate-worker-0", "generate-worker-1"]
    assert sorted(sh for s in results[2]["seen"] for sh in s["shards"]) == [f"samples.shard-0000{i}.parquet" for i in range(3)]
    # one worker: the stage's own engine, in the generate task run itself ("generate-<id>")
    assert len(results[1]["seen"]) == 1 and results[1]["seen"][0]["task"].startswith("generate-")
    assert not results[1]["seen"][0]["task"].startswith("generate-worker")
    for a, b in zip(results[1]["paths"], results[2]["paths"]):
        assert Path(a).read_bytes() == Path(b).read_bytes(), Path(a).name


@pytest.mark.slow
def test_two_vllm_workers_draw_the_samples_of_one_engine(tiny_model, tmp_path):
    """Real vLLM on CPU: one engine draws all shards; then, with shard 1 already drawn (a resumed
    stage), two concurrent engines draw shards 0 and 2; the joined tables are equal, bit for bit."""
    prompts = PROMPTS[:6]
    key = {"config": "c", "prompts": [p["id"] for p in prompts]}
    over = {"model.policy": tiny_model, "model.reference": tiny_model, "generate.k": 3, "generate.max_tokens": 12,
            "generate.temperature": 1.0, "generate.top_p": 1.0}
    ref, out = tmp_path / "one" / "samples.parquet", tmp_path / "two" / "samples.parquet"
    ref.parent.mkdir()
    out.parent.mkdir()
    one = load_config(None, BASE | over)
    generate.run_generate(one.generate, one.model, tiny_model, prompts, ref, ref.parent, 1, key, print)
    rows = artifacts.read_table(ref)
    assert len(rows) == 18 and len({r["response"] for r in rows}) > 6  # sampled, not degenerate
    shutil.copy(artifacts.shard_path(ref, 1), artifacts.shard_path(out, 1))
    artifacts.mark_done(artifacts.shard_path(out, 1), key | {"shard": 1})
    logged = []
    two = load_config(None, BASE | over | {"generate.shards": 2})
    generate.run_generate(two.generate, two.model, tiny_model, prompts, out, out.parent, 1, key, logged.append)
    assert "generate: 2 shards on 2 workers" in logged
    assert sorted(m for m in logged if m.startswith("vLLM: wrote")) == [
        "vLLM: wrote samples.shard-00000.parquet (6 samples)", "vLLM: wrote samples.shard-00002.parquet (6 samples)"]
    assert out.read_bytes() == ref.read_bytes()


# --- training -----------------------------------------------------------------------------------

def _hostfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def test_the_deepspeed_command_line_comes_from_the_hostfile(tmp_path):
    hf = _hostfile(tmp_path, "# two nodes\nnode-0 slots=8\n\nnode-1   slots=8   # second\n")
    assert train.read_hostfile(hf) == {"node-0": 8, "node-1": 8}
    cmd = train.launch_command("deepspeed", 1, Path("spec.json"), hostfile=str(hf))
    assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hf), "--master_addr", "node-0",
                   "--master_port", "29500", "--module", "selfalign.tasks.train_worker", "spec.json"]
    cmd = train.launch_command("deepspeed", 1, Path("spec.json"), hostfile=str(hf), master_addr="10.0.0.5",
                               master_port=6000)
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.5" and cmd[cmd.index("--master_port") + 1] == "6000"
    with pytest.raises(ValueError, match="needs train.launcher=deepspeed"):
        train.launch_command("torchrun", 1, Path("spec.json"), hostfile=str(hf))


def test_one_node_commands_rendezvous_on_loopback():
    local = train.launch_command("local", 2, Path("spec.json"), master_port=4321)
    assert local == [sys.executable, "-m", "selfalign.tasks.train", "--nproc", "2", "--master_port", "4321", "spec.json"]
    for launcher in ("torchrun", "deepspeed"):
        cmd = " ".join(train.launch_command(launcher, 2, Path("spec.json")))
        assert "127.0.0.1" in cmd
    import psutil

    lo = train_nodes.interface_to("127.0.0.1")  # where every worker pins gloo and NCCL on one node
    assert socket.if_nametoindex(lo) > 0 and any(a.address == "127.0.0.1" for a in psutil.net_if_addrs()[lo])


@pytest.mark.parametrize("text, where", [
    ("node-0 slots=8\nnode-1 slot=8\n", "line 2 ('node-1 slot=8'): expected 'hostname slots=N'"),
    ("node-0 slots=8\n\nnode-1 slots=eight\n", "line 3 ('node-1 slots=eight'): slots must be a positive integer, got 'eight'"),
    ("node-0 slots=0\n", "line 1 ('node-0 slots=0'): slots must be a positive integer, got '0'"),
    ("node-0\n", "line 1 ('node-0'): expected 'hostname slots=N'"),
    ("node-0 slots=2 extra\n", "line 1 ('node-0 slots=2 extra'): expected 'hostname slots=N'"),
    ("node-0 slots=2\nnode-0 slots=2\n", "line 2 ('node-0 slots=2'): host 'node-0' is listed twice"),
    ("# nothing\n\n", "lists no host"),
])
def test_a_malformed_hostfile_is_named_with_its_line(tmp_path, text, where):
    hf = _hostfile(tmp_path, text)
    with pytest.raises(train.HostfileError) as e:
        train.read_hostfile(hf)
    assert where in str(e.value) and str(hf) in str(e.value)
    with pytest.raises(ConfigError, match="train.hostfile: "):
        load_config(None, BASE | {"train.hostfile": str(hf), "train.launcher": "deepspeed"})


def test_hostfile_config_keys(tmp_path):
    hf = _hostfile(tmp_path, "node-0 slots=2\nnode-1 slots=2\n")
    base = BASE | {"train.hostfile": str(hf), "train.launcher": "deepspeed", "train.micro_batch_size": 2}
    assert load_config(None, base | {"train.batch_size": 8}).train.hostfile == str(hf)
    with pytest.raises(ConfigError, match=r"train.batch_size: 12 must be a multiple of micro_batch_size \* the "
                                          r"hostfile's slots = 2 \* 4"):
        load_config(None, base | {"train.batch_size": 12})
    with pytest.raises(ConfigError, match="train.hostfile: .* needs train.launcher=deepspeed .got 'local'"):
        load_config(None, base | {"train.launcher": "local", "train.batch_size": 8})
    with pytest.raises(ConfigError, match="train.hostfile: .*does not exist"):
        load_config(None, base | {"train.hostfile": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="train.master_port: 70000 must be in"):
        load_config(None, BASE | {"train.master_port": 70000})
    # a preset names its hostfile relative to itself
    preset = tmp_path / "p.yaml"
    preset.write_text("train: {hostfile: ./hostfile, launcher: deepspeed, micro_batch_size: 2, batch_size: 8}\n")
    assert load_config(preset, BASE).train.hostfile == str(hf.resolve())


def _train(tiny_model, tmp_path, replay_pairs, name, **over):
    from safetensors.torch import load_file

    cfg = load_config(None, {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
                             "data.eval_prompts": "e", "data.offline_pairs": "o", "run.dir": str(tmp_path),
                             "train.lr": 1e-3, "train.max_steps": 3, "train.batch_size": 4,
                             "train.micro_batch_size": 2} | over)
    out = tmp_path / name / "model"
    out.parent.mkdir()
    steps = train.run_train(cfg.train, cfg.model, tiny_model, replay_pairs(name), out, seed=0, log=lambda m: None)
    return steps, load_file(out / "model.safetensors"), out


class Listening:
    """Every listening inet socket of this process's descendants, polled while it runs."""

    def __init__(self):
        self.seen, self.done = set(), False
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        import psutil

        while not self.done:
            for p in psutil.Process().children(recursive=True):
                try:
                    self.seen |= {(p.pid, c.laddr.ip, c.laddr.port) for c in p.net_connections("inet")
                                  if c.status == psutil.CONN_LISTEN}
                except psutil.Error:
                    pass
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "deepspeed"])
def test_two_processes_listen_on_loopback_only_and_train_the_model_of_one(tiny_model, tmp_path, replay_pairs,
                                                                          launcher):
    """2 gloo processes (global batch 4 = 2 processes x micro-batch 2) against 1 process (2
    micro-batches of 2): every step's loss within 1e-5, weights within 1e-5; the model loads and
    scores. While the 2 processes run, every listening socket of theirs is on 127.0.0.1, the
    rendezvous store included."""
    import torch

    steps1, w1, _ = _train(tiny_model, tmp_path, replay_pairs, "one")
    port = _free_port()
    with Listening() as listening:
        steps2, w2, out = _train(tiny_model, tmp_path, replay_pairs, "two", **{"train.nproc": 2, "train.launcher": launcher,
                                                                   "train.master_port": port})
    assert listening.seen, "no listening socket seen: the check would be vacuous"
    assert all(ip == "127.0.0.1" for _, ip, _ in listening.seen), listening.seen
    assert any(p == port for _, _, p in listening.seen)  # the store, on the configured port
    assert steps1[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and steps1[-1]["loss"] < steps1[0]["loss"]
    assert len(steps2) == len(steps1) == 3
    for s1, s2 in zip(steps1, steps2):
        assert s2["loss"] == pytest.approx(s1["loss"], abs=1e-5)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)
    tok, seqs = _sequences(str(out), 4)
    values = lm_logps.logps_of(lm_logps.load_model(str(out)), seqs, tok.pad_token_id)
    assert all(math.isfinite(v) and v < 0 for v in values)


def test_a_failing_process_stops_the_local_launch(tmp_path):
    """Rank 0 cannot bind the rendezvous port (something else listens there) and fails with the port
    named; rank 1, connected to that other socket, would wait for its store for 30 minutes: the
    local launcher stops it and exits with rank 0's status."""
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(8)
        port = taken.getsockname()[1]
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "selfalign.tasks.train", "--nproc", "2", "--master_port",
                               str(port), str(spec)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"train: the rendezvous port 127.0.0.1:{port} is not free" in proc.stderr
    assert time.time() - t0 < 60



# --- training across nodes (train.nnodes): DeepSpeed's runner on each node, no ssh -------------------

NODES = {"train.nnodes": 2, "train.launcher": "deepspeed", "train.master_addr": "10.0.0.5"}


def test_each_node_runs_deepspeeds_runner_without_ssh(tmp_path):
    hf = train_nodes.write_hostfile(tmp_path / "hostfile", 3, 8)
    assert train.read_hostfile(hf) == {"node-0": 8, "node-1": 8, "node-2": 8}
    cmd = train.launch_command("deepspeed", 8, Path("spec.json"), hostfile=str(hf), master_addr="10.0.0.5",
                               master_port=6000, node_rank=0)
    assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hf), "--no_ssh", "--node_rank",
                   "0", "--master_addr", "10.0.0.5", "--master_port", "6000", "--module", "selfalign.tasks.train_worker",
                   "spec.json"]
    launch = {"id": "x", "state": "open", "spec": "spec.json", "hostfile": str(hf), "nnodes": 3, "nproc": 8,
              "master_addr": "10.0.0.5", "master_port": 6000}
    assert train_nodes.node_command(launch, 2) == cmd[:7] + ["2"] + cmd[8:]
    for bad in (0, 3):
        with pytest.raises(ValueError, match=rf"--node-rank: {bad} must be in \[1, 2\] \(train.nnodes=3; node 0 runs"):
            train_nodes.node_command(launch, bad)


def test_a_node_joins_the_newest_open_launch_it_has_not_joined(tmp_path):
    def write(name, state="open", mtime=0.0):
        work = tmp_path / name / "train"
        work.mkdir(parents=True, exist_ok=True)
        launch = train_nodes.open_launch(work, work / "spec.json", work / "hostfile", 2, 1, "127.0.0.1", 29500)
        if state == "closed":
            train_nodes.close_launch(work, launch, 0)
        os.utime(work / train_nodes.LAUNCH_FILE, (mtime, mtime))
        return launch

    assert train_nodes.next_launch(tmp_path, set()) is None
    write("round_1", "closed", 100)
    stale, current = write("round_2", mtime=200), write("round_3", mtime=300)
    path, launch, mtime = train_nodes.next_launch(tmp_path, set())
    assert launch == current and path.parent.parent.name == "round_3" and mtime == 300
    assert train_nodes.next_launch(tmp_path, {current["id"]})[1] == stale
    assert train_nodes.next_launch(tmp_path, {current["id"]}, after=300) is None  # nothing newer than the joined one


@pytest.mark.parametrize("over, message", [
    ({"train.launcher": "local"}, "train.nnodes: 2 needs train.launcher=deepspeed (got 'local')"),
    ({"train.master_addr": ""}, "train.master_addr: '' must be node 0's address in the cluster network with "
                                "train.nnodes=2"),
    ({"train.master_addr": "0.0.0.0"}, "train.master_addr: '0.0.0.0' must be node 0's own address, not a wildcard"),
    ({"train.master_addr": "::"}, "train.master_addr: '::' must be node 0's own address, not a wildcard"),
    ({"train.nnodes": 0}, "train.nnodes: 0 must be >= 1"),
    ({"train.batch_size": 12, "train.micro_batch_size": 2, "train.nproc": 2},
     "train.batch_size: 12 must be a multiple of micro_batch_size * nproc * nnodes = 8"),
])
def test_node_config_errors_name_the_key_and_value(over, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE | NODES | over)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_node_config_keys(tmp_path):
    cfg = load_config(None, BASE | NODES | {"train.nproc": 2, "train.micro_batch_size": 2, "train.batch_size": 8})
    assert (cfg.train.nnodes, cfg.train.master_addr) == (2, "10.0.0.5")
    assert cfg.train.zero_stage_for(cfg.train.nproc * cfg.train.nnodes) == 2
    hf = _hostfile(tmp_path, "a slots=1\nb slots=1\n")
    with pytest.raises(ConfigError, match="train.nnodes: 2 starts every node without ssh; train.hostfile"):
        load_config(None, BASE | NODES | {"train.hostfile": str(hf)})


def test_train_node_command_line_errors(capsys, tmp_path):
    from selfalign.flows.cli import main

    assert main(["train-node", str(tmp_path), "--node-rank", "0"]) == 2
    assert "train-node: --node-rank 0 must be >= 1 (node 0 runs the pipeline)" in capsys.readouterr().err


def test_stopping_deepspeeds_runner_stops_its_launcher_and_ranks(tmp_path):
    """DeepSpeed's runner exits on SIGTERM without passing it on; started as a group, the stage's or
    train-node's stop reaches its launcher and ranks too."""
    import psutil

    script = tmp_path / "rank.py"
    script.write_text("import time\ntime.sleep(600)\n")
    hf = train_nodes.write_hostfile(tmp_path / "hostfile", 2, 2)
    cmd = train.launch_command("deepspeed", 2, Path("unused"), hostfile=str(hf), master_addr="127.0.0.1",
                               master_port=_free_port(), node_rank=1)
    cmd = cmd[:cmd.index("--module")] + [str(script)]
    proc = procs.start_child(cmd, group=True, env=train.worker_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        def ranks(tree):
            return [p for p in tree if p.cmdline()[2:3] == [str(script)]]  # python -u rank.py --local_rank=i

        tree: list[psutil.Process] = []
        for _ in range(600):  # until the launcher has started both ranks
            tree = psutil.Process(proc.pid).children(recursive=True)
            if len(ranks(tree)) == 2:
                break
            time.sleep(0.2)
        assert len(ranks(tree)) == 2, [p.cmdline() for p in tree]
        procs.stop_child(proc)
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        procs.stop_child(proc)
        procs.forget_child(proc)


@pytest.mark.slow
def test_two_nodes_of_one_process_train_the_model_of_two_processes_on_one_node(tiny_model, tmp_path, replay_pairs):
    """2 nodes x 1 rank on loopback: the train stage runs node 0's part (DeepSpeed's runner with
    --no_ssh --node_rank 0) and `selfalign train-node` the other's, which it finds through the launch
    file in the run folder. Per-step losses and weights equal 2 processes on one node within 1e-5;
    every socket that either node's processes listen on is on 127.0.0.1."""
    import torch

    steps1, w1, _ = _train(tiny_model, tmp_path, replay_pairs, "one", **{"train.nproc": 2})
    port = _free_port()
    log = open(tmp_path / "node1.log", "w")
    node1 = subprocess.Popen([sys.executable, "-m", "selfalign.flows.cli", "train-node", str(tmp_path),
                              "--node-rank", "1", "--poll", "0.2"], stdout=log, stderr=subprocess.STDOUT)
    try:
        with Listening() as listening:
            steps2, w2, out = _train(tiny_model, tmp_path, replay_pairs, "two", **NODES | {
                "train.master_addr": "127.0.0.1", "train.master_port": port})
        done = f"train-node 1: {tmp_path / 'two' / 'train'}: done"
        for _ in range(300):  # node 1's launcher may still be exiting when node 0's part returns
            if done in (tmp_path / "node1.log").read_text() or node1.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        node1.terminate()  # it runs until stopped
        node1.wait(60)
        log.close()
    text = (tmp_path / "node1.log").read_text()
    assert done in text, text[-3000:]
    assert node1.returncode == 128 + 15, text[-3000:]
    launch = artifacts.read_json(tmp_path / "two" / "train" / train_nodes.LAUNCH_FILE)
    assert (launch["state"], launch["rc"], launch["nnodes"]) == ("closed", 0, 2)
    assert listening.seen, "no listening socket seen: the check would be vacuous"
    assert all(ip == "127.0.0.1" for _, ip, _ in listening.seen), listening.seen
    assert any(p == port for _, _, p in listening.seen)  # the store, on the configured port
    assert len({pid for pid, _, _ in listening.seen}) >= 2  # both nodes' ranks listened (gloo), not just one
    assert len(steps2) == len(steps1) == 3
    for s1, s2 in zip(steps1, steps2):
        assert s2["loss"] == pytest.approx(s1["loss"], abs=1e-5)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)
