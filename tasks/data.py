"""Datasets in, token ids out: loading prompts and preference pairs, and the one place where the chat
template is applied, so generation, scoring and training see exactly the same token sequences.
Over 400 lines for one job: every reader (JSONL, JSON, Parquet, datasets) meets the same row checks
here, so a bad row is named the same way (file, row, field) whichever dataset holds it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from selfalign.tasks.config_base import ModelConfig


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a single-turn user prompt rendered with the model's chat template, ending with
    the generation prompt (the assistant header), exactly what vLLM is given."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Token ids of a response as the model emits it: the text's tokens followed by EOS (the
    end-of-turn token), which is scored and trained like any other response token."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id]


class DataError(ValueError):
    """A dataset is unusable; the message names the source and, for a bad row, the row and the field."""


class BadRow(DataError):
    """One malformed row. `reason` is the category under which `data.on_bad_row: skip` counts it:
    invalid_utf8, bad_json, not_object, missing_field, not_string, empty, bad_roles, bad_id,
    identical, duplicate_id, too_long."""

    def __init__(self, source: str, row: int, reason: str, message: str, field: str = ""):
        where = f"row {row}, field {field!r}" if field else f"row {row}"
        super().__init__(f"{source}: {where}: {message}")
        self.reason, self.row, self.field = reason, row, field


ON_BAD_ROW = ("error", "skip")
_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", dict: "an object",
          list: "a list", bytes: "bytes"}


def _kind(v: Any) -> str:
    return _KINDS.get(type(v), type(v).__name__)


def is_single_file(source: str) -> bool:
    """A local JSONL/JSON/Parquet file (or a name that can only mean one): one table, no splits."""
    path = Path(source)
    return path.is_file() or (not path.is_dir() and path.suffix in {".jsonl", ".json", ".parquet"})


def source_label(source: str, split: str = "", config: str = "") -> str:
    """How messages name a dataset: the path or hub id, with the config and split when chosen."""
    picked = ", ".join(x for x in (f"config {config!r}" if config else "", f"split {split!r}" if split else "") if x)
    return f"{source} ({picked})" if picked else source


def _read_rows(source: str, split: str = "", config: str = "") -> list[tuple[int, Any]]:
    """(row number, value) of every row of a local JSONL/JSON/Parquet file, a local `datasets`
    folder or a `datasets` hub id. For the last two, `split` picks the split ("" = `train`; a hub id
    or a folder `load_dataset` reads also takes slices such as `test[:500]`) and `config` the
    dataset's configuration (its subset name; "" = the default). A single file has neither. A value
    is the parsed row, or a BadRow when the row could not even be parsed. JSONL rows are numbered by
    line, the others from 1."""
    path = Path(source)
    if not source:
        raise DataError("no dataset given (empty path)")
    if is_single_file(source) and (split or config):
        raise DataError(f"{source}: a single file has no splits or configs (split {split!r}, config {config!r} "
                        "apply to a dataset folder or a hub id)")
    if path.is_file():
        if path.suffix == ".parquet":
            return _read_parquet(source, path)
        return _read_json(source, path.read_bytes(), path.suffix == ".json")
    if path.is_dir():
        return _read_datasets(source, path, split, config)
    if path.suffix in {".jsonl", ".json", ".parquet"} or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file")
    return _read_datasets(source, None, split, config)


def _read_json(source: str, raw: bytes, whole_document: bool) -> list[tuple[int, Any]]:
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the data
    if not raw.strip():
        raise DataError(f"{source}: the file is empty" if not raw else f"{source}: the file has only blank lines")
    if whole_document:  # a .json file is a list of objects, a single object, or JSON Lines
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            pass
        else:
            if isinstance(doc, dict):
                return [(1, doc)]
            if not isinstance(doc, list):
                raise DataError(f"{source}: expected a list of JSON objects, got {_kind(doc)}")
            return list(enumerate(doc, 1))
    rows: list[tuple[int, Any]] = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append((i, BadRow(source, i, "invalid_utf8", f"invalid UTF-8 at byte {e.start + 1} of the line")))
            continue
        try:
            rows.append((i, json.loads(text)))
        except json.JSONDecodeError as e:
            rows.append((i, BadRow(source, i, "bad_json", f"not valid JSON ({e.msg} at column {e.colno})")))
        except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits
            rows.append((i, BadRow(source, i, "bad_json", f"not valid JSON ({type(e).__name__}: {e})")))
    return rows


def _read_parquet(source: str, path: Path) -> list[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{source}: not a readable Parquet file ({e})") from None
    if table.num_rows == 0:
        raise DataError(f"{source}: the file is empty (no rows)")
    return list(enumerate(table.to_pylist(), 1))


def _read_datasets(source: str, folder: Path | None, split: str = "", config: str = "") -> list[tuple[int, Any]]:
    """A folder written by `Dataset.save_to_disk`, a folder `load_dataset` can read (per-split
    Parquet/JSONL files, say), or a hub id; `split` and `config` as in `_read_rows`."""
    import datasets

    label = source_label(source, split, config)
    saved = folder is not None and ((folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file())
    try:
        if saved:
            if config:
                raise DataError(f"{label}: a folder written by save_to_disk has no configs; leave the config empty")
            ds = datasets.load_from_disk(str(folder))
        else:
            ds = datasets.load_dataset(source, config or None, split=split or "train")
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        if isinstance(e, DataError):
            raise
        what = "folder" if folder is not None else "not a local file; as a `datasets` hub id it"
        raise DataError(f"{label}: {what} cannot be loaded ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        want = split or "train"
        if want not in ds:
            raise DataError(f"{label}: the dataset has no {want!r} split (splits: {', '.join(ds)})")
        ds = ds[want]
    elif saved and split:
        raise DataError(f"{label}: the folder holds a single Dataset, not splits; leave the split empty")
    return list(enumerate(ds, 1))


def _string(source: str, i: int, field: str, v: Any) -> str:
    if not isinstance(v, str):
        raise BadRow(source, i, "not_string", f"must be a string, got {_kind(v)}", field)
    if not v.strip():
        raise BadRow(source, i, "empty", "is empty or whitespace only", field)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(source, i, "invalid_utf8", "contains a lone surrogate, not encodable as UTF-8", field) from None
    return v


def _text(source: str, i: int, row: dict[str, Any], field: str, role: str) -> str:
    """A field as plain text: a string (TRL standard format) or a list of exactly one chat message
    of the given role (TRL conversational format); multi-turn prompts are not supported."""
    if field not in row:
        raise BadRow(source, i, "missing_field", "missing", field)
    v = row[field]
    if not isinstance(v, list):
        return _string(source, i, field, v)
    if len(v) != 1:
        n = f"{len(v)} messages" if v else "no messages"
        raise BadRow(source, i, "bad_roles", f"has {n}; expected a single {role!r} message", field)
    m = v[0]
    if not isinstance(m, dict):
        raise BadRow(source, i, "bad_roles", f"message 1 is {_kind(m)}, not an object with 'role' and 'content'", field)
    if m.get("role") != role:
        raise BadRow(source, i, "bad_roles", f"message 1 has role {m.get('role')!r}, expected {role!r}", field)
    if "content" not in m:
        raise BadRow(source, i, "missing_field", "missing", f"{field}[0].content")
    return _string(source, i, f"{field}[0].content", m["content"])


def _row_id(source: str, i: int, row: dict[str, Any]) -> str:
    """The row's `id` (a string or an integer); rows without one are named by their row number."""
    v = row.get("id")
    if v is None:
        return f"row{i}"
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise BadRow(source, i, "bad_id", f"must be a string or an integer, got {_kind(v)}", "id")
    if isinstance(v, str):
        _string(source, i, "id", v)
    return str(v)


def _check_length(source: str, i: int, row: dict[str, str], tokenizer: Any, max_len: int) -> None:
    """The prompt (with the chat template) must leave room to generate within the model's context;
    a pair's prompt + response must fit in it whole, as scoring and training see it."""
    n = len(encode_prompt(tokenizer, row["prompt"]))
    if n >= max_len:
        raise BadRow(source, i, "too_long", f"{n} tokens with the chat template; the model's context is {max_len}", "prompt")
    for f in ("chosen", "rejected"):
        if f in row:
            m = n + len(encode_response(tokenizer, row[f]))
            if m > max_len:
                raise BadRow(source, i, "too_long", f"prompt + response is {m} tokens; the model's context is {max_len}", f)


def _load(source: str, parse, on_bad_row: str, skipped: dict[str, int] | None, tokenizer: Any,
          max_len: int, split: str = "", config: str = "") -> list[dict[str, str]]:
    """Rows {id, **parse(i, row)}. A bad row raises its BadRow (on_bad_row=error) or is dropped and
    counted by reason into `skipped` (on_bad_row=skip). Of rows sharing an id, the first good one is
    kept. A source with no good row is an error either way. Messages name the source with its config
    and split (`source_label`)."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row: {on_bad_row!r} is not one of {ON_BAD_ROW}")
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    counts: dict[str, int] = {}
    read = _read_rows(source, split, config)
    source = source_label(source, split, config)
    for i, value in read:
        try:
            if isinstance(value, BadRow):
                raise value
            if not isinstance(value, dict):
                raise BadRow(source, i, "not_object", f"expected a JSON object, got {_kind(value)}")
            out = {"id": _row_id(source, i, value), **parse(i, value)}
            if tokenizer is not None and max_len > 0:
                _check_length(source, i, out, tokenizer, max_len)
            if out["id"] in seen:
                raise BadRow(source, i, "duplicate_id", f"duplicate id {out['id']!r} (first at row {seen[out['id']]})", "id")
        except BadRow as e:
            if on_bad_row == "error":
                raise
            counts[e.reason] = counts.get(e.reason, 0) + 1
            continue
        seen[out["id"]] = i
        rows.append(out)
    if skipped is not None:
        skipped.update(counts)
    if not rows:
        why = ", ".join(f"{r}: {n}" for r, n in sorted(counts.items()))
        raise DataError(f"{source}: no usable rows" + (f" (all {sum(counts.values())} are bad: {why})" if counts else ""))
    return rows


def load_prompts(source: str, *, on_bad_row: str = "error", skipped: dict[str, int] | None = None,
                 tokenizer: Any = None, max_len: int = 0, split: str = "", config: str = "") -> list[dict[str, str]]:
    """Prompt rows {id, prompt}. With a tokenizer and the model's context length `max_len`, prompts
    that leave no room to generate are bad rows too. `split`/`config`: see `_read_rows`."""
    name = source_label(source, split, config)
    return _load(source, lambda i, row: {"prompt": _text(name, i, row, "prompt", "user")},
                 on_bad_row, skipped, tokenizer, max_len, split, config)


def load_pairs(source: str, *, on_bad_row: str = "error", skipped: dict[str, int] | None = None,
               tokenizer: Any = None, max_len: int = 0, split: str = "", config: str = "") -> list[dict[str, str]]:
    """Preference rows {id, prompt, chosen, rejected} in TRL standard or conversational format
    (explicit prompt, or implicit: chosen/rejected conversations sharing the prompt turn).
    `split`/`config`: see `_read_rows`."""
    source_path, source = source, source_label(source, split, config)

    def parse(i: int, row: dict[str, Any]) -> dict[str, str]:
        c, r = row.get("chosen"), row.get("rejected")
        if "prompt" not in row and isinstance(c, list) and isinstance(r, list) and len(c) > 1:
            if c[:-1] != r[:-1]:
                raise BadRow(source, i, "bad_roles", "implicit prompt: the turns before the last differ from 'chosen'",
                             "rejected")
            row = {"prompt": c[:-1], "chosen": c[-1:], "rejected": r[-1:]}
        out = {"prompt": _text(source, i, row, "prompt", "user")}
        for f in ("chosen", "rejected"):
            out[f] = _text(source, i, row, f, "assistant")
        if out["chosen"] == out["rejected"]:
            raise BadRow(source, i, "identical", "identical to 'chosen'", "rejected")
        return out

    return _load(source_path, parse, on_bad_row, skipped, tokenizer, max_len, split, config)


def context_length(model: str, max_model_len: int = 0, trust_remote_code: bool = False) -> int:
    """Tokens the model can attend to: `generate.max_model_len` when set, else the policy config's
    `max_position_embeddings` (0 when the config names none: then lengths are not checked)."""
    if max_model_len > 0:
        return max_model_len
    n = None if trust_remote_code else _positions_in_config_file(model)
    if n is not None:
        return n
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).get_text_config()
    return int(getattr(conf, "max_position_embeddings", 0) or 0)


def _positions_in_config_file(model: str) -> int | None:
    """`max_position_embeddings` as written in a local model's config.json, when that file is a plain
    text model's (no nested sub-config, where a multimodal model keeps its text model's); None
    otherwise, and the config class decides (AutoConfig: its import alone takes ~1.5 s, as it pulls
    in torch and transformers' generation code, which a check of the datasets does not need)."""
    try:
        raw = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or any(isinstance(v, dict) and k.endswith("config") for k, v in raw.items()):
        return None
    n = raw.get("max_position_embeddings")
    return n if type(n) is int and n >= 0 else None


DATASETS = {"prompts": load_prompts, "eval_prompts": load_prompts, "offline_pairs": load_pairs,
            "heldout_pairs": load_pairs}


@dataclass
class Datasets:
    """The run's four datasets (config keys data.<name>), validated against the policy's tokenizer
    and context; `skipped[name]` counts, per reason, the rows dropped under data.on_bad_row=skip."""
    prompts: list[dict[str, str]]
    eval_prompts: list[dict[str, str]]
    offline_pairs: list[dict[str, str]]
    heldout_pairs: list[dict[str, str]]
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    findings: dict[str, int] = field(default_factory=dict)  # `overlaps`: what the data warnings count

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, counts in self.skipped.items():
            out[f"data/rows_{name}"] = len(getattr(self, name))
            out[f"data/skipped_{name}"] = sum(counts.values())
            out |= {f"data/skipped_{name}/{reason}": n for reason, n in counts.items()}
        return out | {f"data/{k}": n for k, n in self.findings.items()}

    def warning(self) -> str:
        """One line naming what was skipped and what the data checks found, or "" when nothing."""
        parts = [f"data.{name}: {sum(c.values())} ({', '.join(f'{r} {n}' for r, n in sorted(c.items()))})"
                 for name, c in self.skipped.items() if c]
        lines = [("data.on_bad_row=skip dropped bad rows: " + "; ".join(parts))] if parts else []
        found = findings_text(self.findings)
        return "\n".join(lines + ([found] if found else []))


FINDINGS = {
    "duplicate_prompts": "{n} prompt(s) of data.prompts repeat an earlier prompt's text (trained twice)",
    "reused_prompts": "data.prompts has too few prompts for data.prompts_per_round x run.rounds: {n} draw(s) "
                      "reuse a prompt of an earlier round",
    "eval_in_train": "{n} eval prompt(s) of data.eval_prompts also appear in data.prompts or data.offline_pairs",
    "heldout_in_offline": "{n} held-out pair(s) of data.heldout_pairs share their prompt with data.offline_pairs",
}


def findings_text(findings: dict[str, int]) -> str:
    return "; ".join(FINDINGS[k].format(n=n) for k, n in findings.items() if n)


def overlaps(data: "Datasets", per_round: int, rounds: int) -> dict[str, int]:
    """What the data checks count (texts compared with their whitespace collapsed): duplicate training
    prompts, prompt draws that repeat an earlier round's (fresh slices of `per_round` over `rounds`),
    eval prompts seen in training, held-out pairs whose prompt an offline pair has."""
    def norm(text: str) -> str:
        return " ".join(text.split())

    train = [norm(p["prompt"]) for p in data.prompts]
    offline = {norm(p["prompt"]) for p in data.offline_pairs}
    seen_train = set(train) | offline
    draws = rounds * min(per_round, len(train)) if per_round else 0
    return {
        "duplicate_prompts": len(train) - len(set(train)),
        "reused_prompts": max(0, draws - len(train)),
        "eval_in_train": sum(norm(p["prompt"]) in seen_train for p in data.eval_prompts),
        "heldout_in_offline": sum(norm(p["prompt"]) in offline for p in data.heldout_pairs),
    }


_loaded: dict[str, Datasets] = {}


def load_data(cfg: Any) -> Datasets:
    """All datasets of the run, loaded and checked before any stage starts. The rounds and the
    evaluation call this again; the result is reused while the config and the files are unchanged."""
    d = cfg.data
    sources = {name: getattr(d, name) for name in DATASETS}
    stamps = {name: _stamp(s) for name, s in sources.items()}
    model = cfg.model.policy or cfg.model.reference  # pi_0 trained from the SFT model keeps its tokenizer
    key = json.dumps([cfg.section_hash("data"), model, cfg.model.trust_remote_code,
                      cfg.generate.max_model_len, cfg.run.rounds, stamps])
    if key in _loaded:
        return _loaded[key]
    tokenizer = load_tokenizer(model, cfg.model.trust_remote_code)
    max_len = context_length(model, cfg.generate.max_model_len, cfg.model.trust_remote_code)
    rows: dict[str, list[dict[str, str]]] = {}
    skipped: dict[str, dict[str, int]] = {}
    for name, source in sources.items():
        if not source:  # only data.heldout_pairs is optional (the config requires the others)
            rows[name] = []
            continue
        skipped[name] = {}
        rows[name] = DATASETS[name](source, on_bad_row=d.on_bad_row, skipped=skipped[name],
                                    tokenizer=tokenizer, max_len=max_len, split=getattr(d, f"{name}_split"),
                                    config=getattr(d, f"{name}_config"))
    data = Datasets(**rows, skipped=skipped)
    data.findings = overlaps(data, d.prompts_per_round, cfg.run.rounds)
    if d.strict and any(data.findings.values()):
        raise DataError(f"data.strict: {findings_text(data.findings)}")
    _loaded.clear()
    _loaded[key] = data
    return data


def _stamp(source: str) -> str:
    try:
        st = os.stat(source)
    except (OSError, ValueError):  # a hub id, or not there (the loader names it)
        return source
    return f"{source}:{st.st_size}:{st.st_mtime_ns}"


class ModelError(ValueError):
    """A model of the run cannot be used; the message names its config key."""


def check_tokenizers(m: ModelConfig, extra: Sequence[tuple[str, str]] = ()) -> None:
    """Loads the tokenizer of every model the run starts from that `load_data` did not: the reference
    (when it is not the policy) and those of `extra` ((config key, path), e.g. the MRPO references').
    ModelError names the key of the first that does not load."""
    seen = {m.policy or m.reference}
    models = [("model.reference", m.reference), *extra]
    for key, path in models:
        if path in seen:
            continue
        seen.add(path)
        try:
            load_tokenizer(path, m.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelError(f"{key}: the tokenizer of {path!r} does not load: {str(e).splitlines()[0]}") from None


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a chat template and a pad token (the end-of-sequence token when it
    has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.chat_template is None:
        raise DataError(f"{path}: the tokenizer has no chat template")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_hook(spec: str, key: str):
    """Resolve a user hook named `package.module:function` (config key `key` for errors)."""
    import importlib

    mod, sep, fn = spec.partition(":")
    if not sep or not all(part.isidentifier() for part in mod.split(".")) or not fn.isidentifier():
        raise ValueError(f"{key}: {spec!r} must look like package.module:function")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}: cannot load {spec!r}: {e}") from None
    if not callable(obj):
        raise ValueError(f"{key}: {spec!r} is not callable")
    return obj
