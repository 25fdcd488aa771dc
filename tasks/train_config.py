"""The train stage's config section (`train.*`) with its groups `train.lora`, `train.mrpo` and
`train.hpo`, apart from tasks/train.py so that checking a config imports no torch."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from selfalign.tasks.config_base import ConfigError, check, check_choices, check_source, flatten

# train.loss: the pair losses of kernels/losses.PAIR_LOSSES and the three with their own trainers
# (named here so that checking a config does not import torch; tests/test_train.py compares).
LOSSES = sorted(["dpo", "cdpo", "ipo", "hinge", "robust", "exo_pair", "bco_pair", "sppo_hard", "nca_pair",
                 "apo_zero", "apo_down", "discopop", "sigmoid_norm", "aot", "simpo"]) + ["alpha_dpo", "mrpo", "hpo"]
# How often training saves checkpoints, whether they are kept, and where reference log-probs are
# cached do not change the model; nor does how its processes are started and where they meet.
SAVING_KEYS = ("checkpoint_every", "keep_checkpoints", "ref_cache", "launcher", "master_addr", "master_port")
_MODULE_NAME = re.compile(r"[A-Za-z_][\w.]*", re.ASCII)


@dataclass
class LoraConfig:
    # LoRA (peft): train low-rank adapters instead of the weights. The reference is the same model
    # with its adapter disabled (no second copy); the round's model is saved with the adapter merged.
    enabled: bool = False          # parameter-efficient training with LoRA adapters (off: full weights)
    r: int = 16                    # adapter rank
    alpha: float = 32.0            # adapter scaling: its update is multiplied by alpha / r
    dropout: float = 0.0           # dropout on the adapters' input (training only)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # module names (e.g. [q_proj,
                                   # v_proj]) or all-linear: every linear layer but the output layer

    def __post_init__(self) -> None:
        for key, ok, why in [("r", self.r >= 1, "must be >= 1"), ("alpha", self.alpha > 0, "must be > 0"),
                             ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)")]:
            check(f"train.lora.{key}", getattr(self, key), ok, why)
        names = self.target_modules
        check("train.lora.target_modules", names, any(names),
              "must name at least one module (e.g. [q_proj, v_proj]) or be all-linear")
        check("train.lora.target_modules", names, "all-linear" not in names or len(names) == 1,
              "all-linear already selects every linear layer: give it alone")
        for name in names:
            check("train.lora.target_modules", names, name == "all-linear" or bool(_MODULE_NAME.fullmatch(name)),
                  f"has {name!r}, which is not a module name (names such as q_proj, v_proj, or all-linear)")

    def spec(self) -> dict[str, Any]:
        """What the training worker needs of LoRA."""
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": "all-linear" if self.target_modules == ["all-linear"] else list(self.target_modules)}


@dataclass
class MrpoConfig:
    # MRPO: the primary reference is the round's own (pi_{r-1}); these are the additional ones, scored
    # once per round by the score stage (replay pairs: by the training worker).
    references: list[str] = field(default_factory=list)  # models (paths or hub ids), at least one for
                                   # train.loss=mrpo; in a preset, ./x and ../x entries (here and in
                                   # tokenizers) are relative to it
    tokenizers: list[str] = field(default_factory=list)  # tokenizers, one per reference ("" = the model's
                                   # own; [] = all their own); a reference whose tokenizer differs from the
                                   # policy's scores the same text re-tokenised with its own tokenizer and
                                   # chat template
    eta: float = 0.1               # CTRO clip budget; < 0: fixed relative band |eta| on both sides
    alpha: float = -1.0            # ARWC weight: < 0 adaptive per pair (official), else fixed in [0, 1]
    convention: Literal["code", "swapped"] = "code"  # code (official: alpha weighs the primary) | swapped
    naive: bool = False            # Multi-DPO baseline: weighted sum of one DPO loss per reference

    def __post_init__(self) -> None:
        check_choices(self, "train.mrpo")
        for model in self.references:
            check_source("train.mrpo.references", model, model=True)
        check("train.mrpo.tokenizers", self.tokenizers, not self.tokenizers or len(self.tokenizers) == len(self.references),
              f"must give one entry (possibly empty) per reference in train.mrpo.references ({len(self.references)})")
        check("train.mrpo.alpha", self.alpha, self.alpha <= 1, "must be < 0 (adaptive) or in [0, 1]")

    def reference_list(self) -> list[tuple[str, str]]:
        """(model, tokenizer or "") of each additional reference, in order."""
        return [(m, self.tokenizers[i] if self.tokenizers else "") for i, m in enumerate(self.references)]


@dataclass
class HpoConfig:
    # HPO (reconstructed; the paper's constants are unknown): DPO (or KTO) + lam * advantage-weighted
    # NLL on auxiliary rewards, with a value head V(x) trained by expectile regression.
    rewards: list[str] = field(default_factory=list)  # hooks package.module:function(prompt, response)
                                   # -> float, at least one for train.loss=hpo
    reward_weights: list[float] = field(default_factory=list)  # weights c_k of r_aux = sum_k c_k R_k, one
                                   # per reward ([] = all 1)
    preference: Literal["dpo", "kto"] = "dpo"  # dpo | kto (TRL 0.8 kto_pair)
    lam: float = 1.0               # lambda: weight of the advantage-weighted NLL term
    eta: float = 1.0               # temperature: w = min(exp((r_aux - V(x)) / eta), w_max)
    w_max: float = 20.0            # weight clip
    tau: float = 0.7               # expectile of the value head's regression
    nll: Literal["mean", "sum"] = "mean"  # mean (token average) | sum: log pi(y|x) in the NLL term
    on_rejected: bool = True       # the NLL term on rejected responses too (else chosen only)
    value_lr: float = 1e-3         # learning rate of the value head (a linear layer on the prompt's
                                   # last hidden state, detached from the policy)

    def __post_init__(self) -> None:
        check_choices(self, "train.hpo")
        n = len(self.rewards)
        check("train.hpo.reward_weights", self.reward_weights, not self.reward_weights or len(self.reward_weights) == n,
              f"must give one weight per reward in train.hpo.rewards ({n})")
        for key, ok, why in [("eta", self.eta > 0, "must be > 0"), ("w_max", self.w_max > 0, "must be > 0"),
                             ("lam", self.lam >= 0, "must be >= 0"), ("tau", 0 < self.tau < 1, "must be in (0, 1)"),
                             ("value_lr", self.value_lr > 0, "must be > 0")]:
            check(f"train.hpo.{key}", getattr(self, key), ok, why)

    def reward_list(self) -> list[tuple[str, float]]:
        """(hook, weight) of each auxiliary reward; weights default to 1."""
        return [(h, self.reward_weights[i] if self.reward_weights else 1.0) for i, h in enumerate(self.rewards)]


@dataclass
class TrainConfig:
    loss: str = "dpo"              # dpo | cdpo | ipo | hinge | simpo | alpha_dpo | mrpo | hpo | TRL pair
                                   # losses (robust, exo_pair, bco_pair, sppo_hard, nca_pair, apo_zero,
                                   # apo_down, discopop, sigmoid_norm, aot); see kernels/losses.py
    beta: float = 0.1              # strength of the KL anchor to the reference (DICE: 0.1)
    rpo_alpha: float = 0.0         # weight of an NLL term on the chosen responses (token mean over the
                                   # batch), added to any loss: TRL's rpo_alpha, iterative RPO
    label_smoothing: float = 0.0   # cDPO / robust / exo_pair / aot / simpo / alpha_dpo
    gamma_beta_ratio: float = 0.5  # simpo and alpha_dpo target margin gamma / beta
    alpha: float = 0.2             # alpha_dpo: weight of the adaptive margin
    alpha_mode: Literal["stable", "official"] = "stable"  # alpha_dpo normaliser: stable | official (zero-init
                                   # EMA, bit-exact)
    lr: float = 5e-7               # DICE: 5e-7 constant
    weight_decay: float = 0.0      # AdamW weight decay
    epochs: float = 1.0            # passes over the round's pairs (ignored when max_steps > 0)
    max_steps: int = 0             # optimiser steps per round (0 = from train.epochs)
    batch_size: int = 32           # pairs per optimiser step, all processes together
    micro_batch_size: int = 4      # pairs per forward pass per process
    grad_clip: float = 1.0         # clip the gradient norm to this (0 = no clipping)
    zero_stage: Literal[0, 1, 2, 3, "auto"] = "auto"  # DeepSpeed ZeRO stage 0-3, or auto: 0 on one process
                                   # (ZeRO partitions across processes; on one it only adds work), 2 on several
    nproc: int = 1                 # training processes on this node, on each with train.nnodes (with
                                   # train.hostfile: the hosts' slots)
    launcher: Literal["local", "deepspeed", "torchrun"] = "local"  # local: the stage starts the processes,
                                   # rendezvous on 127.0.0.1 only | deepspeed (required for train.hostfile) |
                                   # torchrun (its agent's store listens on all interfaces)
    hostfile: str = ""             # DeepSpeed hostfile ("host slots=N" per line): train across its hosts (ssh)
    nnodes: int = 1                # nodes training runs on without ssh (deepspeed launcher): this node is
                                   # node 0; each other runs `selfalign train-node <run folder> --node-rank i`
    master_addr: str = ""          # across nodes: node 0's address in the cluster network, where the others
                                   # reach rank 0; every socket listens there only ("" = hostfile's first host)
    master_port: int = 0           # rendezvous port (0 = a free one on this node; 29500 across nodes)
    threads: int = 0               # torch threads per process (0 = cores / nproc)
    packing: bool = True           # a micro-batch's chosen and rejected sequences in one padding-free row
    checkpoint_every: int = 50     # DeepSpeed checkpoint every N optimiser steps in round_<r>/train (0 = off);
                                   # a rerun resumes from the latest; only the latest is kept
    keep_checkpoints: bool = False # keep the latest checkpoint after the round's model is saved
    ref_cache: str = "auto"        # on-disk cache of replay pairs' reference log-probs, keyed by model
                                   # content hash, dtype and text: auto (~/.cache/selfalign/ref-logps) | off | a path
    lora: LoraConfig = field(default_factory=LoraConfig)  # train.lora.*: LoRA adapters (any loss)
    mrpo: MrpoConfig = field(default_factory=MrpoConfig)  # train.mrpo.*: the mrpo loss's references
    hpo: HpoConfig = field(default_factory=HpoConfig)     # train.hpo.*: the hpo loss's auxiliary rewards

    def __post_init__(self) -> None:
        check_choices(self, "train")
        if self.loss not in LOSSES:
            raise ConfigError(f"train.loss: {self.loss!r} is not a known loss (known: {', '.join(LOSSES)})")
        step = self.micro_batch_size * self.nproc * self.nnodes
        for key, ok, why in [
            ("beta", self.beta > 0, "must be > 0"),
            ("rpo_alpha", self.rpo_alpha >= 0, "must be >= 0"),
            ("lr", self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("gamma_beta_ratio", self.gamma_beta_ratio >= 0, "must be >= 0"),
            ("alpha", self.alpha >= 0, "must be >= 0"),
            ("epochs", self.epochs > 0 or self.max_steps > 0, "must be > 0 (or set train.max_steps)"),
            ("max_steps", self.max_steps >= 0, "must be >= 0 (0 = use train.epochs)"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0"),
            ("threads", self.threads >= 0, "must be >= 0 (0 = cores / nproc)"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0 (0 = no checkpoints)"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)"),
            ("micro_batch_size", self.micro_batch_size >= 1, "must be >= 1"),
            ("nproc", self.nproc >= 1, "must be >= 1"),
            ("nnodes", self.nnodes >= 1, "must be >= 1"),
            ("batch_size", step <= 0 or self.batch_size % step == 0,
             f"must be a multiple of micro_batch_size * nproc{' * nnodes' * (self.nnodes > 1)} = {step}"),
            ("master_port", 0 <= self.master_port < 65536, "must be in [0, 65535] (0 = a free port)"),
        ]:
            check(f"train.{key}", getattr(self, key), ok, why)
        if self.loss == "cdpo" and self.label_smoothing == 0:
            raise ConfigError("train.label_smoothing: 0.0 must be > 0 for train.loss=cdpo")
        if self.loss == "mrpo":
            check("train.mrpo.references", self.mrpo.references, bool(self.mrpo.references),
                  "must list at least one additional reference model for train.loss=mrpo (paths or hub ids)")
        if self.loss == "hpo":
            self._check_hpo_hooks()
        if self.hostfile:
            self._check_hostfile()
        if self.nnodes > 1:
            self._check_nodes()

    def _check_hpo_hooks(self) -> None:
        from selfalign.tasks.data import load_hook

        check("train.hpo.rewards", self.hpo.rewards, bool(self.hpo.rewards),
              "must name at least one auxiliary reward package.module:function for train.loss=hpo")
        for hook in self.hpo.rewards:
            try:
                load_hook(hook, "train.hpo.rewards")
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def _check_hostfile(self) -> None:
        """Multi-node training: the deepspeed launcher, a well-formed hostfile, a batch that splits evenly."""
        from selfalign.tasks.train import HostfileError, read_hostfile

        if self.launcher != "deepspeed":
            raise ConfigError(f"train.hostfile: {self.hostfile!r} needs train.launcher=deepspeed (got {self.launcher!r})")
        try:
            hosts = read_hostfile(self.hostfile)
        except HostfileError as e:
            raise ConfigError(f"train.hostfile: {e}") from None
        world = sum(hosts.values())
        if self.batch_size % (self.micro_batch_size * world):
            raise ConfigError(f"train.batch_size: {self.batch_size} must be a multiple of micro_batch_size * the "
                              f"hostfile's slots = {self.micro_batch_size} * {world}")

    def _check_nodes(self) -> None:
        """Training across nodes without ssh: DeepSpeed's runner on each node, rank 0 at an address of node 0."""
        from selfalign.tasks.train_nodes import is_wildcard

        if self.launcher != "deepspeed":
            raise ConfigError(f"train.nnodes: {self.nnodes} needs train.launcher=deepspeed (got {self.launcher!r})")
        if self.hostfile:
            raise ConfigError(f"train.nnodes: {self.nnodes} starts every node without ssh; train.hostfile "
                              f"{self.hostfile!r} starts them through ssh: set one of the two")
        if not self.master_addr.strip():
            raise ConfigError(f"train.master_addr: {self.master_addr!r} must be node 0's address in the cluster "
                              f"network with train.nnodes={self.nnodes} (the other nodes reach rank 0 there)")
        if is_wildcard(self.master_addr):
            raise ConfigError(f"train.master_addr: {self.master_addr!r} must be node 0's own address, not a wildcard: "
                              "the rendezvous listens there only")

    def zero_stage_for(self, world: int | None) -> int:
        """The ZeRO stage training runs: `zero_stage`, or for auto 0 on one process and 2 on
        several (`world`: the process count; None when a hostfile decides it, i.e. several hosts)."""
        if self.zero_stage != "auto":
            return self.zero_stage
        return 0 if world == 1 else 2

    def extra_references(self) -> list[tuple[str, str]]:
        """(model, tokenizer or "") of each additional MRPO reference; none unless train.loss=mrpo."""
        return self.mrpo.reference_list() if self.loss == "mrpo" else []

    def reference_tokenizers(self) -> list[tuple[str, str]]:
        """(config key, path) of the tokenizer of each additional MRPO reference: its own tokenizer when
        train.mrpo.tokenizers names one, else the reference model's."""
        return [("train.mrpo.tokenizers" if tok else "train.mrpo.references", tok or m)
                for m, tok in self.extra_references()]

    def keyed(self) -> dict[str, Any]:
        """The keys the trained model depends on, by name: not those of saving and launching, not the
        LoRA group when LoRA is off, not another loss's group."""
        skip = {f"train.{k}" for k in SAVING_KEYS}
        used = {"lora": self.lora.enabled, "mrpo": self.loss == "mrpo", "hpo": self.loss == "hpo"}
        return {k: v for k, v in flatten(self, "train").items() if k not in skip and used.get(k.split(".")[1], True)}
