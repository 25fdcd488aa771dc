"""The training loss of a micro-batch: the configured loss called by its contract from per-sequence
sums and counts (`pair_loss`, `Objective`), and the pairs' numbers it reads, on the device (`RowColumns`)."""
from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from selfalign.kernels.losses import PAIR_LOSSES, AlphaDPOState, alpha_dpo_loss, expectile_loss, hpo_loss, mrpo_loss
from selfalign.kernels.packing import to_device


class RowColumns:
    """The numbers of the training pairs that the loss reads (reference log-probs, MRPO's other
    references, HPO's auxiliary rewards and prompt lengths), one device tensor per key, copied once;
    `get(key, idx)` selects a micro-batch's rows by a device index, with no copy from the host."""

    def __init__(self, rows: list[dict], loss_name: str, device):
        keys = {"ref_chosen_logp": torch.float32, "ref_rejected_logp": torch.float32}
        if loss_name == "mrpo":
            keys |= {"mrpo_ref_chosen_logps": torch.float32, "mrpo_ref_rejected_logps": torch.float32}
        if loss_name == "hpo":
            keys |= {"aux_chosen": torch.float32, "aux_rejected": torch.float32}
        self.cols = {k: to_device(torch.tensor([r[k] for r in rows], dtype=dt), device) for k, dt in keys.items()}
        if loss_name == "hpo":
            lens = torch.tensor([len(r["prompt_ids"]) for r in rows], dtype=torch.long)
            self.cols["prompt_len"] = to_device(lens, device)

    def get(self, key: str, idx: torch.Tensor) -> torch.Tensor:
        return self.cols[key].index_select(0, idx)


def pair_loss(fn, hyper: dict, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len):
    """A loss of PAIR_LOSSES called by its contract: the tensors its signature names among
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
    rejected_lengths (in its order), and each keyword-only hyper-parameter that the train config has
    under the same name (`train.beta`, `train.label_smoothing`, ...); the others keep their defaults."""
    tensors = {"policy_chosen_logps": chosen, "policy_rejected_logps": rejected, "ref_chosen_logps": ref_chosen,
               "ref_rejected_logps": ref_rejected, "chosen_lengths": chosen_len, "rejected_lengths": rejected_len}
    params = inspect.signature(fn).parameters.values()
    args = [tensors[p.name] for p in params if p.name in tensors]
    kwargs = {p.name: hyper[p.name] for p in params if p.kind is p.KEYWORD_ONLY and p.name in hyper}
    return fn(*args, **kwargs)


class Objective:
    """The configured preference loss over one micro-batch's per-sequence sums and token counts
    (losses that need averages derive them from the same sums: no second forward). Holds the
    alpha-DPO running statistics between steps; the batch statistics are gathered across ranks.
    mrpo: the reference sums are (K, B), row 0 the primary reference. hpo: also the pairs' auxiliary
    rewards `aux_c`, `aux_r` and the value head's V(x) `values` (B,)."""

    def __init__(self, spec: dict, world: int):
        self.name, self.spec, self.world = spec["loss"], spec, world
        self.state = AlphaDPOState() if self.name == "alpha_dpo" else None

    def metric_names(self) -> list[str]:
        """The names of a step's metrics (TRL's), in the order `train_step` accumulates them."""
        names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"]
        if self.name == "hpo":
            names += ["value_loss", "aux/chosen", "aux/rejected", "value/mean"]
        if self.spec.get("rpo_alpha"):
            names += ["nll_loss"]  # TRL's name for the NLL term rpo_alpha weighs
        return names

    def references(self, cols: RowColumns, idx: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference sums of a micro-batch's chosen and rejected responses: (B,), or for MRPO
        (K, B), row 0 the primary reference (pi_{r-1}), then the additional ones."""
        ref_c, ref_r = cols.get("ref_chosen_logp", idx).to(dtype), cols.get("ref_rejected_logp", idx).to(dtype)
        if self.name == "mrpo":
            ref_c = torch.cat([ref_c[None], cols.get("mrpo_ref_chosen_logps", idx).T.to(dtype)])
            ref_r = torch.cat([ref_r[None], cols.get("mrpo_ref_rejected_logps", idx).T.to(dtype)])
        return ref_c, ref_r

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.detach().contiguous())
        return torch.cat(parts)

    def __call__(self, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len,
                 aux_c=None, aux_r=None, values=None):
        s, name = self.spec, self.name
        args = (chosen, rejected, ref_chosen, ref_rejected)
        if name == "mrpo":
            m = s["mrpo"]
            return mrpo_loss(*args, beta=s["beta"], eta=m["eta"], alpha=m["alpha"], naive=m["naive"],
                             convention=m["convention"])
        if name == "hpo":
            h = s["hpo"]
            return hpo_loss(*args, chosen_len, rejected_len, aux_c, aux_r, values, beta=s["beta"],
                            preference=h["preference"], eta=h["eta"], lam=h["lam"], w_max=h["w_max"], nll=h["nll"],
                            aux_on_rejected=h["on_rejected"])
        if name == "alpha_dpo":
            losses, cr, rj, self.state = alpha_dpo_loss(
                *args, chosen_len, rejected_len, state=self.state, beta=s["beta"],
                gamma_beta_ratio=s["gamma_beta_ratio"], alpha=s["alpha"], label_smoothing=s["label_smoothing"],
                mode=s["alpha_mode"], gather=self._gather if self.world > 1 else None)
            return losses, cr, rj
        return pair_loss(PAIR_LOSSES[name], s, *args, chosen_len, rejected_len)

    def value_loss(self, values, aux_c, aux_r) -> torch.Tensor:
        """HPO's value head: expectile regression of V(x) on the auxiliary rewards of both responses."""
        tau = self.spec["hpo"]["tau"]
        return 0.5 * (expectile_loss(values, aux_c, tau).mean() + expectile_loss(values, aux_r, tau).mean())
