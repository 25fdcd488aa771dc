"""Train stage: launches the DeepSpeed worker (`train_worker.py`) in processes of its own, then
publishes the round's model atomically and returns the per-step metrics the worker wrote.

Launchers (`train.launcher`): `local` starts the `train.nproc` processes itself (this module run as
`python -m selfalign.tasks.train`); `torchrun`; `deepspeed`, also across the nodes of a hostfile
(`train.hostfile`). On one node every rendezvous socket listens on 127.0.0.1 only: rank 0 creates the
store on a loopback socket (`train_worker.init_process_group`) and gloo/NCCL are pinned to the loopback
interface; with `local` and `deepspeed` nothing else listens (torchrun's agent hosts a store of its
own, which torch binds to every interface). Across nodes the store must be reachable: it listens
on all interfaces of rank 0's node, at `train.master_addr`:`train.master_port`."""
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

from selfalign.tasks import artifacts, procs, refcache


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
                   master_port: int = 0) -> list[str]:
    """The command that starts the training processes. Without a hostfile: `nproc` processes on this
    node, rendezvous at 127.0.0.1 (`master_port`, or a free port). With one (deepspeed launcher
    only): the hostfile's slots on each of its hosts, rank 0 reached at `master_addr` (default: the
    first host) and `master_port` (default 29500)."""
    if hostfile:
        if launcher != "deepspeed":
            raise ValueError(f"train.hostfile needs train.launcher=deepspeed, not {launcher!r}")
        hosts = read_hostfile(hostfile)
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
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


def loopback_interface() -> str:
    """The name of the network interface that carries 127.0.0.1 ("lo" on Linux)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
            return name
    return "lo"


def worker_env(single_node: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "selfalign" / "torch_extensions"))
    import torch  # here, not at the top: the local launcher (this module run as a script) needs none

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    if single_node:
        # gloo and NCCL otherwise listen on the address the host name resolves to
        lo = loopback_interface()
        env.setdefault("GLOO_SOCKET_IFNAME", lo)
        env.setdefault("NCCL_SOCKET_IFNAME", lo)
    return env


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


# How often training saves checkpoints, whether they are kept, and where reference log-probs are
# cached do not change the model; nor does how its processes are started and where they meet.
SAVING_KEYS = ("checkpoint_every", "keep_checkpoints", "ref_cache", "launcher", "master_addr", "master_port")


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


def run_train(cfg, model: str, pairs_path: Path, out_dir: Path, seed: int, log=print,
              key: dict[str, Any] | None = None, on_step=None) -> list[dict[str, Any]]:
    """Trains pi_r from pi_{r-1} (= `model`) on the round's pairs; writes `out_dir` (HF format).
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
    t = cfg.train
    zero_stage = t.zero_stage_for(None if t.hostfile else t.nproc)
    # Every train key by name (a loss's hyper-parameters reach it so: train_worker.pair_loss), then
    # what the worker needs in another form.
    spec = {k: v for k, v in dataclasses.asdict(t).items()
            if k not in SAVING_KEYS and not (k.startswith("lora_") and not t.lora_enabled)} | {
        "model": model, "pairs": str(pairs_path), "output": str(partial), "metrics": str(metrics_path),
        "seed": seed, "dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code,
        "loss": t.loss, "beta": t.beta, "rpo_alpha": t.rpo_alpha, "label_smoothing": t.label_smoothing, "lr": t.lr,
        "gamma_beta_ratio": t.gamma_beta_ratio, "alpha": t.alpha, "alpha_mode": t.alpha_mode,
        "weight_decay": t.weight_decay, "epochs": t.epochs, "max_steps": t.max_steps,
        "batch_size": t.batch_size, "micro_batch_size": t.micro_batch_size, "grad_clip": t.grad_clip,
        "zero_stage": zero_stage, "threads": t.threads, "batch_tokens": cfg.score.batch_tokens,
        "packing": t.packing,
        "mrpo_references": t.mrpo_reference_list(), "mrpo_eta": t.mrpo_eta, "mrpo_alpha": t.mrpo_alpha,
        "mrpo_convention": t.mrpo_convention, "mrpo_naive": t.mrpo_naive,
        "hpo_rewards": t.hpo_reward_list(), "hpo_preference": t.hpo_preference, "hpo_lambda": t.hpo_lambda,
        "hpo_eta": t.hpo_eta, "hpo_w_max": t.hpo_w_max, "hpo_tau": t.hpo_tau, "hpo_nll": t.hpo_nll,
        "hpo_on_rejected": t.hpo_on_rejected, "hpo_value_lr": t.hpo_value_lr,
        "ref_cache": str(d) if (d := refcache.resolve_dir(t.ref_cache)) else None,
    }
    if t.lora_enabled:  # only then: the spec (and checkpoints' stamp) of full training is unchanged
        spec["lora"] = t.lora_spec() | {"adapter_output": str(adapter_dir(out_dir))}
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
    with open(work / "worker.log", "w") as logf:
        proc = procs.start_child(cmd, env=worker_env(single_node=not t.hostfile), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        fault = []  # every rank names the fault; the launcher's report after them can outgrow the tail
        try:
            for line in proc.stdout:
                logf.write(line)
                tail = (tail + [line.rstrip()])[-40:]
                if "train: non-finite" in line:
                    fault.append(line[line.index("train: non-finite") + 7:].rstrip())
                if line.startswith("train:"):
                    log(line.rstrip())
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: the launcher stops its ranks, which die with it anyway
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            procs.forget_child(proc)
            if follower is not None:
                stop.set()
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
