"""Typed run configuration: dataclasses with commented defaults, YAML presets that list only what
differs, dotted command-line overrides (`--train.beta=0.2`). Unknown keys and bad values fail at load
time with the key and the value in the message."""
from __future__ import annotations

import dataclasses
import json
import hashlib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


@dataclass
class RunConfig:
    name: str = "selfalign"        # run name: MLflow run name and default run directory
    dir: str = ""                  # run directory; default runs/<name>
    rounds: int = 2                # DICE rounds (the paper runs 2)
    seed: int = 0                  # seeds sampling, pair mixing and training (round r uses seed + r)
    keep_old_models: bool = True   # a round model trained again (its config or inputs changed) first moves
                                   # aside to model.before-<time>; false: replaced


@dataclass
class ModelConfig:
    policy: str = ""               # pi_0: the DPO model the rounds start from (path or hub id); empty: round 0
                                   # trains pi_0 = DPO(model.reference, offline pairs) first (see `start`)
    reference: str = ""            # the model pi_0 was DPO-trained against (usually the SFT model)
    dtype: str = "float32"         # float32 | bfloat16 (training, scoring and generation)
    trust_remote_code: bool = False  # run a model's own code from its folder (off: only transformers' classes)


@dataclass
class DataConfig:
    prompts: str = ""              # prompts for on-policy sampling (JSONL/Parquet path or hub id)
    eval_prompts: str = ""         # held-out prompts for evaluation
    offline_pairs: str = ""        # offline preference pairs (experience replay)
    heldout_pairs: str = ""        # held-out offline pairs: implicit-reward accuracy and the guard
    # The split and the config (subset) of each dataset above when it is a hub id or a dataset folder:
    # "" = split `train`, the default config; a split may be sliced as `datasets` allows, e.g. test[:500].
    # A single JSONL/JSON/Parquet file has neither.
    prompts_split: str = ""
    prompts_config: str = ""
    eval_prompts_split: str = ""
    eval_prompts_config: str = ""
    offline_pairs_split: str = ""
    offline_pairs_config: str = ""
    heldout_pairs_split: str = ""
    heldout_pairs_config: str = ""
    prompts_per_round: int = 0     # prompts sampled per round (0 = all); rounds take fresh slices
    max_eval_prompts: int = 0      # cap on eval prompts (0 = all)
    max_heldout_pairs: int = 0     # cap on held-out pairs scored each round for the guard (0 = all)
    on_bad_row: str = "error"      # error: stop at the first bad row, naming file, row and field |
                                   # skip: drop bad rows, counted per reason (MLflow data/skipped_*)
    strict: bool = False           # true: duplicate prompts, prompts reused across rounds, eval prompts among
                                   # the training prompts or held-out pairs on offline pairs' prompts stop the
                                   # run; false: warned and counted (MLflow data/duplicate_prompts, ...)


@dataclass
class GenerateConfig:
    k: int = 16                    # samples per prompt (DICE: 16)
    temperature: float = 0.7       # DICE Zephyr setting
    top_p: float = 0.9             # nucleus sampling: keep the smallest set of tokens with this much probability
    max_tokens: int = 2048         # response length limit; a response cut here is dropped from the pairs
    kv_cache_gib: float = 1.0      # vLLM KV cache on CPU, GiB (fractions too)
    gpu_memory_utilization: float = 0.85  # share of GPU memory vLLM may take (weights and KV cache)
    enforce_eager: bool = True     # skip torch.compile / CUDA graphs warm-up
    tensor_parallel_size: int = 1  # GPUs per vLLM engine
    max_model_len: int = 0         # 0 = the model's own limit
    shard_size: int = 256          # prompts per shard: each is written when drawn, so a crash loses at most
                                   # one and a rerun draws only the missing ones (0 = one shard per stage)
    shards: int = 1                # concurrent generation workers, each a process with its own vLLM engine on
                                   # tensor_parallel_size GPUs of its own; the shards still to draw are dealt
                                   # among them; the samples are the same, bit for bit, for any number
                                   # of workers (evaluate then no longer draws the next round's samples)
    threads: int = 0               # CPU threads of each vLLM worker (0 = its cores: all of them, or its share
                                   # with shards > 1; vLLM alone would run one). 2 on 2 idle cores: a 96-prompt
                                   # stage 1.3x faster; the threads spin, so beside another busy process 1 is
                                   # better (there 2 took 1.4x as long). In the stage key: in bfloat16 the
                                   # thread count can change a few samples (float rounding)


@dataclass
class ScoreConfig:
    reference: str = "previous"    # previous: ref_{r-1} as in DICE | sft: always model.reference |
                                   # initial: pi_0 from round 2 on (the SFT model in round 1)
    batch_tokens: int = 16384      # tokens per scoring forward (padded ones too, unless packing)
    packing: bool = True           # padding-free rows: sequences back to back, attention kept inside each
    shards: int = 1                # concurrent scoring workers, each a process (one GPU each on GPUs) scoring
                                   # every other batch; the merged scores equal one worker's


@dataclass
class PairsConfig:
    min_valid: int = 8             # keep prompts with at least this many valid samples (DICE: 8 of 16)
    min_chars: int = 4             # responses shorter than this are degenerate (DICE: <= 3 dropped)
    max_chars: int = 6699          # responses longer than this are degenerate (DICE: >= 6700 dropped)
    length_unit: str = "chars"     # chars (DICE) | tokens: the unit of the alpha * length penalty
    alpha_step: float = 0.001      # grid step of the alpha sweep (DICE: 0.001)
    alpha_max: float = 1.0         # the sweep's upper end, exclusive (DICE: 1.0)
    alpha_min: float = -1.0        # < 0: two-sided sweep, alpha* may be negative and so cancel a reward's taste
                                   # for shorter answers as well as for longer ones | 0: DICE's one-sided sweep
    validity: str = ""             # optional hook package.module:function(prompt, response) -> bool
    gamma: float = 0.5             # fraction of offline (replay) pairs in the training set (0: every generated
                                   # pair, no replay; 1: offline pairs only)
    budget: int = 0                # training pairs per round: generated ones at 1 - gamma, offline ones fill the
                                   # rest (0 = DICE's rule: ~as many as there are offline pairs)
    source: str = "dice"           # dice: generated pairs mixed with offline ones | offline: offline pairs only,
                                   # no generation or scoring (the control arm: iterated DPO on the offline data)


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
    alpha_mode: str = "stable"     # alpha_dpo normaliser: stable | official (zero-init EMA, bit-exact)
    # MRPO: the primary reference is the round's own (pi_{r-1}); these are the additional ones, scored
    # once per round by the score stage (replay pairs: by the training worker).
    mrpo_references: str = ""      # comma-separated models (paths or hub ids), at least one for mrpo; in a
                                   # preset, ./x and ../x entries (here and in mrpo_tokenizers) are relative to it
    mrpo_tokenizers: str = ""      # comma-separated tokenizers, one per reference ("" = the model's own);
                                   # a reference whose tokenizer differs from the policy's scores the
                                   # same text re-tokenised with its own tokenizer and chat template
    mrpo_eta: float = 0.1          # CTRO clip budget; < 0: fixed relative band |eta| on both sides
    mrpo_alpha: float = -1.0       # ARWC weight: < 0 adaptive per pair (official), else fixed in [0, 1]
    mrpo_convention: str = "code"  # code (official: alpha weighs the primary) | swapped
    mrpo_naive: bool = False       # Multi-DPO baseline: weighted sum of one DPO loss per reference
    # HPO (reconstructed; the paper's constants are unknown): DPO (or KTO) + lambda * advantage-weighted
    # NLL on auxiliary rewards, with a value head V(x) trained by expectile regression.
    hpo_rewards: str = ""          # comma-separated hooks package.module:function(prompt, response) -> float
    hpo_reward_weights: str = ""   # comma-separated weights c_k of r_aux = sum_k c_k R_k ("" = all 1); a preset
                                   # may also give a YAML list of numbers, or one number for one reward
    hpo_preference: str = "dpo"    # dpo | kto (TRL 0.8 kto_pair)
    hpo_lambda: float = 1.0        # weight of the advantage-weighted NLL term
    hpo_eta: float = 1.0           # temperature: w = min(exp((r_aux - V(x)) / eta), hpo_w_max)
    hpo_w_max: float = 20.0        # weight clip
    hpo_tau: float = 0.7           # expectile of the value head's regression
    hpo_nll: str = "mean"          # mean (token average) | sum: log pi(y|x) in the NLL term
    hpo_on_rejected: bool = True   # the NLL term on rejected responses too (else chosen only)
    hpo_value_lr: float = 1e-3     # learning rate of the value head (a linear layer on the prompt's
                                   # last hidden state, detached from the policy)
    lr: float = 5e-7               # DICE: 5e-7 constant
    weight_decay: float = 0.0      # AdamW weight decay
    epochs: float = 1.0            # passes over the round's pairs (ignored when max_steps > 0)
    max_steps: int = 0             # optimiser steps per round (0 = from train.epochs)
    batch_size: int = 32           # pairs per optimiser step, all processes together
    micro_batch_size: int = 4      # pairs per forward pass per process
    grad_clip: float = 1.0         # clip the gradient norm to this (0 = no clipping)
    zero_stage: int | str = "auto" # DeepSpeed ZeRO stage 0-3, or auto: 0 on one process (ZeRO partitions
                                   # across processes; on one it only adds work), 2 on several
    nproc: int = 1                 # training processes on this node (with train.hostfile: the hosts' slots)
    launcher: str = "local"        # local: the stage starts the processes, rendezvous on 127.0.0.1 only |
                                   # deepspeed (required for train.hostfile) | torchrun (its agent's store
                                   # listens on all interfaces)
    hostfile: str = ""             # DeepSpeed hostfile ("host slots=N" per line): train across its hosts
    master_addr: str = ""          # with a hostfile: the address every node reaches rank 0 at ("" = first host)
    master_port: int = 0           # rendezvous port (0 = a free one on this node; 29500 with a hostfile)
    threads: int = 0               # torch threads per process (0 = cores / nproc)
    packing: bool = True           # a micro-batch's chosen and rejected sequences in one padding-free row
    checkpoint_every: int = 50     # DeepSpeed checkpoint every N optimiser steps in round_<r>/train (0 = off);
                                   # a rerun resumes from the latest; only the latest is kept
    keep_checkpoints: bool = False # keep the latest checkpoint after the round's model is saved
    ref_cache: str = "auto"        # on-disk cache of replay pairs' reference log-probs, keyed by model
                                   # content hash, dtype and text: auto (~/.cache/selfalign/ref-logps) | off | a path
    # LoRA (peft): train low-rank adapters instead of the weights. The reference is the same model
    # with its adapter disabled (no second copy); the round's model is saved with the adapter merged.
    lora_enabled: bool = False     # parameter-efficient training with LoRA adapters (off: full weights)
    lora_r: int = 16               # adapter rank
    lora_alpha: float = 32.0       # adapter scaling: its update is multiplied by lora_alpha / lora_r
    lora_dropout: float = 0.0      # dropout on the adapters' input (training only)
    lora_target_modules: str = "all-linear"  # comma-separated module names (e.g. q_proj,v_proj) or
                                   # all-linear: every linear layer but the output layer

    def zero_stage_for(self, world: int | None) -> int:
        """The ZeRO stage training runs: `zero_stage`, or for auto 0 on one process and 2 on
        several (`world`: the process count; None when a hostfile decides it, i.e. several hosts)."""
        if self.zero_stage != "auto":
            return self.zero_stage
        return 0 if world == 1 else 2

    def lora_spec(self) -> dict[str, Any] | None:
        """What the training worker needs of the LoRA keys; None when LoRA is off."""
        if not self.lora_enabled:
            return None
        names = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": "all-linear" if names == ["all-linear"] else names}

    def mrpo_reference_list(self) -> list[tuple[str, str]]:
        """(model, tokenizer or "") of each additional MRPO reference, in order."""
        models = [m.strip() for m in self.mrpo_references.split(",") if m.strip()]
        toks = [t.strip() for t in self.mrpo_tokenizers.split(",")] if self.mrpo_tokenizers.strip() else []
        return [(m, toks[i] if i < len(toks) else "") for i, m in enumerate(models)]

    def hpo_reward_list(self) -> list[tuple[str, float]]:
        """(hook, weight) of each HPO auxiliary reward; weights default to 1."""
        hooks = [h.strip() for h in self.hpo_rewards.split(",") if h.strip()]
        weights = [float(w) for w in self.hpo_reward_weights.split(",")] if self.hpo_reward_weights.strip() else []
        return [(h, weights[i] if i < len(weights) else 1.0) for i, h in enumerate(hooks)]


@dataclass
class EvaluateConfig:
    preferred: str = ""            # hook package.module:function(prompt, response) -> bool
    checker: str = ""              # hook for correctness, same signature
    group: str = ""                # hook package.module:function(prompt) -> str: the eval rates are also
                                   # reported per group (eval/<rate>/<group>), e.g. seen vs held-out kinds
    samples: int = 4               # sampled answers per eval prompt (temperature of generate)
    max_tokens: int = 0            # 0 = generate.max_tokens
    # External judge (tasks/judge.py): round r's greedy answers against round r-1's on the eval prompts,
    # each asked in both orders; logs judge/win_rate (position-debiased), consistency, invalid replies.
    judge_url: str = ""            # OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1 ("" = no judge)
    judge_model: str = ""          # the model name the endpoint serves
    judge_api_key_env: str = ""    # name of the environment variable holding the API key ("" = send none);
                                   # the key itself is never a config value and never logged


@dataclass
class StartConfig:
    # pi_0 from an SFT model: with model.policy empty, round 0 trains pi_0 on the offline pairs with
    # model.reference as its reference, through the training stage (train.* apply, except these).
    pairs: int = 0                 # offline pairs pi_0 trains on (0 = all of them)
    epochs: float = 1.0            # passes over them
    lr: float = 0.0                # learning rate (0 = train.lr)


@dataclass
class ContinualConfig:
    # Continual bootstrapping, for scheduled runs: each run starts from the model a registered-model
    # alias names, on training prompts no earlier run of the chain used, in a fresh folder
    # <run dir>/<time>, and moves the alias to its final model only if that beats the start model.
    alias: str = ""                # alias of tracking.registered_model_name (e.g. champion); "" = off
    metric: str = "eval/preferred_rate"  # the held-out metric that decides the promotion (higher is better)
    margin: float = 0.0            # promote when final - start > margin on that metric


@dataclass
class GuardConfig:
    min_pair_accuracy: float = 0.6  # stop before training if the scoring reward ranks held-out pairs worse


@dataclass
class TrackingConfig:
    uri: str = ""                  # MLflow tracking URI; default $MLFLOW_TRACKING_URI, else
                                   # sqlite:///<run_dir>/mlflow.db
    experiment: str = "selfalign"  # MLflow experiment the runs go to
    plots: bool = True             # per-round PNG plots as MLflow artifacts (plots/) and in round_<r>/plots
    log_model: str = "none"        # none | artifact: each round's model folder as MLflow artifacts (model/) |
                                   # transformers: as an MLflow Model of the transformers flavour (model/)
    registered_model_name: str = ""  # each round's logged model becomes the next version of this registered
                                   # model ("" = none); needs tracking.log_model and a database or server store
    system_metrics: bool = True    # CPU, memory (and GPU) use sampled every 10 s into each round's MLflow run


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    start: StartConfig = field(default_factory=StartConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def section_hash(self, *sections: str) -> str:
        d = self.to_dict()
        blob = json.dumps({s: {k: v for k, v in d[s].items() if k not in NOT_HASHED.get(s, ())} for s in sections},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Keys that change no stage's output (the judge reads the eval answers, it has a stage key of its own):
# left out of the section hashes, so setting them reruns no evaluation.
NOT_HASHED = {"evaluate": {"judge_url", "judge_model", "judge_api_key_env"},
               # how many workers draw or score the shards: the tables are the same for any number
               "generate": {"shards"}, "score": {"shards"}}
_CHOICES = {
    "model.dtype": {"float32", "bfloat16"},
    "data.on_bad_row": {"error", "skip"},
    "score.reference": {"previous", "sft", "initial"},
    "pairs.length_unit": {"chars", "tokens"},
    "pairs.source": {"dice", "offline"},
    "train.launcher": {"local", "torchrun", "deepspeed"},
    "train.alpha_mode": {"stable", "official"},
    "train.zero_stage": {0, 1, 2, 3, "auto"},
}
# Keys that take an integer or the word "auto".
_INT_OR_AUTO = {"train.zero_stage"}
# train.loss: the pair losses of kernels/losses.PAIR_LOSSES and the three with their own trainers
# (named here so that checking a config does not import torch; tests/test_train.py compares).
LOSSES = sorted(["dpo", "cdpo", "ipo", "hinge", "robust", "exo_pair", "bco_pair", "sppo_hard", "nca_pair",
                 "apo_zero", "apo_down", "discopop", "sigmoid_norm", "aot", "simpo"]) + ["alpha_dpo", "mrpo", "hpo"]
_REQUIRED = ["model.reference", "data.prompts", "data.eval_prompts", "data.offline_pairs"]
# Values given relative to a preset file ("./x", "../x") are resolved against the preset's folder.
_PATH_KEYS = {"model.policy", "model.reference", "data.prompts", "data.eval_prompts",
              "data.offline_pairs", "data.heldout_pairs", "run.dir", "train.hostfile"}
# Comma-separated lists of paths or hub ids, each entry resolved the same way.
_PATH_LIST_KEYS = {"train.mrpo_references", "train.mrpo_tokenizers"}
# Comma-separated lists of numbers that may also be given as one number or a YAML list of numbers.
_NUMBER_LIST_KEYS = {"train.hpo_reward_weights"}
_SOURCE_KEYS = ["model.policy", "model.reference", "data.prompts", "data.eval_prompts", "data.offline_pairs",
                "data.heldout_pairs"]
_RUN_NAME = re.compile(r"[A-Za-z0-9._-]+", re.ASCII)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", re.ASCII)


def _check_source(key: str, value: str) -> None:
    """A model or dataset is a local path or a hub id (`org/name`). A value that looks local must
    exist: /x, ./x, ../x, ~/x, a file name with a dataset suffix, or a path whose first part is a
    folder here (`assets/dpoo` when ./assets exists). A local model is a folder with its weights."""
    if not value:
        return
    path = Path(value).expanduser()
    if path.exists():
        if key.startswith("model.") or key == "train.mrpo_references":
            check_model_folder(key, path)
        return
    first = Path(value).parts[0] if Path(value).parts else ""
    local = (value.startswith(("/", ".", "~")) or path.suffix in {".jsonl", ".json", ".parquet"}
             or (len(Path(value).parts) > 1 and Path(first).is_dir()))
    if local or not _HUB_ID.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} does not exist (and is not a hub id)")


def check_model_folder(key: str, path: Path) -> None:
    """A local model folder has a config.json and its weights as safetensors (a pickled checkpoint
    is never loaded: it could run code)."""
    if not path.is_dir():
        raise ConfigError(f"{key}: {str(path)!r} is not a model folder")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {str(path)!r} has no config.json: not a model folder")
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ConfigError(f"{key}: {str(path)!r} holds only pickled weights ({', '.join(pickled[:3])}), which are never "
                          "loaded here: save the model with safetensors (model.save_pretrained(path), the default)")
    raise ConfigError(f"{key}: {str(path)!r} has no weights (*.safetensors)")


def _check_splits(flat: dict[str, Any]) -> None:
    """data.<name>_split / _config: only for a dataset that has splits (a hub id or a folder)."""
    from selfalign.tasks.data import is_single_file

    for key in _SOURCE_KEYS:
        if not key.startswith("data."):
            continue
        for part in ("split", "config"):
            value = flat[f"{key}_{part}"]
            if not value:
                continue
            if value != value.strip():
                raise ConfigError(f"{key}_{part}: {value!r} must not start or end with spaces")
            if not flat[key]:
                raise ConfigError(f"{key}_{part}: {value!r} is set but {key} is empty")
            if is_single_file(flat[key]):
                raise ConfigError(f"{key}_{part}: {value!r} applies to a hub id or a dataset folder, but {key} "
                                  f"{flat[key]!r} is a single file (one table, no {part}s)")


def _coerce(key: str, value: Any, typ: type) -> Any:
    if key in _INT_OR_AUTO:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected an integer or auto, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if typ is str:
        if key in _NUMBER_LIST_KEYS:
            value = _number_list_text(key, value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")


def _number_list_text(key: str, value: Any) -> Any:
    """A number (one weight) or a list of numbers, as the comma-separated text the key holds."""
    items = value if isinstance(value, list) else [value]
    if isinstance(value, str) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        if isinstance(value, list):
            raise ConfigError(f"{key}: expected numbers, got {value!r} (e.g. [1.0, 0.5] or \"1.0,0.5\")")
        return value
    return ",".join(str(v) for v in items)


def _build(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in fields(Config)}
    kwargs = {}
    for sname, svalues in raw.items():
        if sname not in sections:
            raise ConfigError(f"unknown config section {sname!r} (known: {', '.join(sections)})")
        if svalues is None:
            continue
        if not isinstance(svalues, dict):
            raise ConfigError(f"{sname}: expected a mapping, got {svalues!r}")
        cls = get_type_hints(Config)[sname]
        hints = get_type_hints(cls)
        values = {}
        for key, value in svalues.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {sname}.{key} (known in {sname}: {', '.join(hints)})")
            values[key] = _coerce(f"{sname}.{key}", value, hints[key])
        kwargs[sname] = cls(**values)
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    flat = cfg.flat()
    for key in _REQUIRED:
        if not flat[key]:
            raise ConfigError(f"{key} is required (a local path or a hub id)")
    for key in _SOURCE_KEYS:
        _check_source(key, flat[key])
    for model, _ in cfg.train.mrpo_reference_list():
        _check_source("train.mrpo_references", model)
    _check_splits(flat)
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {sorted(allowed, key=str)}")
    checks = [
        ("run.name", bool(_RUN_NAME.fullmatch(cfg.run.name)) and cfg.run.name not in (".", ".."),
         "must be letters, digits, '.', '_' or '-' (it names the run's folder under runs/), not '.' or '..'"),
        ("run.rounds", cfg.run.rounds >= 1, "must be >= 1"),
        ("run.seed", cfg.run.seed >= 0, "must be >= 0"),
        ("data.prompts_per_round", cfg.data.prompts_per_round >= 0, "must be >= 0 (0 = all)"),
        ("data.max_eval_prompts", cfg.data.max_eval_prompts >= 0, "must be >= 0 (0 = all)"),
        ("data.max_heldout_pairs", cfg.data.max_heldout_pairs >= 0, "must be >= 0 (0 = all)"),
        ("generate.k", cfg.generate.k >= 2, "must be >= 2 (best-vs-worst needs two samples)"),
        ("generate.temperature", cfg.generate.temperature > 0, "must be > 0 for sampling"),
        ("generate.top_p", 0 < cfg.generate.top_p <= 1, "must be in (0, 1]"),
        ("generate.max_tokens", cfg.generate.max_tokens >= 1, "must be >= 1"),
        ("generate.kv_cache_gib", cfg.generate.kv_cache_gib > 0, "must be > 0"),
        ("generate.gpu_memory_utilization", 0 < cfg.generate.gpu_memory_utilization <= 1, "must be in (0, 1]"),
        ("generate.tensor_parallel_size", cfg.generate.tensor_parallel_size >= 1, "must be >= 1"),
        ("generate.max_model_len", cfg.generate.max_model_len >= 0, "must be >= 0 (0 = the model's own limit)"),
        ("generate.shard_size", cfg.generate.shard_size >= 0, "must be >= 0 (0 = one shard)"),
        ("generate.shards", cfg.generate.shards >= 1, "must be >= 1"),
        ("generate.threads", cfg.generate.threads >= 0, "must be >= 0 (0 = the worker's cores)"),
        ("score.shards", cfg.score.shards >= 1, "must be >= 1"),
        ("score.batch_tokens", cfg.score.batch_tokens >= 1, "must be >= 1"),
        ("pairs.min_valid", 2 <= cfg.pairs.min_valid <= cfg.generate.k, f"must be in [2, generate.k={cfg.generate.k}]"),
        ("pairs.gamma", 0 <= cfg.pairs.gamma <= 1, "must be in [0, 1]"),
        ("pairs.alpha_step", cfg.pairs.alpha_step > 0, "must be > 0"),
        ("pairs.alpha_max", cfg.pairs.alpha_max >= 0, "must be >= 0"),
        ("pairs.alpha_min", cfg.pairs.alpha_min <= 0, "must be <= 0 (0 = one-sided, as DICE)"),
        ("pairs.budget", cfg.pairs.budget >= 0, "must be >= 0 (0 = DICE's replay rule)"),
        ("start.pairs", cfg.start.pairs >= 0, "must be >= 0 (0 = all offline pairs)"),
        ("start.epochs", cfg.start.epochs > 0, "must be > 0"),
        ("start.lr", cfg.start.lr >= 0, "must be >= 0 (0 = train.lr)"),
        ("pairs.min_chars", cfg.pairs.min_chars >= 0, "must be >= 0"),
        ("pairs.max_chars", cfg.pairs.max_chars > cfg.pairs.min_chars, f"must be > pairs.min_chars={cfg.pairs.min_chars}"),
        ("train.beta", cfg.train.beta > 0, "must be > 0"),
        ("train.rpo_alpha", cfg.train.rpo_alpha >= 0, "must be >= 0"),
        ("train.lr", cfg.train.lr > 0, "must be > 0"),
        ("train.weight_decay", cfg.train.weight_decay >= 0, "must be >= 0"),
        ("train.gamma_beta_ratio", cfg.train.gamma_beta_ratio >= 0, "must be >= 0"),
        ("train.alpha", cfg.train.alpha >= 0, "must be >= 0"),
        ("train.epochs", cfg.train.epochs > 0 or cfg.train.max_steps > 0, "must be > 0 (or set train.max_steps)"),
        ("train.max_steps", cfg.train.max_steps >= 0, "must be >= 0 (0 = use train.epochs)"),
        ("train.grad_clip", cfg.train.grad_clip >= 0, "must be >= 0"),
        ("train.threads", cfg.train.threads >= 0, "must be >= 0 (0 = cores / nproc)"),
        ("train.checkpoint_every", cfg.train.checkpoint_every >= 0, "must be >= 0 (0 = no checkpoints)"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.label_smoothing", 0 <= cfg.train.label_smoothing < 0.5, "must be in [0, 0.5)"),
        ("train.micro_batch_size", cfg.train.micro_batch_size >= 1, "must be >= 1"),
        ("train.nproc", cfg.train.nproc >= 1, "must be >= 1"),
        ("train.batch_size", cfg.train.micro_batch_size * cfg.train.nproc <= 0
         or cfg.train.batch_size % (cfg.train.micro_batch_size * cfg.train.nproc) == 0,
         f"must be a multiple of micro_batch_size * nproc = {cfg.train.micro_batch_size * cfg.train.nproc}"),
        ("train.master_port", 0 <= cfg.train.master_port < 65536, "must be in [0, 65535] (0 = a free port)"),
        ("guard.min_pair_accuracy", 0 <= cfg.guard.min_pair_accuracy <= 1, "must be in [0, 1]"),
        ("evaluate.samples", cfg.evaluate.samples >= 0, "must be >= 0"),
        ("evaluate.max_tokens", cfg.evaluate.max_tokens >= 0, "must be >= 0 (0 = generate.max_tokens)"),
        ("evaluate.judge_url", not cfg.evaluate.judge_url or cfg.evaluate.judge_url.startswith(("http://", "https://")),
         "must be an http(s) URL, or empty for no judge"),
        ("evaluate.judge_model", bool(cfg.evaluate.judge_model.strip()) or not cfg.evaluate.judge_url,
         "must name the judge's model when evaluate.judge_url is set"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {flat[key]!r} {why}")
    if cfg.evaluate.judge_api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.evaluate.judge_api_key_env):
        # Not echoed: a value that is no variable name may be the key itself, pasted by mistake.
        raise ConfigError("evaluate.judge_api_key_env must be the NAME of an environment variable holding the key "
                          "(letters, digits, _), not the key")
    t = cfg.train
    if t.loss not in LOSSES:
        raise ConfigError(f"train.loss: {t.loss!r} is not a known loss (known: {', '.join(LOSSES)})")
    if t.loss == "cdpo" and t.label_smoothing == 0:
        raise ConfigError("train.label_smoothing: 0.0 must be > 0 for train.loss=cdpo")
    _validate_mrpo_hpo(t)
    _validate_lora(t, cfg.model)
    _validate_tracking(cfg)
    if t.hostfile:
        _validate_hostfile(t)


def _validate_tracking(cfg: Config) -> None:
    """tracking.log_model and tracking.registered_model_name, against the store the run will use
    (tracking.uri, else MLFLOW_TRACKING_URI, else the run's own SQLite store)."""
    from selfalign.tasks.tracking import check_options, resolve_uri

    tr = cfg.tracking
    try:
        check_options(tr.log_model, tr.registered_model_name, resolve_uri(tr.uri, cfg.run_dir))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    c = cfg.continual
    if c.alias:
        if not re.fullmatch(r"[A-Za-z_][\w-]*", c.alias):
            raise ConfigError(f"continual.alias: {c.alias!r} must be an alias name such as champion")
        if not tr.registered_model_name or tr.log_model == "none":
            raise ConfigError(f"continual.alias: {c.alias!r} needs tracking.registered_model_name and tracking.log_model "
                              "(artifact or transformers): the alias names a registered version")
        if not c.metric.startswith("eval/"):
            raise ConfigError(f"continual.metric: {c.metric!r} must be a held-out metric of the round table (eval/...)")


def _validate_hostfile(t: TrainConfig) -> None:
    """Multi-node training: the deepspeed launcher, a well-formed hostfile, a batch that splits evenly."""
    from selfalign.tasks.train import HostfileError, read_hostfile

    if t.launcher != "deepspeed":
        raise ConfigError(f"train.hostfile: {t.hostfile!r} needs train.launcher=deepspeed (got {t.launcher!r})")
    try:
        hosts = read_hostfile(t.hostfile)
    except HostfileError as e:
        raise ConfigError(f"train.hostfile: {e}") from None
    world = sum(hosts.values())
    if t.batch_size % (t.micro_batch_size * world):
        raise ConfigError(f"train.batch_size: {t.batch_size} must be a multiple of micro_batch_size * the hostfile's "
                          f"slots = {t.micro_batch_size} * {world}")


def _validate_mrpo_hpo(t: TrainConfig) -> None:
    """Keys of the MRPO and HPO losses: checked only when that loss is selected."""
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"train.{key}: {getattr(t, key)!r} {why}")

    if t.loss == "mrpo":
        if not t.mrpo_reference_list():
            raise bad("mrpo_references", "must list at least one additional reference model for train.loss=mrpo "
                                         "(comma-separated paths or hub ids)")
        if t.mrpo_tokenizers.strip() and len(t.mrpo_tokenizers.split(",")) != len(t.mrpo_reference_list()):
            raise bad("mrpo_tokenizers", f"must give one entry (possibly empty) per reference in "
                                         f"train.mrpo_references ({len(t.mrpo_reference_list())})")
        if t.mrpo_convention not in ("code", "swapped"):
            raise bad("mrpo_convention", "is not one of ['code', 'swapped']")
        if t.mrpo_alpha > 1:
            raise bad("mrpo_alpha", "must be < 0 (adaptive) or in [0, 1]")
    if t.loss == "hpo":
        from selfalign.tasks.data import load_hook

        if not t.hpo_rewards.strip():
            raise bad("hpo_rewards", "must name at least one auxiliary reward package.module:function for "
                                     "train.loss=hpo (comma-separated)")
        n = len([h for h in t.hpo_rewards.split(",") if h.strip()])
        if t.hpo_reward_weights.strip():
            try:
                weights = [float(w) for w in t.hpo_reward_weights.split(",")]
            except ValueError:
                raise bad("hpo_reward_weights", "must be comma-separated numbers, one per reward in "
                                                f"train.hpo_rewards ({n}), e.g. {','.join(['1.0'] * n)!r}") from None
            if not all(math.isfinite(w) for w in weights):
                raise bad("hpo_reward_weights", "must be finite numbers")
            if len(weights) != n:
                raise bad("hpo_reward_weights", f"must give one weight per reward in train.hpo_rewards ({n}), "
                                                f"comma-separated (a single number only for a single reward)")
        for hook, _ in t.hpo_reward_list():
            try:
                load_hook(hook, "train.hpo_rewards")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        for key, ok, why in [("hpo_preference", t.hpo_preference in ("dpo", "kto"), "is not one of ['dpo', 'kto']"),
                             ("hpo_nll", t.hpo_nll in ("mean", "sum"), "is not one of ['mean', 'sum']"),
                             ("hpo_eta", t.hpo_eta > 0, "must be > 0"),
                             ("hpo_w_max", t.hpo_w_max > 0, "must be > 0"),
                             ("hpo_lambda", t.hpo_lambda >= 0, "must be >= 0"),
                             ("hpo_tau", 0 < t.hpo_tau < 1, "must be in (0, 1)"),
                             ("hpo_value_lr", t.hpo_value_lr > 0, "must be > 0")]:
            if not ok:
                raise bad(key, why)


_MODULE_NAME = re.compile(r"[A-Za-z_][\w.]*", re.ASCII)


def _validate_lora(t: TrainConfig, model: ModelConfig) -> None:
    """Keys of LoRA training: checked only when it is on. The training reference is always the
    start-of-round policy, which is the adapted model with its adapter disabled, so every loss works
    with LoRA. Module names are checked against model.policy when it is a local folder (built
    without its weights; every round's model has its architecture), else by the training worker."""
    if not t.lora_enabled:
        return

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"train.{key}: {getattr(t, key)!r} {why}")

    names = [m.strip() for m in t.lora_target_modules.split(",")]
    for key, ok, why in [("lora_r", t.lora_r >= 1, "must be >= 1"),
                         ("lora_alpha", t.lora_alpha > 0, "must be > 0"),
                         ("lora_dropout", 0 <= t.lora_dropout < 1, "must be in [0, 1)")]:
        if not ok:
            raise bad(key, why)
    if not any(names):
        raise bad("lora_target_modules", "must name at least one module (comma-separated, e.g. q_proj,v_proj) "
                                         "or be all-linear")
    if "all-linear" in names and len(names) > 1:
        raise bad("lora_target_modules", "all-linear already selects every linear layer: give it alone")
    for name in names:
        if name != "all-linear" and not _MODULE_NAME.fullmatch(name):
            raise bad("lora_target_modules", f"has {name!r}, which is not a module name (comma-separated names "
                                             f"such as q_proj,v_proj, or all-linear)")
    key, path = ("model.policy", model.policy) if model.policy else ("model.reference", model.reference)
    if (Path(path).expanduser() / "config.json").is_file():
        from selfalign.tasks.lora import check_lora_targets

        try:
            check_lora_targets(str(Path(path).expanduser()), t.lora_spec(), model.trust_remote_code)
        except ValueError as e:
            raise ConfigError(f"{e} ({key}: {path})") from None


def parse_override(arg: str) -> tuple[str, Any]:
    """`--section.key=value` -> ("section.key", value); the value is parsed as YAML (numbers, bools).
    `--section.group.key=value` is the grouped spelling of section.group_key."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like --section.key=value")
    key, _, text = arg[2:].partition("=")
    if key.count(".") == 2 and all(key.split(".")):
        section, group, name = key.split(".")
        key = f"{section}.{group}_{name}"
    if key.count(".") != 1:
        raise ConfigError(f"override key {key!r} must be section.key (or section.group.key)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    except RecursionError:
        raise ConfigError(f"override {key}: the value is nested too deeply") from None
    # A value like "1e-5" is a string to YAML 1.1; treat numeric-looking strings as numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key, value


def load_config(preset: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if preset is not None:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"preset file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"preset {str(path)!r} is not valid YAML: {e}") from None
        except RecursionError:
            raise ConfigError(f"preset {str(path)!r} is nested too deeply") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"preset {str(path)!r} must be a mapping of sections")
        base = path.resolve().parent
        raw = _resolve_paths(_flatten_groups(raw), base)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        if key.count(".") == 2:  # section.group.key, e.g. train.lora.r: the flat key train.lora_r
            section, group, name = key.split(".")
            key = f"{section}.{group}_{name}"
        if key.count(".") != 1:
            raise ConfigError(f"override key {key!r} must be section.key (or section.group.key)")
        section, name = key.split(".")
        sec = raw.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{section}: expected a mapping, got {sec!r}")
        sec[name] = value
    return _build(raw)


def _flatten_groups(raw: dict[str, Any]) -> dict[str, Any]:
    """A mapping inside a section is a group of keys sharing a prefix: `train: {lora: {r: 8}}` is
    `train.lora_r` (as `--train.lora.r=8` is on the command line)."""
    out = {}
    for section, sec in raw.items():
        if isinstance(sec, dict) and any(isinstance(v, dict) for v in sec.values()):
            flat: dict[str, Any] = {}
            for k, v in sec.items():
                if isinstance(v, dict):
                    flat.update({f"{k}_{name}": x for name, x in v.items()})
                else:
                    flat[k] = v
            sec = flat
        out[section] = sec
    return out


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    out = {s: dict(v) if isinstance(v, dict) else v for s, v in raw.items()}
    for key in _PATH_KEYS:
        s, k = key.split(".")
        value = out.get(s, {}).get(k) if isinstance(out.get(s), dict) else None
        if isinstance(value, str) and value.startswith(("./", "../")):
            out[s][k] = str((base / value).resolve())
    for key in _PATH_LIST_KEYS:
        s, k = key.split(".")
        value = out.get(s, {}).get(k) if isinstance(out.get(s), dict) else None
        if isinstance(value, str) and ("./" in value or "../" in value):
            items = [v.strip() for v in value.split(",")]
            out[s][k] = ",".join(str((base / v).resolve()) if v.startswith(("./", "../")) else v for v in items)
    return out


def from_dict(d: dict[str, Any]) -> Config:
    return _build(d)
