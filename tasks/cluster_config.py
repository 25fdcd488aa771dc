"""The cluster section (`cluster.*`): where generation and scoring workers run. Apart from
tasks/cluster.py so that checking a config imports no Ray."""
from __future__ import annotations

import re
from dataclasses import dataclass

from selfalign.tasks.config_base import check

# A head's host:port, optionally through Ray Client (ray://host:port); a host may be an [IPv6] address.
_ADDRESS = re.compile(r"(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", re.ASCII)


@dataclass
class ClusterConfig:
    address: str = ""              # "": generation and scoring workers are processes on this machine | auto: the
                                   # Ray cluster this machine joined with `ray start` | host:port of the Ray head
                                   # (ray://host:port: through Ray Client): the workers are Ray tasks there
    cpus_per_worker: int = 1       # logical CPUs each Ray worker reserves; on CPU nodes also its threads
    max_retries: int = 3           # a worker lost with its node runs again on another node, at most this often

    def __post_init__(self) -> None:
        m = _ADDRESS.fullmatch(self.address)
        check("cluster.address", self.address,
              self.address in ("", "auto") or bool(m) and 0 < int(m.group(3)) < 65536,
              "must be empty, auto, host:port or ray://host:port (the Ray head's GCS or Ray Client port)")
        check("cluster.cpus_per_worker", self.cpus_per_worker, self.cpus_per_worker >= 1, "must be >= 1")
        check("cluster.max_retries", self.max_retries, self.max_retries >= 0, "must be >= 0")
