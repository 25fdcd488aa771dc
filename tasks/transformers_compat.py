"""What selfalign reads from transformers that it exposes only under a private name, in one place,
for the versions it was checked against (`CHECKED`). tests/test_packing.py fails on any other
version until this module is checked against it and `CHECKED` extended."""
from __future__ import annotations

CHECKED = ("5.10", "5.11", "5.12", "5.13", "5.14", "5.15", "5.16", "5.17", "5.18", "5.19")


def attn_implementation(model) -> str:
    """The attention implementation a loaded model dispatches to ("sdpa", "eager",
    "flash_attention_2", a registered name, ...). transformers keeps it in the config's private
    `_attn_implementation`; its public setter, `set_attn_implementation`, has no getter."""
    return model.config._attn_implementation or "eager"
