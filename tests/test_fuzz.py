"""Property tests: whatever bytes, rows, presets or overrides come in, the data loaders raise only
DataError and the config loader only ConfigError (or they succeed, with what they promise)."""
import json
from dataclasses import fields
from typing import get_type_hints

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfalign.flows.config import Config, ConfigError, load_config
from selfalign.tasks.data import BadRow, DataError, load_pairs, load_prompts
from selfalign.tasks.toy import build_tokenizer

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TOK = build_tokenizer()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def check_rows(rows, pairs):
    """What a successful load promises: non-empty text fields, unique ids, chosen != rejected."""
    assert rows and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert isinstance(r["id"], str) and r["id"].strip()
        for f in ("prompt", "chosen", "rejected") if pairs else ("prompt",):
            assert isinstance(r[f], str) and r[f].strip()
        if pairs:
            assert r["chosen"] != r["rejected"]


def load_both_ways(path, pairs, **kw):
    """Load with on_bad_row=error and =skip: the same rows when nothing is bad; a bad row stops
    the first and is counted by the second; a bad file stops both."""
    load = load_pairs if pairs else load_prompts
    try:
        strict = load(path, **kw)
    except BadRow:
        strict = None
    except DataError:
        strict = "file"
    skipped = {}
    try:
        lenient = load(path, on_bad_row="skip", skipped=skipped, **kw)
    except BadRow:
        raise AssertionError("a bad row escaped on_bad_row=skip")
    except DataError:
        lenient = None
    if isinstance(strict, list):
        assert lenient == strict and skipped == {}
    if strict == "file":
        assert lenient is None
    if lenient is not None:
        check_rows(lenient, pairs)
    return lenient, skipped


# a byte soup biased towards JSON-looking lines
json_ish = st.lists(st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"", b" ", b"\r", b"{", b"}", b"[]", b"null", b"3", b'"x"', b"\xff\xfe", b"\xef\xbb\xbf",
                     b'{"prompt": "q"}', b'{"prompt": "q", "chosen": "a", "rejected": "b"}',
                     b'{"id": 1, "prompt": "q", "chosen": "a", "rejected": "a"}', b'{"prompt": "\\ud800"}',
                     b'{"prompt": [{"role": "user", "content": "q"}]}', b"[" * 3000])),
    max_size=8).map(b"\n".join)


@FAST
@given(raw=json_ish, pairs=st.booleans(), suffix=st.sampled_from([".jsonl", ".json", ".parquet"]))
def test_arbitrary_bytes_as_a_dataset_file(work, raw, pairs, suffix):
    path = work / f"bytes{suffix}"
    path.write_bytes(raw)
    load_both_ways(str(path), pairs)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "tool"]) | json_values,
                                              "content": st.text(max_size=30) | json_values})
field_value = st.one_of(st.text(max_size=80), st.sampled_from(["", " ", "q", "a", "b"]), st.lists(message, max_size=3),
                        json_values)
row = st.one_of(
    st.fixed_dictionaries({}, optional={"id": st.integers(0, 3) | st.sampled_from(["a", "b", "", "row1"]) | json_values,
                                        "prompt": field_value, "chosen": field_value, "rejected": field_value,
                                        "other": json_values}),
    json_values)


@FAST
@given(rows=st.lists(row, max_size=6), pairs=st.booleans(), max_len=st.sampled_from([0, 24, 128]))
def test_arbitrary_json_rows(work, rows, pairs, max_len):
    path = work / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lenient, skipped = load_both_ways(str(path), pairs, tokenizer=TOK, max_len=max_len)
    if lenient is not None:
        assert len(lenient) + sum(skipped.values()) == len(rows)


SECTIONS = {name: [f.name for f in fields(cls)] for name, cls in get_type_hints(Config).items()}
KEYS = [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]
BASE = {"model.policy": "org/pi0", "model.reference": "org/sft", "data.prompts": "p", "data.eval_prompts": "e",
        "data.offline_pairs": "o"}
scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.integers(), st.floats(), st.text(max_size=16),
                   st.sampled_from(["dpo", "ipo", "skip", "chars", "./x", "/nope", "org/name", "1e-5", ".nan", "~"]))


@FAST
@given(values=st.dictionaries(st.sampled_from(KEYS + ["train.nope", "nope.key", "run"]), scalar, max_size=5))
def test_arbitrary_values_for_config_keys(values):
    try:
        cfg = load_config(None, BASE | values)
    except ConfigError:
        return
    assert cfg.generate.k >= 2 and 0 <= cfg.pairs.gamma <= 1 and cfg.train.beta > 0 and cfg.train.lr > 0


yaml_doc = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(list(SECTIONS) + [k.split(".")[1] for k in KEYS] + ["x"]) | st.text(max_size=6), inner, max_size=4),
    max_leaves=10)
yaml_text = st.one_of(
    yaml_doc.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.text(max_size=80),
    st.lists(st.sampled_from(["run:", "  rounds: 2", "train: {beta: -1}", "- x", "a: [", "&a x", "*b", "!!python/object:os.system {}",
                              "\t", "model: ~", "? [a]", "x: " + "[" * 1000, "data:", "  prompts: ./p.jsonl", "%YAML 1.1", "---", "...", "'"]),
             max_size=6).map("\n".join),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")))


@FAST
@given(text=yaml_text, raw_bytes=st.booleans())
def test_arbitrary_yaml_presets(work, text, raw_bytes):
    preset = work / "preset.yaml"
    if raw_bytes:
        preset.write_bytes(text.encode("latin-1", errors="replace"))
    else:
        preset.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(preset, BASE)
    except ConfigError:
        pass


override = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"--{k}={v}", st.sampled_from(KEYS + ["a.b.c", ".", "train.", ".beta", ""]),
              st.text(max_size=20) | st.sampled_from(["1e999", ".inf", "-.nan", "[1, 2", "{a: 1}", "~", "yes", "0x1f",
                                                     "1_000", "2001-12-14", "!!binary aGk=", "&a [*a]", "[" * 1000])))


@FAST
@given(args=st.lists(override, max_size=4))
def test_arbitrary_override_strings(work, args):
    preset = work / "base.yaml"
    raw = {}
    for key, value in BASE.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    preset.write_text(yaml.safe_dump(raw))
    try:
        load_config(preset, args)
    except ConfigError:
        pass
