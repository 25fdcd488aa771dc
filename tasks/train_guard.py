"""Non-finite training stops before it reaches the weights: `GradGuard` checks every gradient as
backward produces it, on every rank, and `NonFiniteLoss` carries the message. Also the test-only
fault injection switches the worker reads (tests/test_faults.py, tests/test_resume.py)."""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist


class NonFiniteLoss(RuntimeError):
    pass


# Test-only fault injection: the loss of this optimiser step becomes NaN (tests/test_resume.py).
FAULT_NAN_STEP = "SELFALIGN_FAULT_NAN_STEP"
# Test-only fault injection: at this optimiser step one element of one parameter's gradient becomes
# inf on the last rank, the loss untouched (as an overflow in backward would); the parameter is the
# first trainable one of the policy unless FAULT_INF_GRAD_PARAM names another (e.g. value_head.weight).
FAULT_INF_GRAD_STEP = "SELFALIGN_FAULT_INF_GRAD_STEP"
FAULT_INF_GRAD_PARAM = "SELFALIGN_FAULT_INF_GRAD_PARAM"


class GradGuard:
    """Stops training on a NaN or inf loss or gradient before any optimizer applies it, whatever the
    ZeRO stage. A hook on every trainable parameter (policy and HPO value head) sees that parameter's
    gradient as backward produces it on this rank, before DeepSpeed reduces, partitions or clips it
    (after which a non-finite value would spread, or under ZeRO-0 turn into NaN through the clipping
    coefficient), and writes its norm into the slot of (micro-batch, parameter): one kernel, nothing
    leaves the device there. The micro-batches' losses stay on the device too. `check`, called by every
    rank after the step's last backward and before `engine.step()`, gathers the losses and norms of all
    ranks and reads them in one copy (the step's only wait for the device), so every rank takes the
    same decision and raises the same message. A gradient that is finite on every rank can still
    overflow in the reduction; DeepSpeed's global norm, checked after the step, catches that case
    (ZeRO-1/2 skip the update)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], device, rank: int, world: int, n_micro: int = 1):
        self.names, self.rank, self.world = [n for n, _ in named], rank, world
        self.norms = torch.zeros(n_micro, len(named), dtype=torch.float32, device=device)
        self.slot = 0  # the micro-batch whose backward runs
        self.fault_step, self.target, self.step = int(os.environ.get(FAULT_INF_GRAD_STEP, 0)), -1, 0
        if self.fault_step:
            target = os.environ.get(FAULT_INF_GRAD_PARAM) or self.names[0]
            if target not in self.names:
                raise ValueError(f"{FAULT_INF_GRAD_PARAM}: {target!r} is not a trainable parameter")
            self.target = self.names.index(target)
        for i, (_, p) in enumerate(named):
            p.register_hook(lambda g, i=i: self._hook(i, g))

    def _hook(self, i: int, g: torch.Tensor):
        if i == self.target and self.step + 1 == self.fault_step and self.rank == self.world - 1:
            g = g.clone()
            g.view(-1)[0] = math.inf
        torch.linalg.vector_norm(g, dtype=torch.float32, out=self.norms[self.slot, i])
        return g

    def begin(self, step: int) -> None:
        self.step, self.slot = step, 0
        self.norms.zero_()

    def micro(self, m: int) -> None:
        """The next backward is the step's micro-batch `m` (0-based) on this rank."""
        self.slot = m

    def check(self, steps: int, kept: str, losses: torch.Tensor) -> None:
        """`losses`: this rank's micro-batch losses of the step (on the device)."""
        n_loss = len(losses)
        # a parameter's norms summed over the micro-batches: NaN or inf if any micro-batch's was
        mine = torch.cat([losses.detach().float().reshape(-1), self.norms.sum(0)])
        parts = [mine]
        if self.world > 1:
            parts = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(parts, mine)
        got = torch.stack(parts).cpu()  # (rank, losses | parameters)
        loss_vals, norms = got[:, :n_loss], got[:, n_loss:]
        bad = (~torch.isfinite(loss_vals)).nonzero().tolist()
        if bad:
            r, m = bad[0]
            on = f" on rank {r}" if self.world > 1 else ""
            raise NonFiniteLoss(f"train: non-finite loss {loss_vals[r, m].item()}{on} at step {self.step + 1}/{steps} "
                                f"(micro-batch {m + 1} of {n_loss}); the round's model is not written; {kept}")
        bad = (~torch.isfinite(norms)).nonzero().tolist()
        if bad:
            r, i = bad[0]
            more = f" (and {len(bad) - 1} more parameter gradient(s))" if len(bad) > 1 else ""
            raise NonFiniteLoss(f"train: non-finite gradient (norm {norms[r, i].item()}) of {self.names[i]} on rank "
                                f"{r} at step {self.step + 1}/{steps}{more}, loss finite; the optimizer step was not "
                                f"taken and the round's model is not written; {kept}")
