"""Datasets in, token ids out: loading prompts and preference pairs, and the one place where the chat
template is applied, so generation, scoring and training see exactly the same token sequences."""
from __future__ import annotations

from typing import Any


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
    """A dataset row is malformed; the message names the source, the row and the field."""


def _read_rows(source: str) -> list[dict[str, Any]]:
    """Rows of a local JSONL/JSON/Parquet file, or of a `datasets` hub id (split `train`)."""
    import json
    from pathlib import Path

    path = Path(source)
    if path.is_file():
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        rows = []
        with open(path, "rb") as fh:
            raw = fh.read()
        if not raw.strip():
            raise DataError(f"{source}: the file is empty")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(f"{source}: row {line}: invalid UTF-8 at byte {e.start}") from None
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: row {i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{source}: row {i}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
    if path.suffix in {".jsonl", ".json", ".parquet"} or source.startswith((".", "/")):
        raise DataError(f"{source}: no such file")
    import datasets

    return list(datasets.load_dataset(source, split="train"))


def _text(source: str, i: int, row: dict[str, Any], field: str, role: str) -> str:
    """A field as plain text: a string (TRL standard format) or a list of chat messages whose last
    message has the expected role (TRL conversational format)."""
    if field not in row:
        raise DataError(f"{source}: row {i}: missing field {field!r}")
    v = row[field]
    if isinstance(v, list):
        if not v or not isinstance(v[-1], dict) or v[-1].get("role") != role:
            raise DataError(f"{source}: row {i}: field {field!r} is a message list whose last message is not {role!r}")
        if role == "user" and len(v) > 1:
            raise DataError(f"{source}: row {i}: field {field!r}: multi-turn prompts are not supported yet")
        v = v[-1].get("content")
    if not isinstance(v, str):
        raise DataError(f"{source}: row {i}: field {field!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise DataError(f"{source}: row {i}: field {field!r} is empty")
    return v


def _rows_with_ids(source: str):
    """(row number, id, row) for every row; ids default to the row number and must be unique."""
    seen: dict[str, int] = {}
    for i, row in enumerate(_read_rows(source), 1):
        pid = str(row.get("id", f"row{i}"))
        if pid in seen:
            raise DataError(f"{source}: row {i}: duplicate id {pid!r} (first at row {seen[pid]})")
        seen[pid] = i
        yield i, pid, row


def load_prompts(source: str) -> list[dict[str, str]]:
    """Prompt rows {id, prompt}."""
    rows = [{"id": pid, "prompt": _text(source, i, row, "prompt", "user")} for i, pid, row in _rows_with_ids(source)]
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def load_pairs(source: str) -> list[dict[str, str]]:
    """Preference rows {id, prompt, chosen, rejected} in TRL standard or conversational format."""
    rows = []
    for i, pid, row in _rows_with_ids(source):
        out = {"id": pid, "prompt": _text(source, i, row, "prompt", "user")}
        for f in ("chosen", "rejected"):
            out[f] = _text(source, i, row, f, "assistant")
        if out["chosen"] == out["rejected"]:
            raise DataError(f"{source}: row {i}: chosen and rejected are identical")
        rows.append(out)
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
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
    if not sep or not mod or not fn:
        raise ValueError(f"{key}: {spec!r} must look like package.module:function")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}: cannot load {spec!r}: {e}") from None
    if not callable(obj):
        raise ValueError(f"{key}: {spec!r} is not callable")
    return obj
