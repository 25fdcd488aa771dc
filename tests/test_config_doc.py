"""The config reference (flows/config_doc.py): every key documented, docs/config.md current."""
from pathlib import Path

from selfalign.flows.config import load_config
from selfalign.flows.config_doc import as_markdown, reference

ROOT = Path(__file__).resolve().parents[1]


def test_every_key_has_a_type_default_and_meaning():
    rows = reference()
    assert {r["key"] for r in rows} == set(load_config(ROOT / "deploy" / "presets" / "demo.yaml").flat())
    assert [r["key"] for r in rows if not r["help"]] == []
    pairs = {r["key"]: r for r in rows}["pairs.alpha_min"]
    assert pairs["type"] == "float" and pairs["default"] == "-1.0" and "two-sided" in pairs["help"]


def test_docs_config_md_is_current():
    # regenerate with: selfalign config --markdown > docs/config.md
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == as_markdown(reference())
