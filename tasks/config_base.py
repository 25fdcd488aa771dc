"""What every config section shares: the error, the parsing of YAML and command-line values into a
section's typed fields (Literal choices, lists, nested groups), the checks sections make in their
`__post_init__`, and the model section every stage reads. Imports nothing heavy: checking a config
must not start torch."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def check(key: str, value: Any, ok: bool, why: str) -> None:
    """`ConfigError("key: value why")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {value!r} {why}")


def check_choice(key: str, value: Any, typ: Any) -> None:
    """A value of a `Literal[...]` field is one of its choices."""
    allowed = get_args(typ)
    if isinstance(value, bool) or value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {sorted(allowed, key=str)}")


def check_choices(section: Any, prefix: str) -> None:
    """Every `Literal[...]` field of `section` holds one of its choices (for sections built in code)."""
    for name, typ in get_type_hints(type(section)).items():
        if get_origin(typ) is Literal:
            check_choice(f"{prefix}.{name}", getattr(section, name), typ)


def parse_section(cls: type, raw: Any, prefix: str) -> Any:
    """`cls(**raw)` with each value checked against its field's type; a mapping under a field whose
    type is a dataclass is that nested group. Unknown keys fail with the key named."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in hints:
            group, _, rest = str(key).partition("_")
            hint = f"{prefix}.{group}.{rest}? " if dataclasses.is_dataclass(hints.get(group)) and rest else ""
            raise ConfigError(f"unknown config key {prefix}.{key} ({hint}known in {prefix}: {', '.join(hints)})")
        values[key] = parse_value(f"{prefix}.{key}", value, hints[key])
    return cls(**values)


def parse_value(key: str, value: Any, typ: Any) -> Any:
    """One value, as its field's type takes it from YAML: numbers checked finite, bools strict, a
    list also as one item or comma-separated text."""
    if dataclasses.is_dataclass(typ):
        return parse_section(typ, value, key)
    origin = get_origin(typ)
    if origin is Literal:
        allowed = get_args(typ)
        numbers = [a for a in allowed if isinstance(a, int)]
        if numbers and (isinstance(value, bool) or not isinstance(value, int) and value not in allowed):
            words = "/".join(a for a in allowed if isinstance(a, str))
            raise ConfigError(f"{key}: expected an integer or {words}, got {value!r}")
        if not numbers and not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        check_choice(key, value, typ)
        return value
    if origin is list:
        (item,) = get_args(typ)
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        if isinstance(value, str):
            items = [v.strip() for v in items]
            if item is str:
                return [] if items == [""] else items
            try:
                items = [float(v) for v in items if v] if item is float else items
            except ValueError:
                raise ConfigError(f"{key}: {value!r} must be numbers, e.g. [1.0, 0.5] or \"1.0,0.5\"") from None
        try:
            return [parse_value(key, v, item) for v in items]
        except ConfigError:
            what = "numbers" if item is float else "strings"
            raise ConfigError(f"{key}: expected {what}, got {value!r} (e.g. {'[1.0, 0.5]' if item is float else '[a, b]'})") \
                from None
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
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")


def flatten(section: Any, prefix: str) -> dict[str, Any]:
    """A section's values by dotted key (`train.lora.r`), nested groups spelled out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out |= flatten(value, f"{prefix}.{f.name}")
        else:
            out[f"{prefix}.{f.name}"] = value
    return out


def digest(values: Any) -> str:
    """A short stable hash of JSON-able values (a stage key's config part, rows of a table)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()[:16]


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", re.ASCII)


def check_source(key: str, value: str, model: bool = False) -> None:
    """A model or dataset is a local path or a hub id (`org/name`). A value that looks local must
    exist: /x, ./x, ../x, ~/x, a file name with a dataset suffix, or a path whose first part is a
    folder here (`assets/dpoo` when ./assets exists). A local model is a folder with its weights."""
    if not value:
        return
    path = Path(value).expanduser()
    if path.exists():
        if model:
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


@dataclass
class ModelConfig:
    policy: str = ""               # pi_0: the DPO model the rounds start from (path or hub id); empty: round 0
                                   # trains pi_0 = DPO(model.reference, offline pairs) first (see `start`)
    reference: str = ""            # the model pi_0 was DPO-trained against (usually the SFT model)
    dtype: Literal["float32", "bfloat16"] = "float32"  # of training, scoring and generation
    trust_remote_code: bool = False  # run a model's own code from its folder (off: only transformers' classes)

    def __post_init__(self) -> None:
        check_choices(self, "model")
        for name in ("policy", "reference"):
            check_source(f"model.{name}", getattr(self, name), model=True)

    def settings(self) -> dict[str, Any]:
        """What a stage's engine reads of the model section besides the model itself; part of every
        stage key."""
        return {"model.dtype": self.dtype, "model.trust_remote_code": self.trust_remote_code}
