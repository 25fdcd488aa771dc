"""Train stage: launches the DeepSpeed worker (`train_worker.py`) in processes of its own, then
publishes the round's model atomically and returns the per-step metrics the worker wrote.

Launchers (`train.launcher`): `local` starts the `train.nproc` processes itself (this module run as
`python -m selfalign.tasks.train`); `torchrun`; `deepspeed`, also across nodes: without ssh
(`train.nnodes`, each node running DeepSpeed's runner for itself, see `train_nodes`) or through ssh
from a hostfile (`train.hostfile`). Every rendezvous socket listens on the master address only: rank 0
creates the store on a socket bound to it (`train_nodes.init_process_group`) and gloo/NCCL are pinned
to its interface; that is 127.0.0.1 on one node and `train.master_addr` across nodes. With `local` and
`deepspeed` nothing else listens (torchrun's agent hosts a store of its own, which torch binds to
every interface)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from selfalign.tasks import artifacts, procs, refcache, train_nodes
from selfalign.tasks.config_base import ModelConfig, digest
from selfalign.tasks.train_config import SAVING_KEYS, TrainConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostfileError(ValueError):
    """A hostfile line is malformed; the message names the file and the line."""


def read_hostfile(path: str | Path) -> dict[str, int]:
    """{host: slots} of a DeepSpeed hostfile: one `host slots=N` per line, `#` comments and blank
    lines ignored. Anything else is an error naming the file, the line number and the line."""
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"{str(path)!r} does not exist")
    hosts: dict[str, int] = {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}, line {n} ({raw.strip()!r})"
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise HostfileError(f"{where}: expected 'hostname slots=N'")
        host, slots = parts[0], parts[1][len("slots="):]
        if not slots.isdigit() or int(slots) < 1:
            raise HostfileError(f"{where}: slots must be a positive integer, got {slots!r}")
        if host in hosts:
            raise HostfileError(f"{where}: host {host!r} is listed twice")
        hosts[host] = int(slots)
    if not hosts:
        raise HostfileError(f"{path} lists no host")
    return hosts


def launch_command(launcher: str, nproc: int, spec_path: Path, *, hostfile: str = "", master_addr: str = "",
                   master_port: int = 0, node_rank: int | None = None) -> list[str]:
    """The command that starts the training processes. Without a hostfile: `nproc` processes on this
    node, rendezvous at 127.0.0.1 (`master_port`, or a free port). With one (deepspeed launcher
    only): the hostfile's slots on each of its hosts, rank 0 reached at `master_addr` (default: the
    first host) and `master_port` (default 29500); DeepSpeed's runner starts every host's processes
    through ssh, or with `node_rank` only this node's (`--no_ssh`: each node runs its own command)."""
    if hostfile:
        if launcher != "deepspeed":
            raise ValueError(f"train.hostfile needs train.launcher=deepspeed, not {launcher!r}")
        hosts = read_hostfile(hostfile)
        no_ssh = [] if node_rank is None else ["--no_ssh", "--node_rank", str(node_rank)]
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), *no_ssh,
                "--master_addr", master_addr or next(iter(hosts)), "--master_port", str(master_port or 29500),
                "--module", "selfalign.tasks.train_worker", str(spec_path)]
    port = str(master_port or _free_port())
    if launcher == "local":
        return [sys.executable, "-m", "selfalign.tasks.train", "--nproc", str(nproc), "--master_port", port,
                str(spec_path)]
    if launcher == "deepspeed":
        import torch

        flag = "--num_gpus" if torch.cuda.is_available() else "--num_accelerators"
        return [sys.executable, "-m", "deepspeed.launcher.runner", flag, str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", port, "--module", "selfalign.tasks.train_worker", str(spec_path)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "selfalign.tasks.train_worker", str(spec_path)]


def worker_env() -> dict[str, str]:
    """The launcher's environment. gloo and NCCL are pinned to the master address's interface by each
    worker itself (`train_nodes.pin_interfaces`): on another node that interface has its own name."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "selfalign" / "torch_extensions"))
    clear_stale_build_locks(Path(env["TORCH_EXTENSIONS_DIR"]))
    import torch  # here, not at the top: the local launcher (this module run as a script) needs none

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


STALE_LOCK_SECONDS = 600


def clear_stale_build_locks(extensions_dir: Path, older_than: float = STALE_LOCK_SECONDS, log=print) -> list[Path]:
    """Removes build locks of DeepSpeed's JIT-compiled ops left by a process killed while it held one.
    torch marks an op build in progress with a file `lock` in the op's folder and every later loader
    waits, without a timeout, until that file is gone: one rank killed at that moment would hang all
    training on the machine. A build takes about a minute, so a lock older than `older_than` seconds
    has no live holder."""
    removed = []
    for lock in extensions_dir.glob("*/lock") if extensions_dir.is_dir() else []:
        try:
            if time.time() - lock.stat().st_mtime > older_than:
                lock.unlink()
                removed.append(lock)
                log(f"train: removed a stale build lock {lock} (left by a process stopped while building the op)")
        except FileNotFoundError:  # released meanwhile
            pass
    return removed


def watch_build_locks(extensions_dir: Path, stop: threading.Event, log=print, every: float = 30.0) -> None:
    """While training runs: removes stale build locks (`clear_stale_build_locks`) every `every` seconds."""
    while not stop.wait(every):
        clear_stale_build_locks(extensions_dir, log=log)


def local_launch(nproc: int, master_port: int, worker_args: list[str]) -> int:
    """The `local` launcher: `nproc` worker processes on this node, ranks 0..nproc-1, rendezvous at
    127.0.0.1:`master_port` (rank 0 hosts the store on a loopback socket). When one fails the others
    are stopped; the exit status is the first failure's (0 when all succeed). The workers die with
    this process (`train_worker.die_with_parent_or_exit`)."""
    import signal

    ranks = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
        ranks.append(subprocess.Popen([sys.executable, "-u", "-m", "selfalign.tasks.train_worker", *worker_args],
                                      env=env))
    rc = 0
    while any(p.poll() is None for p in ranks):
        failed = [p.returncode for p in ranks if p.returncode not in (None, 0)]
        if failed and rc == 0:
            rc = failed[0]
            for p in ranks:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        time.sleep(0.1)
    failed = [p.returncode for p in ranks if p.returncode != 0]
    return rc or (failed[0] if failed else 0)


class NonFiniteTraining(RuntimeError):
    """Training met a NaN or inf loss or gradient norm; the message names the step and the value."""


def checkpoint_dir(out_dir: Path) -> Path:
    return out_dir.parent / "train" / "checkpoints"


def adapter_dir(out_dir: Path) -> Path:
    """Where LoRA training keeps its adapter alone (peft format), beside the merged model."""
    return out_dir.parent / "train" / "adapter"


def follow_steps(path: Path, on_step, stop: threading.Event, every: float = 1.0) -> None:
    """Calls `on_step(row)` for each step row appended to the metrics file `path` (JSON lines), as it
    is written, until `stop` is set and the file is read to its end."""
    pos = 0
    while True:
        done = stop.is_set()
        if path.exists():
            with open(path, encoding="utf-8") as f:
                f.seek(pos)
                while (line := f.readline()).endswith("\n"):  # a line still being written waits
                    pos = f.tell()
                    if line.strip():
                        on_step(json.loads(line))
        if done:
            return
        stop.wait(every)


def train_key(t: TrainConfig, m: ModelConfig, model: str, pairs: Path, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the stage is skipped by: the keys the trained model depends on (`TrainConfig.keyed`: not
    those of saving and launching) and the model's, the start model, the pairs, the seed and MRPO's
    additional references (absent for other losses); and those config keys by name."""
    settings = t.keyed() | m.settings()
    key = {"config": digest(settings), "model": artifacts.input_token(model), "pairs": artifacts.input_token(pairs),
           "seed": seed}
    if refs := t.extra_references():
        key["mrpo_references"] = [[artifacts.input_token(path), tok] for path, tok in refs]
    return key, settings


def run_train(t: TrainConfig, m: ModelConfig, model: str, pairs_path: Path, out_dir: Path, seed: int, log=print,
              key: dict[str, Any] | None = None, on_step=None, batch_tokens: int = 16384,
              run_dir: Path | None = None) -> list[dict[str, Any]]:
    """Trains pi_r from pi_{r-1} (= `model`) on the round's pairs; writes `out_dir` (HF format).
    `t`, `m`: the train and model sections; `batch_tokens`: tokens per forward of the reference
    log-probs it fills in (the pipeline passes score.batch_tokens); `run_dir`: the folder the other
    nodes of a multi-node training watch (named in the log).
    Every `train.checkpoint_every` steps the worker saves a DeepSpeed checkpoint; a later call with
    the same spec and stage `key` resumes from the latest one (others are discarded first).
    `on_step(row)` is called with each step's metrics while training runs (MLflow's live curves)."""
    t0 = time.time()
    work = out_dir.parent / "train"
    work.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    metrics_path = work / "metrics.jsonl"
    zero_stage = t.zero_stage_for(None if t.hostfile else t.nproc * t.nnodes)
    # The worker's job: the train section (its top-level keys by name: a loss's hyper-parameters reach
    # it so, train_objective.pair_loss), the group of the loss or LoRA in use, and what it trains on.
    spec = {k: v for k, v in dataclasses.asdict(t).items() if k not in SAVING_KEYS and k not in ("lora", "mrpo", "hpo")}
    spec |= {"model": model, "pairs": str(pairs_path), "output": str(partial), "metrics": str(metrics_path),
             "seed": seed, "dtype": m.dtype, "trust_remote_code": m.trust_remote_code,
             "zero_stage": zero_stage, "batch_tokens": batch_tokens,
             "ref_cache": str(d) if (d := refcache.resolve_dir(t.ref_cache)) else None}
    if t.loss == "mrpo":
        spec["mrpo"] = dataclasses.asdict(t.mrpo) | {"references": t.mrpo.reference_list()}
    if t.loss == "hpo":
        spec["hpo"] = dataclasses.asdict(t.hpo) | {"rewards": t.hpo.reward_list()}
    if t.lora.enabled:
        spec["lora"] = t.lora.spec() | {"adapter_output": str(adapter_dir(out_dir))}
    # Checkpoints are resumed only by the same training: same spec (config, model, seed) and the
    # same stage key (the contents of the pairs and the model).
    ckpt = checkpoint_dir(out_dir)
    stamp = json.loads(json.dumps({"spec": spec, "key": key}, default=float))  # as read back from the file
    if ckpt.exists() and (not (ckpt / "stamp.json").exists() or artifacts.read_json(ckpt / "stamp.json") != stamp):
        log(f"train: discarding checkpoints of another training in {ckpt}")
        shutil.rmtree(ckpt)
    if not ckpt.exists():
        metrics_path.unlink(missing_ok=True)
        ckpt.mkdir(parents=True)
        artifacts.write_json(ckpt / "stamp.json", stamp)
    spec |= {"checkpoints": str(ckpt), "checkpoint_every": t.checkpoint_every}
    spec_path = work / "spec.json"
    artifacts.write_json(spec_path, spec)
    if adapter_dir(out_dir).exists():
        shutil.rmtree(adapter_dir(out_dir))  # a former attempt's; the worker writes it at the end
    launch = None
    if t.nnodes > 1:  # every node runs DeepSpeed's runner for itself: this one node 0's part
        hostfile = train_nodes.write_hostfile(work / "hostfile", t.nnodes, t.nproc)
        cmd = launch_command("deepspeed", t.nproc, spec_path, hostfile=str(hostfile), master_addr=t.master_addr,
                             master_port=t.master_port, node_rank=0)
        where = (f"{t.nnodes} nodes x {t.nproc} process(es) (node 0 here; the others join with "
                 f"`selfalign train-node {run_dir or out_dir.parent} --node-rank i`)")
    else:
        cmd = launch_command(t.launcher, t.nproc, spec_path, hostfile=t.hostfile, master_addr=t.master_addr,
                             master_port=t.master_port)
        where = f"the hosts of {t.hostfile}" if t.hostfile else f"{t.nproc} process(es)"
    auto = f" ({t.zero_stage})" if t.zero_stage == "auto" else ""
    log(f"train: launching {where} with {t.launcher}, ZeRO-{zero_stage}{auto}")
    stop = threading.Event()
    follower = None
    if on_step is not None:
        follower = threading.Thread(target=follow_steps, args=(metrics_path, on_step, stop), daemon=True,
                                    name="selfalign-train-steps")
        follower.start()
    env = worker_env()
    # A rank killed elsewhere while it held the op's build lock would leave this launch's ranks waiting.
    threading.Thread(target=watch_build_locks, args=(Path(env["TORCH_EXTENSIONS_DIR"]), stop, log), daemon=True,
                     name="selfalign-build-locks").start()
    with open(work / "worker.log", "w") as logf:
        proc = procs.start_child(cmd, group=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        rc = None
        tail: list[str] = []
        fault = []  # every rank names the fault; the launcher's report after them can outgrow the tail
        try:
            if t.nnodes > 1:
                launch = train_nodes.open_launch(work, spec_path, hostfile, t.nnodes, t.nproc, t.master_addr,
                                                 t.master_port or 29500)
            for line in proc.stdout:
                logf.write(line)
                tail = (tail + [line.rstrip()])[-40:]
                if "train: non-finite" in line:
                    fault.append(line[line.index("train: non-finite") + 7:].rstrip())
                if line.startswith("train:"):
                    log(line.rstrip())
            rc = proc.wait()
        finally:
            if rc is None:  # interrupted: the launcher's whole group stops (the ranks die with it anyway)
                procs.stop_child(proc)
            procs.forget_child(proc)
            if launch is not None:  # the other nodes stop their part when this one failed or was stopped
                train_nodes.close_launch(work, launch, 1 if rc is None else rc)
            stop.set()
            if follower is not None:
                follower.join()
    if rc != 0:
        if fault:
            raise NonFiniteTraining(f"{fault[-1]} (log: {work / 'worker.log'})")
        raise RuntimeError(f"training failed (exit {rc}); log: {work / 'worker.log'}\n" + "\n".join(tail))
    artifacts.publish_dir(partial, out_dir)
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    log(f"train: {len(rows)} steps in {time.time() - t0:.1f}s -> {out_dir}")
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="the local launcher: train_worker processes on this node")
    ap.add_argument("--nproc", type=int, required=True)
    ap.add_argument("--master_port", type=int, required=True)
    ap.add_argument("spec")
    a = ap.parse_args()
    sys.exit(local_launch(a.nproc, a.master_port, [a.spec]))
