"""The run's configuration, composed of the stages' own sections (each a typed dataclass beside its
stage in tasks/, checked in its own `__post_init__`) and the flow's (run, start, guard, continual).
YAML presets list only what differs; dotted command-line overrides (`--train.beta=0.2`,
`--train.lora.r=8`) change any key. Unknown keys and bad values fail at load time with the key and
the value in the message. This module holds only the checks that span sections."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from selfalign.tasks.cluster_config import ClusterConfig
from selfalign.tasks.config_base import ConfigError, ModelConfig, check, digest, flatten, parse_section
from selfalign.tasks.data_config import DataConfig
from selfalign.tasks.evaluate_config import EvaluateConfig
from selfalign.tasks.generate_config import GenerateConfig
from selfalign.tasks.pairs_config import PairsConfig
from selfalign.tasks.score_config import ScoreConfig
from selfalign.tasks.tracking import TrackingConfig
from selfalign.tasks.train_config import TrainConfig

_RUN_NAME = re.compile(r"[A-Za-z0-9._-]+", re.ASCII)


@dataclass
class RunConfig:
    name: str = "selfalign"        # run name: MLflow run name and default run directory
    dir: str = ""                  # run directory; default runs/<name>
    rounds: int = 2                # DICE rounds (the paper runs 2)
    seed: int = 0                  # seeds sampling, pair mixing and training (round r uses seed + r)
    keep_old_models: bool = True   # a round model trained again (its config or inputs changed) first moves
                                   # aside to model.before-<time>; false: replaced

    def __post_init__(self) -> None:
        check("run.name", self.name, bool(_RUN_NAME.fullmatch(self.name)) and self.name not in (".", ".."),
              "must be letters, digits, '.', '_' or '-' (it names the run's folder under runs/), not '.' or '..'")
        check("run.rounds", self.rounds, self.rounds >= 1, "must be >= 1")
        check("run.seed", self.seed, self.seed >= 0, "must be >= 0")


@dataclass
class StartConfig:
    # pi_0 from an SFT model: with model.policy empty, round 0 trains pi_0 on the offline pairs with
    # model.reference as its reference, through the training stage (train.* apply, except these).
    pairs: int = 0                 # offline pairs pi_0 trains on (0 = all of them)
    epochs: float = 1.0            # passes over them
    lr: float = 0.0                # learning rate (0 = train.lr)

    def __post_init__(self) -> None:
        check("start.pairs", self.pairs, self.pairs >= 0, "must be >= 0 (0 = all offline pairs)")
        check("start.epochs", self.epochs, self.epochs > 0, "must be > 0")
        check("start.lr", self.lr, self.lr >= 0, "must be >= 0 (0 = train.lr)")


@dataclass
class ContinualConfig:
    # Continual bootstrapping, for scheduled runs: each run starts from the model a registered-model
    # alias names, on training prompts no earlier run of the chain used, in a fresh folder
    # <run dir>/<time>, and moves the alias to its final model only if that beats the start model.
    alias: str = ""                # alias of tracking.registered_model_name (e.g. champion); "" = off
    metric: str = "eval/preferred_rate"  # the held-out metric that decides the promotion (higher is better)
    margin: float = 0.0            # promote when final - start > margin on that metric

    def __post_init__(self) -> None:
        if self.alias:
            check("continual.alias", self.alias, bool(re.fullmatch(r"[A-Za-z_][\w-]*", self.alias)),
                  "must be an alias name such as champion")
            check("continual.metric", self.metric, self.metric.startswith("eval/"),
                  "must be a held-out metric of the round table (eval/...)")


@dataclass
class GuardConfig:
    min_pair_accuracy: float = 0.6  # stop before training if the scoring reward ranks held-out pairs worse

    def __post_init__(self) -> None:
        check("guard.min_pair_accuracy", self.min_pair_accuracy, 0 <= self.min_pair_accuracy <= 1, "must be in [0, 1]")


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
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every key by its dotted name (`train.lora.r`), as MLflow logs the run's params."""
        return {k: v for f in dataclasses.fields(self) for k, v in flatten(getattr(self, f.name), f.name).items()}

    def section_hash(self, *sections: str) -> str:
        return digest({s: dataclasses.asdict(getattr(self, s)) for s in sections})


_REQUIRED = ["model.reference", "data.prompts", "data.eval_prompts", "data.offline_pairs"]
# Values given relative to a preset file ("./x", "../x") are resolved against the preset's folder;
# the list keys entry by entry.
_PATH_KEYS = {"model.policy", "model.reference", "data.prompts", "data.eval_prompts",
              "data.offline_pairs", "data.heldout_pairs", "run.dir", "train.hostfile",
              "train.mrpo.references", "train.mrpo.tokenizers"}


def validate(cfg: Config) -> None:
    """The checks that span sections (each section checked its own keys when it was built)."""
    flat = cfg.flat()
    for key in _REQUIRED:
        if not flat[key]:
            raise ConfigError(f"{key} is required (a local path or a hub id)")
    check("pairs.min_valid", cfg.pairs.min_valid, cfg.pairs.min_valid <= cfg.generate.k,
          f"must be in [2, generate.k={cfg.generate.k}]")
    if cfg.train.lora.enabled:
        _check_lora_targets(cfg.train, cfg.model)
    _check_tracking(cfg)


def _check_lora_targets(t: TrainConfig, model: ModelConfig) -> None:
    """LoRA's module names, against model.policy when it is a local folder (built without its
    weights; every round's model has its architecture), else by the training worker."""
    key, path = ("model.policy", model.policy) if model.policy else ("model.reference", model.reference)
    if (Path(path).expanduser() / "config.json").is_file():
        from selfalign.tasks.lora import check_lora_targets

        try:
            check_lora_targets(str(Path(path).expanduser()), t.lora.spec(), model.trust_remote_code)
        except ValueError as e:
            raise ConfigError(f"{e} ({key}: {path})") from None


def _check_tracking(cfg: Config) -> None:
    """tracking.log_model and tracking.registered_model_name, against the store the run will use
    (tracking.uri, else MLFLOW_TRACKING_URI, else the run's own SQLite store); a continual chain's
    alias, which names a registered version."""
    from selfalign.tasks.tracking import check_options, resolve_uri

    tr = cfg.tracking
    try:
        check_options(tr.log_model, tr.registered_model_name, resolve_uri(tr.uri, cfg.run_dir))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    c = cfg.continual
    if c.alias and (not tr.registered_model_name or tr.log_model == "none"):
        raise ConfigError(f"continual.alias: {c.alias!r} needs tracking.registered_model_name and tracking.log_model "
                          "(artifact or transformers): the alias names a registered version")


def parse_override(arg: str) -> tuple[str, Any]:
    """`--section.key=value` (or `--section.group.key=value`) -> ("section.key", value); the value is
    parsed as YAML (numbers, bools, lists)."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like --section.key=value")
    key, _, text = arg[2:].partition("=")
    if "." not in key or not all(key.split(".")):
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
        _resolve_paths(raw, path.resolve().parent)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        *groups, name = key.split(".")
        if not groups or not all(key.split(".")):
            raise ConfigError(f"override key {key!r} must be section.key (or section.group.key)")
        node, where = raw, []
        for g in groups:
            where.append(g)
            node = node.setdefault(g, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(where)}: expected a mapping, got {node!r}")
        node[name] = value
    return _build(raw)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Path values of a preset, in place: "./x" and "../x" relative to the preset's folder."""
    def resolve(v: Any) -> Any:
        return str((base / v).resolve()) if isinstance(v, str) and v.strip().startswith(("./", "../")) else v

    for key in _PATH_KEYS:
        *groups, name = key.split(".")
        node = raw
        for g in groups:
            node = node.get(g) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            continue
        value = node[name]
        if isinstance(value, list):
            node[name] = [resolve(v) for v in value]
        elif isinstance(value, str) and "," in value:
            node[name] = [resolve(v.strip()) for v in value.split(",")]
        else:
            node[name] = resolve(value)


def _build(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    sections = get_type_hints(Config)
    for name in raw:
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r} (known: {', '.join(sections)})")
    cfg = Config(**{name: parse_section(sections[name], value, name) for name, value in raw.items()})
    validate(cfg)
    return cfg


def from_dict(d: dict[str, Any]) -> Config:
    return _build(d)
