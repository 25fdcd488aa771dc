"""Dataset loading: TRL standard and conversational rows from JSONL, JSON, Parquet and `datasets`
folders; every class of bad row named by file, row and field (or dropped and counted under
data.on_bad_row=skip); lengths checked against the model's context before any stage starts."""
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfalign.tasks.data import (DataError, context_length, encode_prompt, load_data, load_hook, load_pairs,
                                  load_prompts)
from selfalign.tasks.toy import build_tokenizer

P = {"id": "a", "prompt": "What is 1 + 2?"}
Q = {"id": "a", "prompt": "What is 1 + 2?", "chosen": "1 plus 2 is 3. Happy to help!", "rejected": "3"}
LOADERS = {"prompts": load_prompts, "pairs": load_pairs}


def write(path, rows):
    """Rows as JSONL (dicts are dumped, bytes written as they are) or as a Parquet table."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_standard_and_conversational_formats(tmp_path):
    conv = {"id": "x", "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    implicit = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    want = {"prompt": "q", "chosen": "a", "rejected": "b"}
    for suffix in (".jsonl", ".parquet"):
        assert load_pairs(write(tmp_path / f"std{suffix}", [{"prompt": "q", "chosen": "a", "rejected": "b"}])) == [{"id": "row1"} | want]
        assert load_pairs(write(tmp_path / f"conv{suffix}", [conv])) == [{"id": "x"} | want]
        assert load_pairs(write(tmp_path / f"implicit{suffix}", [implicit])) == [{"id": "row1"} | want]
    assert load_prompts(write(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "q"}]}])) == [{"id": "row1", "prompt": "q"}]


def test_json_files_blank_lines_and_byte_order_mark(tmp_path):
    arr = tmp_path / "rows.json"
    arr.write_text(json.dumps([P, {"id": 7, "prompt": "r"}], indent=2))
    assert load_prompts(str(arr)) == [P, {"id": "7", "prompt": "r"}]
    one = tmp_path / "one.json"
    one.write_text(json.dumps(P, indent=2))
    assert load_prompts(str(one)) == [P]
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name
    lines.write_text(json.dumps(P) + "\n" + json.dumps({"prompt": "r"}) + "\n")
    assert [r["id"] for r in load_prompts(str(lines))] == ["a", "row2"]
    # rows are numbered by line, blank lines included; default ids follow the same numbers
    gaps = tmp_path / "gaps.jsonl"
    gaps.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "q"}\n\n  \r\n{"prompt": "r"}\r\n{"prompt": ""}\n')
    with pytest.raises(DataError, match="gaps.jsonl: row 5, field 'prompt'"):
        load_prompts(str(gaps))
    assert [r["id"] for r in load_prompts(str(gaps), on_bad_row="skip")] == ["row1", "row4"]
    not_list = tmp_path / "scalar.json"
    not_list.write_text("3")
    with pytest.raises(DataError, match="expected a list of JSON objects, got a number"):
        load_prompts(str(not_list))


# (case, kind, bad row, field named in the error or None, reason, what the message says)
# The bad row follows one good row, so it is row 2.
CASES = [
    ("missing prompt", "prompts", {"id": "b", "text": "q"}, "prompt", "missing_field", "missing"),
    ("missing rejected", "pairs", {"id": "b", "prompt": "q", "chosen": "a"}, "rejected", "missing_field", "missing"),
    ("empty prompt", "prompts", {"id": "b", "prompt": ""}, "prompt", "empty", "empty or whitespace"),
    ("whitespace prompt", "prompts", {"id": "b", "prompt": " \t\n"}, "prompt", "empty", "empty or whitespace"),
    ("whitespace pair prompt", "pairs", Q | {"id": "b", "prompt": "  "}, "prompt", "empty", "empty or whitespace"),
    ("empty chosen", "pairs", Q | {"id": "b", "chosen": ""}, "chosen", "empty", "empty or whitespace"),
    ("whitespace rejected", "pairs", Q | {"id": "b", "rejected": "\n "}, "rejected", "empty", "empty or whitespace"),
    ("number prompt", "prompts", {"id": "b", "prompt": 3}, "prompt", "not_string", "must be a string, got a number"),
    ("null prompt", "prompts", {"id": "b", "prompt": None}, "prompt", "not_string", "must be a string, got null"),
    ("dict prompt", "prompts", {"id": "b", "prompt": {"text": "q"}}, "prompt", "not_string", "must be a string, got an object"),
    ("number chosen", "pairs", Q | {"id": "b", "chosen": 3.5}, "chosen", "not_string", "must be a string, got a number"),
    ("null rejected", "pairs", Q | {"id": "b", "rejected": None}, "rejected", "not_string", "must be a string, got null"),
    ("dict chosen", "pairs", Q | {"id": "b", "chosen": {"text": "a"}}, "chosen", "not_string", "must be a string, got an object"),
    ("bool prompt", "prompts", {"id": "b", "prompt": True}, "prompt", "not_string", "must be a string, got a boolean"),
    ("chosen == rejected", "pairs", Q | {"id": "b", "rejected": Q["chosen"]}, "rejected", "identical", "identical to 'chosen'"),
    ("duplicate prompt id", "prompts", P | {"prompt": "other"}, "id", "duplicate_id", "duplicate id 'a' (first at row 1)"),
    ("duplicate pair id", "pairs", Q | {"prompt": "other"}, "id", "duplicate_id", "duplicate id 'a' (first at row 1)"),
    ("id is an object", "prompts", {"id": {"x": 1}, "prompt": "q"}, "id", "bad_id", "must be a string or an integer"),
    ("id is empty", "pairs", Q | {"id": " "}, "id", "empty", "empty or whitespace"),
    ("prompt too long", "prompts", {"id": "b", "prompt": "x" * 100}, "prompt", "too_long", "the model's context is 64"),
    ("pair prompt too long", "pairs", Q | {"id": "b", "prompt": "x" * 100}, "prompt", "too_long", "the model's context is 64"),
    ("response too long", "pairs", Q | {"id": "b", "chosen": "y" * 60}, "chosen", "too_long", "prompt + response is"),
    ("prompt from the assistant", "prompts", {"id": "b", "prompt": [{"role": "assistant", "content": "q"}]},
     "prompt", "bad_roles", "message 1 has role 'assistant', expected 'user'"),
    ("multi-turn prompt", "pairs", Q | {"id": "b", "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
     "prompt", "bad_roles", "has 2 messages; expected a single 'user' message"),
    ("chosen from the user", "pairs", Q | {"id": "b", "chosen": [{"role": "user", "content": "a"}]},
     "chosen", "bad_roles", "message 1 has role 'user', expected 'assistant'"),
    ("no messages", "pairs", Q | {"id": "b", "rejected": []}, "rejected", "bad_roles", "has no messages"),
    ("message not an object", "prompts", {"id": "b", "prompt": ["q"]}, "prompt", "bad_roles", "message 1 is str"),
    ("message without role", "prompts", {"id": "b", "prompt": [{"content": "q"}]}, "prompt", "bad_roles", "has role None"),
    ("message without content", "prompts", {"id": "b", "prompt": [{"role": "user"}]}, "prompt[0].content", "missing_field", "missing"),
    ("implicit prompts differ", "pairs", {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                          "rejected": [{"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}]},
     "rejected", "bad_roles", "implicit prompt"),
    # rows that are not even a JSON object (JSONL only)
    ("invalid UTF-8", "prompts", b'{"prompt": "caf\xe9"}', None, "invalid_utf8", "invalid UTF-8 at byte 16 of the line"),
    ("invalid UTF-8 pair", "pairs", b'{"prompt": "q", "chosen": "\xff", "rejected": "b"}', None, "invalid_utf8", "invalid UTF-8"),
    ("lone surrogate", "prompts", b'{"prompt": "\\ud800"}', "prompt", "invalid_utf8", "lone surrogate"),
    ("malformed JSON", "prompts", b'{"prompt": "q"', None, "bad_json", "not valid JSON"),
    ("malformed JSON pair", "pairs", b'{"prompt": "q", chosen: "a"}', None, "bad_json", "not valid JSON"),
    ("huge integer", "prompts", b'{"prompt": ' + b"9" * 5000 + b"}", None, "bad_json", "not valid JSON"),
    ("JSON list", "prompts", b'["q"]', None, "not_object", "expected a JSON object, got a list"),
    ("JSON string", "pairs", b'"q"', None, "not_object", "expected a JSON object, got str"),
    ("JSON number", "pairs", b"3", None, "not_object", "expected a JSON object, got a number"),
]
# Parquet has one type per column: a column of another type or one missing from the file makes the
# first row bad; Arrow fills a struct's missing field with null.
PARQUET_ALONE = {"missing prompt", "missing rejected", "number prompt", "dict prompt", "number chosen", "dict chosen",
                 "bool prompt", "id is an object", "message not an object", "message without role", "implicit prompts differ"}
PARQUET_AS = {"message without content": ("prompt[0].content", "not_string", "got null")}
ROLES = {"prompt": "user", "chosen": "assistant", "rejected": "assistant"}


def bad_file(tmp_path, case, kind, bad, suffix):
    good = P if kind == "prompts" else Q
    rows = [good, bad]
    if suffix == ".parquet":
        # a column holds either text or messages: the good row takes the bad row's shape
        good = {k: [{"role": ROLES[k], "content": v}] if isinstance(bad.get(k), list) else v for k, v in good.items()}
        rows = [bad] if case in PARQUET_ALONE else [good, bad]
    return write(tmp_path / f"{kind}{suffix}", rows), len(rows)


@pytest.mark.parametrize("suffix, case, kind, bad, field, reason, says",
                         [pytest.param(sfx, *c, id=f"{sfx[1:]}: {c[0]}") for sfx in (".jsonl", ".parquet")
                          for c in CASES if sfx == ".jsonl" or not isinstance(c[2], bytes)])
def test_every_bad_row_is_named_or_skipped(tmp_path, tok, suffix, case, kind, bad, field, reason, says):
    path, n = bad_file(tmp_path, case, kind, bad, suffix)
    if suffix == ".parquet":
        field, reason, says = PARQUET_AS.get(case, (field, reason, says))
    load = LOADERS[kind]
    with pytest.raises(DataError) as e:
        load(path, tokenizer=tok, max_len=64)
    where = f"{path}: row {n}, field {field!r}: " if field else f"{path}: row {n}: "
    assert str(e.value).startswith(where) and says in str(e.value), str(e.value)
    assert e.value.reason == reason
    skipped = {}
    if n == 1:  # the only row is bad: skipping leaves nothing, which is an error too
        with pytest.raises(DataError, match=f"no usable rows \\(all 1 are bad: {reason}: 1\\)"):
            load(path, on_bad_row="skip", skipped=skipped, tokenizer=tok, max_len=64)
    else:
        rows = load(path, on_bad_row="skip", skipped=skipped, tokenizer=tok, max_len=64)
        assert [r["id"] for r in rows] == ["a"] and skipped == {reason: 1}


@pytest.mark.parametrize("kind", ["prompts", "pairs"])
def test_bad_files(tmp_path, kind):
    load = LOADERS[kind]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        load(str(empty))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\t\r\n")
    with pytest.raises(DataError, match="blank.jsonl: the file has only blank lines"):
        load(str(blank), on_bad_row="skip")
    no_rows = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), no_rows)
    with pytest.raises(DataError, match="empty.parquet: the file is empty"):
        load(str(no_rows))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        load(str(broken))
    for missing in ("missing.jsonl", "missing.parquet", "./nothing_here"):
        with pytest.raises(DataError, match="no such file"):
            load(str(tmp_path / missing) if not missing.startswith(".") else missing)
    with pytest.raises(DataError, match="no dataset given"):
        load("")


def test_skip_counts_every_reason_and_keeps_the_first_of_duplicate_ids(tmp_path, tok):
    rows = [P, b"{oops", {"id": "b", "prompt": ""}, {"id": "a", "prompt": "again"}, {"id": "c", "prompt": "x" * 100},
            {"id": "d", "prompt": 4}, {"id": "e", "prompt": "fine"}, {"id": "b", "prompt": "now good"}]
    path = write(tmp_path / "mixed.jsonl", rows)
    skipped = {}
    out = load_prompts(path, on_bad_row="skip", skipped=skipped, tokenizer=tok, max_len=64)
    # "b" was bad at row 3, so its good row 8 is the first good one and is kept
    assert out == [P, {"id": "e", "prompt": "fine"}, {"id": "b", "prompt": "now good"}]
    assert skipped == {"bad_json": 1, "empty": 1, "duplicate_id": 1, "too_long": 1, "not_string": 1}
    with pytest.raises(DataError, match="mixed.jsonl: row 2: not valid JSON"):
        load_prompts(path)
    with pytest.raises(ValueError, match="on_bad_row: 'drop'"):
        load_prompts(path, on_bad_row="drop")


def test_datasets_folders_and_hub_ids(tmp_path):
    import datasets

    rows = [P, {"id": "b", "prompt": "q"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(str(tmp_path / "saved")) == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    assert load_prompts(str(tmp_path / "dict")) == rows
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match="no 'train' split"):
        load_prompts(str(tmp_path / "no_train"))
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "train.jsonl", [P, {"id": "b", "prompt": " "}])
    with pytest.raises(DataError, match="row 2, field 'prompt': is empty"):
        load_prompts(str(folder))
    with pytest.raises(DataError, match="empty_folder: folder cannot be loaded"):
        (tmp_path / "empty_folder").mkdir()
        load_prompts(str(tmp_path / "empty_folder"))
    # no hub here (HF_HUB_OFFLINE): a hub id that cannot be fetched is named, not a traceback
    with pytest.raises(DataError, match="^nobody/no-such-dataset: not a local file; as a `datasets` hub id it cannot be loaded"):
        load_pairs("nobody/no-such-dataset")


def split_folder(root, fmt):
    """A dataset laid out as on the hub: per-split files (train/test), and a second config (`tiny`)
    declared in the README's YAML header, as `datasets.load_dataset` reads a hub repository."""
    root.mkdir()
    (root / "data").mkdir()
    (root / "tiny").mkdir()
    ext = ".parquet" if fmt == "parquet" else ".jsonl"
    train = [Q | {"id": f"tr{i}", "rejected": str(i)} for i in range(3)]
    test = [Q | {"id": f"te{i}", "rejected": str(10 + i)} for i in range(2)]
    write(root / "data" / f"train-00000-of-00001{ext}", train)
    write(root / "data" / f"test-00000-of-00001{ext}", test)
    write(root / "tiny" / f"test{ext}", [Q | {"id": "tiny0"}])
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  default: true\n  data_files:\n"
        f"  - split: train\n    path: data/train-*{ext}\n  - split: test\n    path: data/test-*{ext}\n"
        f"- config_name: tiny\n  data_files:\n  - split: test\n    path: tiny/test{ext}\n---\n")
    return str(root)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_splits_and_configs_of_a_dataset_folder(tmp_path, fmt):
    """A local folder goes through `datasets.load_dataset` exactly as a hub id does (nothing is
    downloaded: HF_HUB_OFFLINE is set for the tests)."""
    folder = split_folder(tmp_path / "uf", fmt)
    assert [r["id"] for r in load_pairs(folder)] == ["tr0", "tr1", "tr2"]  # default: split train
    assert [r["id"] for r in load_pairs(folder, split="train")] == ["tr0", "tr1", "tr2"]
    assert [r["id"] for r in load_pairs(folder, split="test")] == ["te0", "te1"]
    assert [r["id"] for r in load_pairs(folder, split="train[:2]")] == ["tr0", "tr1"]
    assert [r["id"] for r in load_pairs(folder, split="test", config="tiny")] == ["tiny0"]
    assert [r["prompt"] for r in load_prompts(folder, split="test")] == [Q["prompt"]] * 2
    with pytest.raises(DataError, match=r"uf \(split 'validation'\): folder cannot be loaded .*validation"):
        load_pairs(folder, split="validation")
    with pytest.raises(DataError, match=r"uf \(config 'nope', split 'test'\): folder cannot be loaded"):
        load_pairs(folder, split="test", config="nope")
    # a bad row is named with the split it is in
    bad = split_folder(tmp_path / "bad", fmt)
    write(Path(bad) / "data" / f"test-00000-of-00001{'.parquet' if fmt == 'parquet' else '.jsonl'}",
          [Q, Q | {"id": "b", "chosen": "3", "rejected": "3"}])
    with pytest.raises(DataError, match=r"bad \(split 'test'\): row 2, field 'rejected': identical"):
        load_pairs(bad, split="test")


def test_splits_of_saved_folders_and_single_files(tmp_path):
    import datasets

    rows = [P, {"id": "b", "prompt": "q"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(tmp_path / "dict"))
    assert load_prompts(str(tmp_path / "dict"), split="test") == rows[1:]
    assert load_prompts(str(tmp_path / "dict")) == rows[:1]
    with pytest.raises(DataError, match=r"dict \(split 'dev'\): the dataset has no 'dev' split \(splits: train, test\)"):
        load_prompts(str(tmp_path / "dict"), split="dev")
    with pytest.raises(DataError, match="written by save_to_disk has no configs"):
        load_prompts(str(tmp_path / "dict"), split="test", config="x")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match="holds a single Dataset, not splits"):
        load_prompts(str(tmp_path / "one"), split="test")
    f = write(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match="a single file has no splits or configs"):
        load_prompts(f, split="test")


def test_split_keys_reach_the_loaders(tmp_path, tiny_model):
    from selfalign.flows.config import ConfigError, load_config

    folder = split_folder(tmp_path / "uf", "parquet")
    prompts = write(tmp_path / "prompts.jsonl", [P])
    base = {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": prompts,
            "data.eval_prompts": folder, "data.offline_pairs": folder, "data.heldout_pairs": folder,
            "data.eval_prompts_split": "test", "data.heldout_pairs_split": "test",
            "data.offline_pairs_split": "train[1:]"}
    data = load_data(load_config(None, base))
    assert [r["id"] for r in data.offline_pairs] == ["tr1", "tr2"]
    assert [r["id"] for r in data.heldout_pairs] == ["te0", "te1"]
    assert [r["id"] for r in data.eval_prompts] == ["te0", "te1"]
    data = load_data(load_config(None, base | {"data.heldout_pairs_config": "tiny"}))
    assert [r["id"] for r in data.heldout_pairs] == ["tiny0"]
    # checked at load time: only a dataset with splits takes them
    for key, value, says in [
            ("data.prompts_split", "test", "data.prompts_split: 'test' applies to a hub id or a dataset folder, "
                                           f"but data.prompts {prompts!r} is a single file"),
            ("data.prompts_config", "x", "data.prompts_config: 'x' applies to a hub id or a dataset folder"),
            ("data.heldout_pairs_split", " test", "data.heldout_pairs_split: ' test' must not start or end with spaces")]:
        with pytest.raises(ConfigError) as e:
            load_config(None, base | {key: value})
        assert says in str(e.value)
    with pytest.raises(ConfigError, match="data.heldout_pairs_split: 'test' is set but data.heldout_pairs is empty"):
        load_config(None, base | {"data.heldout_pairs": ""})


def test_context_length_and_load_data(tmp_path, tiny_model):
    from selfalign.flows.config import load_config

    assert context_length(tiny_model) == 128 and context_length(tiny_model, 40) == 40
    long = "What is 1 + 2? " * 8
    Q = {"id": "a", "prompt": "What is 1 + 2?", "chosen": "It is 3.", "rejected": "3"}  # fits in 40 tokens
    files = {"prompts": write(tmp_path / "prompts.jsonl", [P, {"id": "b", "prompt": long}]),
             "eval_prompts": write(tmp_path / "eval.parquet", [{"id": "e", "prompt": "What is 2 + 2?"}]),
             "offline_pairs": write(tmp_path / "offline.jsonl", [Q, Q | {"id": "b", "rejected": "4"}])}
    base = {"model.policy": tiny_model, "model.reference": tiny_model} | {f"data.{k}": v for k, v in files.items()}
    n = len(encode_prompt(load_tokenizer_of(tiny_model), long))
    assert 40 < n < 128
    data = load_data(load_config(None, base))
    assert len(data.prompts) == 2 and data.heldout_pairs == [] and data.warning() == ""
    assert load_data(load_config(None, base)) is data  # reused while config and files are unchanged
    with pytest.raises(DataError, match=f"prompts.jsonl: row 2, field 'prompt': {n} tokens with the chat template; "
                                        "the model's context is 40"):
        load_data(load_config(None, base | {"generate.max_model_len": 40}))
    identical = Q | {"id": "c", "chosen": "3"}
    base["data.offline_pairs"] = write(tmp_path / "offline2.jsonl", [Q, Q | {"id": "b", "rejected": "4"}, identical])
    data = load_data(load_config(None, base | {"generate.max_model_len": 40, "data.on_bad_row": "skip"}))
    assert [p["id"] for p in data.prompts] == ["a"] and [p["id"] for p in data.offline_pairs] == ["a", "b"]
    assert data.metrics() == {"data/rows_prompts": 1, "data/skipped_prompts": 1, "data/skipped_prompts/too_long": 1,
                              "data/rows_eval_prompts": 1, "data/skipped_eval_prompts": 0,
                              "data/rows_offline_pairs": 2, "data/skipped_offline_pairs": 1,
                              "data/skipped_offline_pairs/identical": 1, "data/duplicate_prompts": 0,
                              "data/reused_prompts": 0, "data/eval_in_train": 0, "data/heldout_in_offline": 0}
    assert data.warning() == ("data.on_bad_row=skip dropped bad rows: data.prompts: 1 (too_long 1); "
                              "data.offline_pairs: 1 (identical 1)")


def test_data_checks_warn_count_and_stop_under_strict(tmp_path, tiny_model):
    """Duplicate prompts, prompts reused across rounds, eval prompts seen in training and held-out
    pairs on offline pairs' prompts: counted (MLflow data/*), warned in one line, and an error
    naming them under data.strict."""
    from selfalign.flows.config import load_config

    other = {"id": "c", "prompt": "What is 5 + 5?"}
    files = {"prompts": write(tmp_path / "prompts.jsonl", [P, P | {"id": "b", "prompt": " What is  1 + 2? "}, other]),
             "eval_prompts": write(tmp_path / "eval.jsonl", [other | {"id": "e"}, {"id": "f", "prompt": "What is 9 + 9?"}]),
             "offline_pairs": write(tmp_path / "offline.jsonl", [Q]),
             "heldout_pairs": write(tmp_path / "heldout.jsonl", [Q | {"id": "h"}])}
    base = {"model.policy": tiny_model, "model.reference": tiny_model, "run.rounds": 2,
            "data.prompts_per_round": 2} | {f"data.{k}": v for k, v in files.items()}
    data = load_data(load_config(None, base))
    assert data.findings == {"duplicate_prompts": 1, "reused_prompts": 1, "eval_in_train": 1, "heldout_in_offline": 1}
    assert {k: v for k, v in data.metrics().items() if k in ("data/duplicate_prompts", "data/eval_in_train")} == {
        "data/duplicate_prompts": 1, "data/eval_in_train": 1}
    warning = data.warning()
    assert "1 prompt(s) of data.prompts repeat" in warning and "1 draw(s) reuse a prompt" in warning
    assert "1 eval prompt(s) of data.eval_prompts also appear" in warning and "1 held-out pair(s)" in warning
    with pytest.raises(DataError, match=r"^data.strict: 1 prompt\(s\) of data.prompts repeat"):
        load_data(load_config(None, base | {"data.strict": True}))
    clean = load_data(load_config(None, base | {"data.prompts_per_round": 0, "data.heldout_pairs": ""}))
    assert clean.findings["reused_prompts"] == 0 and clean.findings["heldout_in_offline"] == 0


def test_a_model_whose_tokenizer_does_not_load_stops_the_run_named(tmp_path, tiny_model, monkeypatch, capsys):
    from selfalign.flows import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "prepare_environment", lambda run_dir: None)
    sft = tmp_path / "sft"  # weights and config, but no tokenizer files
    sft.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model) / f, sft / f)
    files = {"prompts": write(tmp_path / "p.jsonl", [P]), "eval_prompts": write(tmp_path / "e.jsonl", [P]),
             "offline_pairs": write(tmp_path / "o.jsonl", [Q])}
    args = [f"--data.{k}={v}" for k, v in files.items()]
    demo = str(Path(__file__).resolve().parents[1] / "deploy" / "presets" / "demo.yaml")
    assert cli.main(["run", demo, "--model.policy=" + tiny_model, f"--model.reference={sft}", *args]) == 2
    assert capsys.readouterr().err.startswith(f"model error: model.reference: the tokenizer of '{sft}' does not load")
    # an MRPO reference is named by its key too, the reference itself being fine
    assert cli.main(["run", demo, f"--model.policy={tiny_model}", f"--model.reference={tiny_model}", *args,
                     "--train.loss=mrpo", f"--train.mrpo.references={sft}"]) == 2
    assert capsys.readouterr().err.startswith(f"model error: train.mrpo.references: the tokenizer of '{sft}'")


def load_tokenizer_of(path):
    from selfalign.tasks.data import load_tokenizer

    return load_tokenizer(path)


class Recorder:
    def __init__(self):
        self.metrics, self.status, self.tags = {}, None, {}

    def log_params(self, params):
        pass

    def set_tag(self, key, value):
        self.tags[key] = value

    def log_metrics(self, metrics, step=None):
        self.metrics |= metrics

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_inputs(self, datasets):
        self.inputs = datasets

    def close(self, status="FINISHED"):
        self.status = status


class ExpensiveStage(Exception):
    pass


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_run_flow_checks_data_before_any_stage(tmp_path, tiny_model, monkeypatch, policy):
    """A bad row stops the run before the first engine starts; skipped rows reach MLflow."""
    from selfalign.flows import pipeline, run_tracking
    from selfalign.flows.config import load_config

    files = {"prompts": write(tmp_path / "prompts.jsonl", [P, {"id": "b", "prompt": ""}]),
             "eval_prompts": write(tmp_path / "eval.jsonl", [{"id": "e", "prompt": "What is 2 + 2?"}]),
             "offline_pairs": write(tmp_path / "offline.jsonl", [Q])}
    sft = tmp_path / "sft"  # another model (pi_0 = its own reference is refused before any data is read)
    shutil.copytree(tiny_model, sft)
    with open(sft / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    cfg = load_config(None, {"model.policy": tiny_model, "model.reference": str(sft), "run.dir": str(tmp_path / "run"),
                             "data.on_bad_row": policy} | {f"data.{k}": v for k, v in files.items()})
    tracker, warnings = Recorder(), []
    started = []

    class Logger:
        info = print
        warning = warnings.append

    def evaluate_task(*args, **kwargs):
        started.append(args)
        raise ExpensiveStage

    monkeypatch.setattr(pipeline, "get_run_logger", lambda: Logger)
    monkeypatch.setattr(run_tracking, "make_logger", lambda *a, **k: tracker)
    monkeypatch.setattr(pipeline, "evaluate_task", evaluate_task)
    if policy == "error":
        with pytest.raises(DataError, match="prompts.jsonl: row 2, field 'prompt': is empty"):
            pipeline.run_flow.fn(cfg.to_dict())
        assert not started and tracker.status is None  # no MLflow run is opened for a run that cannot start
    else:
        with pytest.raises(ExpensiveStage):
            pipeline.run_flow.fn(cfg.to_dict())
        assert tracker.metrics["data/skipped_prompts"] == 1 and tracker.metrics["data/skipped_prompts/empty"] == 1
        assert tracker.metrics["data/skipped_offline_pairs"] == 0
        assert warnings == ["data.on_bad_row=skip dropped bad rows: data.prompts: 1 (empty 1)"]
        assert tracker.status == "FAILED"


def test_hooks():
    fn = load_hook("selfalign.tasks.toy:is_preferred", "evaluate.preferred")
    assert callable(fn)
    with pytest.raises(ValueError, match="pairs.validity"):
        load_hook("selfalign.tasks.toy:nope", "pairs.validity")
    for spec in ("just_a_name", ".relative:fn", "a..b:fn", "mod:two words", "mod:"):
        with pytest.raises(ValueError, match="package.module:function"):
            load_hook(spec, "pairs.validity")


def test_cli_prints_a_data_error_without_a_traceback(tmp_path):
    """The real command line: a bad row stops `selfalign run` with the message and status 2, before
    Prefect or any engine starts."""
    import os
    import subprocess
    import sys

    bad = write(tmp_path / "prompts.jsonl", [P, {"id": "b", "prompt": "  "}])
    env = os.environ | {"SELFALIGN_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    demo = Path(__file__).resolve().parents[1] / "deploy" / "presets" / "demo.yaml"
    proc = subprocess.run([sys.executable, "-m", "selfalign.flows.cli", "run", str(demo), f"--data.prompts={bad}",
                           f"--run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"data error: {bad}: row 2, field 'prompt': is empty or whitespace only"
    assert not (tmp_path / "run").exists()  # nothing started


def test_cli_catches_project_errors_raised_inside_a_command(monkeypatch, capsys, tmp_path):
    from selfalign.flows import cli, pipeline
    from selfalign.flows.config import ConfigError
    from selfalign.tasks import data

    monkeypatch.chdir(tmp_path)  # the run folder (runs/demo) and its lock
    monkeypatch.setattr(cli, "prepare_environment", lambda run_dir: None)
    monkeypatch.setattr(data, "load_data", lambda cfg: None)
    demo = str(Path(__file__).resolve().parents[1] / "deploy" / "presets" / "demo.yaml")
    for exc, says in [(DataError("x.jsonl: the file is empty"), "run: data error: x.jsonl: the file is empty"),
                      (ConfigError("train.beta: -1.0 must be > 0"), "run: config error: train.beta: -1.0 must be > 0")]:
        def run_flow(config, exc=exc):
            raise exc
        monkeypatch.setattr(pipeline, "run_flow", run_flow)
        assert cli.main(["run", demo]) == 2
        assert capsys.readouterr().err.strip() == says
    # the policy's tokenizer unreadable: named, status 2
    def unreadable(cfg):
        raise OSError("no tokenizer files")
    monkeypatch.setattr(data, "load_data", unreadable)
    assert cli.main(["run", demo]) == 2
    assert "model.policy" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--prefect-port=0"], "server: --prefect-port 0 must be a port (1-65535)"),
    (["--mlflow-port=70000"], "server: --mlflow-port 70000 must be a port (1-65535)"),
    (["--mlflow-workers=0"], "server: --mlflow-workers 0 must be at least 1"),
    (["--prefect-port=5000"], "server: --prefect-port and --mlflow-port are both 5000"),
])
def test_cli_server_arguments_are_checked(args, says, capsys):
    from selfalign.flows.cli import main

    assert main(["server", *args]) == 2
    assert capsys.readouterr().err.strip() == says


def test_context_length_is_read_from_config_json_or_left_to_the_config_class(tmp_path, tiny_model, monkeypatch):
    from transformers import AutoConfig

    from selfalign.tasks import data

    assert data._positions_in_config_file(tiny_model) == 128 == context_length(tiny_model)
    assert AutoConfig.from_pretrained(tiny_model).max_position_embeddings == 128
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "config.json").write_text(json.dumps({"model_type": "x", "max_position_embeddings": 7,
                                                    "text_config": {"max_position_embeddings": 4096}}))
    assert data._positions_in_config_file(str(nested)) is None  # a multimodal model's text model decides
    (nested / "config.json").write_text(json.dumps({"model_type": "llama"}))  # the class default then
    assert data._positions_in_config_file(str(nested)) is None
    assert context_length(str(nested)) == AutoConfig.from_pretrained(str(nested)).max_position_embeddings > 0
    assert data._positions_in_config_file(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"])
def test_a_full_or_read_only_disk_is_one_line(tmp_path, monkeypatch, capsys, code):
    import errno
    import os

    from selfalign.flows import cli
    from selfalign.tasks import artifacts

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "prepare_environment", lambda run_dir: None)

    def full(run_dir):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(run_dir / ".lock"))

    monkeypatch.setattr(artifacts, "run_lock", full)
    demo = str(Path(__file__).resolve().parents[1] / "deploy" / "presets" / "demo.yaml")
    assert cli.main(["run", demo]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"run: cannot write {Path('runs/demo/.lock')}: {os.strerror(getattr(errno, code))}.")
    assert "\n" not in err
