import json

import pytest

from selfalign.tasks.data import DataError, load_hook, load_pairs, load_prompts


def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_standard_and_conversational_formats(tmp_path):
    std = write(tmp_path / "std.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    conv = write(tmp_path / "conv.jsonl", [{"id": "x", "prompt": [{"role": "user", "content": "q"}],
                                           "chosen": [{"role": "assistant", "content": "a"}],
                                           "rejected": [{"role": "assistant", "content": "b"}]}])
    assert load_pairs(std) == [{"id": "row1", "prompt": "q", "chosen": "a", "rejected": "b"}]
    assert load_pairs(conv) == [{"id": "x", "prompt": "q", "chosen": "a", "rejected": "b"}]


@pytest.mark.parametrize("rows, needle", [
    ([{"prompt": "q", "chosen": "a"}], "row 1: missing field 'rejected'"),
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "  ", "chosen": "a", "rejected": "b"}], "row 2: field 'prompt' is empty"),
    ([{"prompt": "q", "chosen": 3, "rejected": "b"}], "row 1: field 'chosen' must be a string, got int"),
    ([{"prompt": "q", "chosen": "a", "rejected": "a"}], "row 1: chosen and rejected are identical"),
    ([{"id": 1, "prompt": "q", "chosen": "a", "rejected": "b"}, {"id": 1, "prompt": "r", "chosen": "a", "rejected": "b"}], "row 2: duplicate id '1'"),
])
def test_bad_pair_rows_are_named(tmp_path, rows, needle):
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert needle in str(e.value) and "bad.jsonl" in str(e.value)


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_prompts(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match="row 2: invalid UTF-8"):
        load_prompts(str(bad))
    with pytest.raises(DataError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_hooks():
    fn = load_hook("selfalign.tasks.toy:is_preferred", "evaluate.preferred")
    assert callable(fn)
    with pytest.raises(ValueError, match="pairs.validity"):
        load_hook("selfalign.tasks.toy:nope", "pairs.validity")
    with pytest.raises(ValueError, match="package.module:function"):
        load_hook("just_a_name", "pairs.validity")
