"""LoRA training with peft (train.lora.enabled): wrapping the policy, checking the target modules
against a model's architecture at config time, the reference as the same model with its adapter
disabled, and saving the adapter alone beside the merged model."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

def wrap_lora(model, lora: dict):
    """Injects LoRA adapters (peft) into `model` in place and freezes every other parameter; returns
    the PeftModel. Adapters start at zero (B = 0), so the adapted model equals the base model until
    the first update. Adapters on the input or output embeddings are refused: the fused LM head
    reads the output layer's weight directly, and a merged adapter there would untie tied weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["target_modules"], bias="none")
    embeddings = {id(model.get_input_embeddings()): "input", id(model.get_output_embeddings()): "output"}
    names = {id(m): n for n, m in model.named_modules()}
    try:
        # adapters in the model's own dtype: DeepSpeed keeps one dtype per parameter group
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as e:
        raise ValueError(f"train.lora.target_modules: {lora['target_modules']!r} does not fit this model: {e}") from None
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and id(module.get_base_layer()) in embeddings:
            which = embeddings[id(module.get_base_layer())]
            raise ValueError(f"train.lora.target_modules: {lora['target_modules']!r} puts an adapter on the {which} "
                             f"embeddings ({names[id(module.get_base_layer())]}); name other modules")
    return peft_model


def check_lora_targets(model_path: str, lora: dict, trust_remote_code: bool = False) -> None:
    """`wrap_lora`'s checks at config load time, on the model built on the meta device (no weights
    read): a ValueError naming train.lora.target_modules if the adapters would not fit. A model
    that cannot be built here is left to the training worker, which checks the same."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - not this check's to report: loading the model fails on its own
        return
    wrap_lora(model, lora)


def lora_reference(peft_model):
    """Context in which the policy model computes the reference: the start-of-round weights, i.e.
    the adapter disabled (a no-op context without LoRA)."""
    return peft_model.disable_adapter() if peft_model is not None else nullcontext()


def save_lora(peft_model, out: Path, tok, adapter_out: str | Path) -> None:
    """The adapter alone (peft format, small) in `adapter_out`, then the model with the adapter
    merged into its weights in `out`, a plain checkpoint like full training's: generation, scoring
    and the next round load it without peft. `peft_model` is left merged and unwrapped."""
    peft_model.save_pretrained(str(adapter_out), safe_serialization=True)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
