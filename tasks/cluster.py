"""Generation and scoring workers on a Ray cluster (`cluster.address`).

Without the key nothing changes: the stages start their workers as processes on this machine
(`procs.worker_resources` shares out its GPUs or cores). With it, each worker of `generate.shards` /
`score.shards` (one at least) is a Ray task placed by its resources: `generate.tensor_parallel_size`
GPUs per vLLM engine and 1 GPU per scorer on a cluster with GPUs, `cluster.cpus_per_worker` logical
CPUs each (their threads, on CPU machines). The task starts the same worker process as the local
stage, on the node Ray chose, so the worker contract stays one JSON job of its own, and Ray only
places and retries it. Prefect remains the control plane: every worker is still a Prefect task run
(`generate-worker-<i>`, `score-worker-<i>`) in the flow's own process, which submits the Ray task
and waits for it, so the Prefect API never has to be reachable from the Ray nodes.

The run folder must be on a filesystem every node mounts at the same path: the jobs, shards,
manifests and score parts travel through it, never through Ray's object store. `check_shared_storage`
checks that at the start of a run (every node reads the driver's marker and writes one back), and
each worker checks it again for nodes that joined later.

A node lost mid-stage takes its workers' processes with it; Ray runs the lost task again on another
node (`cluster.max_retries` times at most). A generation task drawn again first skips the shards its
earlier attempt already wrote with their manifests, so only the missing ones are drawn (each with its
own seed: the table is the same bit for bit). Once the retries are spent the stage fails, and a rerun
deals only the missing shards again. Ray is imported here only, and only with `cluster.address` set."""
from __future__ import annotations

import contextlib
import signal
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from selfalign.tasks import artifacts
from selfalign.tasks.cluster_config import ClusterConfig


class SharedStorageError(RuntimeError):
    """A node of the cluster does not see the run folder the driver writes."""


def connect(c: ClusterConfig):
    """The `ray` module, connected to the cluster at `c.address` (once per process)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(f"cluster.address: {c.address!r} needs Ray: pip install -e '.[ray]'") from None
    if not ray.is_initialized():
        # ray.init replaces the SIGTERM handler (from the main thread); the run's own one
        # (procs.stop_on_signals: end the workers, mark the run stopped) is put back.
        main = threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGTERM) if main else None
        # The run's own logs say what each worker did; Ray's forwarding adds the workers' progress.
        ray.init(address=c.address, log_to_driver=True)
        if main and handler is not None:
            signal.signal(signal.SIGTERM, handler)
    return ray


def _gpus_in(ray) -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def absolute(value: str) -> str:
    """A path that exists here, made absolute: Ray workers run in a folder of their own. Hub ids stay."""
    return str(Path(value).resolve()) if value and Path(value).exists() else value


def node_name() -> str:
    """This Ray node, as the logs name it: its IP and the start of its node id."""
    import ray

    return f"{ray.util.get_node_ip_address()} (node {ray.get_runtime_context().get_node_id()[:8]})"


def _read_job(job_path: str) -> dict[str, Any]:
    path = Path(job_path)
    if not path.is_file():
        raise SharedStorageError(f"node {node_name()} does not see {path}: the run folder must be on a filesystem "
                                 "every node mounts at the same path")
    return artifacts.read_json(path)


# --- what runs on a node ------------------------------------------------------------------------

def _keep(lines: list[str]):
    """A worker's log on its node: printed now (Ray forwards it to the flow's console while the
    worker runs) and kept for the Prefect task run, which logs it when the worker returns."""
    def log(message: str) -> None:
        lines.append(message)
        print(message, flush=True)
    return log


def generate_on_node(job_path: str, kv_cache_gib: float) -> dict[str, Any]:
    """One generation worker on the node Ray placed it on: the job's shards not yet written with
    their manifests (an earlier attempt, lost with its node, may have written some)."""
    from selfalign.tasks.generate import run_vllm

    job = _read_job(job_path)
    todo = [r for r in job["runs"] if not artifacts.is_done(Path(r["output"]), r["manifest"])]
    lines: list[str] = []
    if todo:
        run_vllm(dict(job, runs=todo), Path(job_path).with_suffix(".attempt.json"), kv_cache_gib, _keep(lines))
    return {"node": node_name(), "drawn": [Path(r["output"]).name for r in todo],
            "skipped": len(job["runs"]) - len(todo), "log": lines}


def score_on_node(job_path: str) -> dict[str, Any]:
    """One scoring worker on the node Ray placed it on; its part goes to the job's `output`."""
    from selfalign.tasks.score import run_score_worker

    job = _read_job(job_path)
    lines: list[str] = []
    out = run_score_worker(job, Path(job_path).with_suffix(".attempt.json"), _keep(lines))
    return {"node": node_name(), "output": str(out), "log": lines}


def answer_marker(marker: Path, token: str, node: str) -> bool:
    """On one node: whether it reads the driver's `token` in `marker`; if so it writes its answer
    (`<marker>.<node>`) beside it, for the driver to read back."""
    if not marker.is_file() or marker.read_text() != token:
        return False
    (marker.parent / f"{marker.name}.{node}").write_text(token)
    return True


def _see_marker(marker: str, token: str) -> bool:
    import ray

    return answer_marker(Path(marker), token, ray.get_runtime_context().get_node_id())


def storage_error(node_ip: str, node_id: str, run_dir: Path) -> SharedStorageError:
    return SharedStorageError(f"node {node_ip} (node {node_id[:8]}) does not see the run folder {run_dir}: put it on "
                              "a filesystem every node mounts at the same path")


# --- what runs in the flow's process ------------------------------------------------------------

def _submit(c: ClusterConfig, fn: Callable, gpus: int, *args):
    ray = connect(c)
    task = ray.remote(fn).options(num_cpus=c.cpus_per_worker, num_gpus=gpus if _gpus_in(ray) else 0,
                                  max_retries=c.max_retries)
    return ray.get(task.remote(*args))


def prepare_generate_job(c: ClusterConfig, job: dict[str, Any], threads: int) -> dict[str, Any]:
    """A generation worker's job for a Ray node: absolute paths, and on CPU nodes its threads."""
    return dict(job, model=absolute(job["model"]), threads=threads or c.cpus_per_worker,
                runs=[dict(r, output=str(Path(r["output"]).resolve())) for r in job["runs"]])


def prepare_score_job(c: ClusterConfig, job: dict[str, Any]) -> dict[str, Any]:
    settings = dict(job["settings"], references=[[absolute(m), absolute(t)] for m, t in job["settings"]["references"]])
    return dict(job, settings=settings, samples=absolute(job["samples"]), policy=absolute(job["policy"]),
                reference=absolute(job["reference"]), output=str(Path(job["output"]).resolve()),
                threads=c.cpus_per_worker)


def run_generate_worker(c: ClusterConfig, job: dict[str, Any], job_path: Path, kv_cache_gib: float,
                        tensor_parallel_size: int, log=print) -> dict[str, Any]:
    """Runs one generation worker as a Ray task and waits for it; logs where it ran."""
    path = artifacts.write_json(job_path.resolve(), job)
    res = _submit(c, generate_on_node, tensor_parallel_size, str(path), kv_cache_gib)
    for line in res["log"]:
        log(line)
    log(f"on {res['node']}: drew {len(res['drawn'])} shard(s)"
        + (f", {res['skipped']} already drawn by an earlier attempt" if res["skipped"] else ""))
    return res


def run_score_worker(c: ClusterConfig, job: dict[str, Any], job_path: Path, log=print) -> Path:
    """Runs one scoring worker as a Ray task and waits for it; returns the path of its part."""
    path = artifacts.write_json(job_path.resolve(), job)
    res = _submit(c, score_on_node, 1, str(path))
    for line in res["log"]:
        log(line)
    log(f"on {res['node']}: scored part {job['part'][0]} of {job['part'][1]}")
    return Path(res["output"])


def check_shared_storage(c: ClusterConfig, run_dir: Path, log=print) -> list[str]:
    """Every live node of the cluster reads a marker this process writes in `run_dir` and writes one
    back; raises SharedStorageError naming the first node that does not see it. Returns the nodes."""
    ray = connect(c)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = run_dir.resolve() / ".cluster-check"
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = folder / f"marker-{token[:12]}"
    marker.write_text(token)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    try:
        # num_cpus=0: the check runs even on a node whose CPUs are all reserved.
        refs = [ray.remote(_see_marker).options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(str(marker), token) for n in nodes]
        for n, seen in zip(nodes, ray.get(refs)):
            if not seen or not (folder / f"{marker.name}.{n['NodeID']}").is_file():
                raise storage_error(n["NodeManagerAddress"], n["NodeID"], run_dir.resolve())
    finally:
        for p in folder.glob(f"{marker.name}*"):
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # another run's check may be under way
            folder.rmdir()
    log(f"cluster: {len(nodes)} node(s) at {c.address} share the run folder {run_dir.resolve()}")
    return [n["NodeID"] for n in nodes]

