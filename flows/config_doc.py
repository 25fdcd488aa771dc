"""The config reference: every key with its type, default and meaning, read from the typed config
itself (the sections' dataclasses, composed in flows/config.py, and the comment written beside each
field; a nested group's fields as `section.group.key`), so there is
one place to change. `selfalign config` prints it; docs/config.md is its Markdown form, and
tests/test_config_doc.py checks that the file is current."""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
from typing import Any, get_origin, get_type_hints

from selfalign.flows.config import Config

_FIELD = re.compile(r"    (\w+):")


def field_help(cls: type) -> dict[str, str]:
    """name -> the comment beside the field, continuation lines (comments indented past the
    field's column) joined. A comment block at the fields' own column heads a group: fields with no
    comment of their own take it, until a blank line."""
    src = inspect.getsource(cls)
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip())
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    out: dict[str, str] = {}
    current, group = None, ""
    for row, line in enumerate(src.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("def ", "@")):
            current, group = None, ""
        elif (m := _FIELD.match(line)) and not stripped.startswith("#"):
            current = m.group(1)
            out[current] = comments[row][1] if row in comments else group
        elif stripped.startswith("#") and current is not None and comments[row][0] > 4:
            out[current] = f"{out[current]} {comments[row][1]}".strip()
        elif stripped.startswith("#"):
            group = f"{group} {comments[row][1]}".strip() if current is None else comments[row][1]
            current = None
    return out


def _type_name(t: Any) -> str:
    if get_origin(t) is not None:  # list[str], Literal['a', 'b']: with their items or choices
        return str(t).replace("typing.", "")
    return getattr(t, "__name__", None) or str(t)


def _rows(cls: type, prefix: str) -> list[dict[str, str]]:
    helps, hints = field_help(cls), get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += _rows(hints[f.name], f"{prefix}.{f.name}")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append({"key": f"{prefix}.{f.name}", "type": _type_name(hints[f.name]), "default": repr(default),
                     "help": helps.get(f.name, "")})
    return rows


def reference() -> list[dict[str, str]]:
    """One row per key: section.key (section.group.key in a group), type, default, meaning."""
    hints = get_type_hints(Config)
    return [row for section in dataclasses.fields(Config) for row in _rows(hints[section.name], section.name)]


def as_text(rows: list[dict[str, str]]) -> str:
    width = max(len(r["key"]) for r in rows)
    return "\n".join(f"{r['key']:<{width}}  {r['type']} = {r['default']}\n{'':<{width}}  {r['help']}".rstrip()
                     for r in rows)


def as_markdown(rows: list[dict[str, str]]) -> str:
    lines = ["# Configuration reference", "",
             "Every key of a run's config: its type, default and meaning. A preset (YAML) lists only what differs",
             "from these defaults; `--section.key=value` overrides any key on the command line. Generated from",
             "the sections' dataclasses by `selfalign config --markdown > docs/config.md`; do not edit by hand.", ""]
    section = None
    for r in rows:
        s = r["key"].split(".")[0]
        if s != section:
            section = s
            lines += ["", f"## {s}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        cell = r["help"].replace("|", "\\|")
        lines.append(f"| `{r['key']}` | {r['type']} | `{r['default']}` | {cell} |")
    return "\n".join(lines) + "\n"
