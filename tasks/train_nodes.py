"""Training across nodes without ssh: DeepSpeed's own runner started on every node with `--no_ssh`
and that node's `--node_rank`, all meeting at `train.master_addr`:`train.master_port`.

Node 0 runs the pipeline. Its train stage writes the round's hostfile (`node-<i> slots=<nproc>`, one
line per node: DeepSpeed derives the ranks from it) and a launch file, `round_<r>/train/launch.json`,
then starts its own part. Every other node runs `selfalign train-node <run folder> --node-rank i`
(`follow`), which watches the run folder on the shared filesystem and starts that node's part of
each launch it finds open; a launch closed with a failure, or replaced by a newer attempt, stops it.

Nothing listens on all interfaces: rank 0 hosts the rendezvous store on a socket bound to the master
address (`init_process_group`, called by each training worker), and each node's gloo and NCCL are pinned to the
interface it reaches that address through (`interface_to`)."""
from __future__ import annotations

import ipaddress
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

from selfalign.tasks import artifacts

LAUNCH_FILE = "launch.json"


def resolve(addr: str) -> tuple[socket.AddressFamily, str]:
    """(family, IP) of a master address: an IP as given, a host name as it resolves (IPv4 first)."""
    infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    return infos[0][0], infos[0][4][0]


def is_wildcard(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_unspecified
    except ValueError:
        return False


def interface_to(addr: str) -> str:
    """The name of the network interface this node reaches `addr` through: the one holding the local
    address the kernel picks for a connection to it (on node 0 the interface holding `addr` itself;
    "lo" for 127.0.0.1)."""
    import psutil

    family, ip = resolve(addr)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((ip, 9))  # a UDP connect sends nothing: it only chooses the route and the local address
        local = s.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == family and a.address.split("%")[0] == local for a in addrs):
            return name
    raise RuntimeError(f"train: no network interface holds {local}, the address this node reaches {addr} from; "
                       "set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME")


def write_hostfile(path: Path, nnodes: int, nproc: int) -> Path:
    """The hostfile DeepSpeed's runner derives ranks from: node i holds ranks i*nproc .. i*nproc+nproc-1.
    With --no_ssh the host names are labels only; no node is reached by them."""
    path.write_text("".join(f"node-{i} slots={nproc}\n" for i in range(nnodes)), encoding="utf-8")
    return path


def open_launch(work: Path, spec_path: Path, hostfile: Path, nnodes: int, nproc: int, master_addr: str,
                master_port: int) -> dict:
    """Announces a launch to the other nodes (a fresh id per attempt) and returns it."""
    launch = {"id": uuid.uuid4().hex, "state": "open", "spec": str(spec_path), "hostfile": str(hostfile),
              "nnodes": nnodes, "nproc": nproc, "master_addr": master_addr, "master_port": master_port}
    artifacts.write_json(work / LAUNCH_FILE, launch)
    return launch


def close_launch(work: Path, launch: dict, rc: int) -> None:
    """Node 0's part ended with exit status `rc`: the other nodes stop theirs if it failed."""
    artifacts.write_json(work / LAUNCH_FILE, launch | {"state": "closed", "rc": rc})


def read_launch(path: Path) -> dict | None:
    try:
        return artifacts.read_json(path)
    except (OSError, ValueError):  # removed with its round, or not yet on this node's view of the share
        return None


def node_command(launch: dict, node_rank: int) -> list[str]:
    """The command that starts node `node_rank`'s part of `launch`."""
    from selfalign.tasks.train import launch_command

    if not 1 <= node_rank < launch["nnodes"]:
        raise ValueError(f"--node-rank: {node_rank} must be in [1, {launch['nnodes'] - 1}] "
                         f"(train.nnodes={launch['nnodes']}; node 0 runs the pipeline)")
    return launch_command("deepspeed", launch["nproc"], Path(launch["spec"]), hostfile=launch["hostfile"],
                          master_addr=launch["master_addr"], master_port=launch["master_port"], node_rank=node_rank)


def next_launch(run_dir: Path, joined: set[str], after: float = 0.0) -> tuple[Path, dict, float] | None:
    """(path, launch, its file's mtime) of the newest open launch under `run_dir` that this node has not
    joined yet and that was written after `after` (an mtime); None when there is none."""
    found = []
    for path in run_dir.rglob(LAUNCH_FILE):
        launch = read_launch(path)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        if launch and launch.get("state") == "open" and launch["id"] not in joined and mtime > after:
            found.append((mtime, str(path), launch))
    if not found:
        return None
    mtime, path, launch = max(found, key=lambda f: f[:2])
    return Path(path), launch, mtime


def follow(run_dir: Path, node_rank: int, log: Callable[[str], None] = print, poll: float = 1.0,
           stop: Callable[[], bool] = lambda: False) -> None:
    """Node `node_rank`'s side of every training launch in `run_dir` (a run folder, or a folder
    holding several, e.g. a continual chain's), one after another, until `stop()` or a signal.
    A launch that fails on this node is logged; the next one is still joined."""
    from selfalign.tasks import procs
    from selfalign.tasks.train import worker_env

    run_dir = Path(run_dir)
    joined: set[str] = set()
    log(f"train-node {node_rank}: watching {run_dir} for training launches")
    while not stop():
        found = next_launch(run_dir, joined) if run_dir.is_dir() else None
        if found is None:
            time.sleep(poll)
            continue
        path, launch, mtime = found
        joined.add(launch["id"])
        cmd = node_command(launch, node_rank)
        log(f"train-node {node_rank}: joining {path.parent} ({launch['nnodes']} nodes x {launch['nproc']} "
            f"process(es), rank 0 at {launch['master_addr']}:{launch['master_port']})")
        proc = procs.start_child(cmd, group=True, env=worker_env())  # its output goes where this command's goes
        why, rc = "", None
        try:
            while proc.poll() is None and not why:
                now = read_launch(path) or launch  # unreadable for a moment on some shared filesystems
                if now["id"] != launch["id"] or next_launch(run_dir, joined, mtime) is not None:
                    why = "a newer launch replaced it"  # node 0 started again: this one waits for nobody
                elif now["state"] == "closed" and now.get("rc"):
                    why = f"node 0's part failed (exit {now['rc']})"
                else:
                    time.sleep(poll)
            if not why:
                rc = proc.wait()
        finally:
            if rc is None:
                procs.stop_child(proc)
            procs.forget_child(proc)
        log(f"train-node {node_rank}: {path.parent}: " + (f"stopped, {why}" if why else
                                                          "done" if rc == 0 else f"failed (exit {rc})"))


def pin_interfaces(addr: str) -> None:
    """gloo and NCCL listen on the interface this node reaches the master address through (gloo would
    otherwise take the address the host name resolves to, NCCL any interface it likes): loopback on
    one node, the cluster network's interface across nodes. GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME
    set by the user are kept."""
    name = interface_to(addr)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", f"={name}")  # "=": this interface, not every one it prefixes


def init_process_group(backend: str) -> None:
    """The process group from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), with
    nothing listening on all interfaces: rank 0 hosts the rendezvous store on a socket bound to
    MASTER_ADDR (127.0.0.1 on one node, node 0's cluster address across nodes; TCPStore alone binds
    every interface), and gloo/NCCL are pinned to that address's interface. Under torchrun's agent
    store (TORCHELASTIC_USE_AGENT_STORE) the agent hosts the store and DeepSpeed joins it."""
    import datetime
    import errno

    import torch.distributed as dist

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    pin_interfaces(addr)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(minutes=30)
    if rank == 0:
        family, ip = resolve(addr)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise RuntimeError(f"train: the rendezvous port {addr}:{port} is not free ({e})") from None
            raise RuntimeError(f"train: rank 0 cannot listen at {addr}:{port} ({e}): train.master_addr must be "
                               "an address of node 0, the node that runs the pipeline") from None
        sock.listen(128)
        store = dist.TCPStore(addr, port, world, True, timeout, master_listen_fd=sock.detach())
    else:
        store = dist.TCPStore(addr, port, world, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
