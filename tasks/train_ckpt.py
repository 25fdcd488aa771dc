"""Training checkpoints: DeepSpeed's own state plus what a resumed run needs (step, RNG, alpha-DPO
statistics, HPO's value head), the pointer to the latest complete one, and the metrics file cut back
to the resumed step."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from selfalign.tasks import artifacts

def latest_checkpoint(ckpt_dir: str) -> dict | None:
    """{"tag", "step"} of the latest complete checkpoint in `ckpt_dir`, if any. The pointer file is
    written (atomically) only after every rank has saved, so a kill mid-save leaves the previous one."""
    pointer = Path(ckpt_dir) / "latest.json"
    return artifacts.read_json(pointer) if ckpt_dir and pointer.exists() else None


def client_state(step: int, objective, vhead, vopt) -> dict:
    """What a resumed run needs beyond the engine's own state (weights, optimiser, scheduler): the
    step reached, which fixes the position in the data stream, the RNG state, the alpha-DPO running
    statistics and the HPO value head with its optimiser."""
    state = {"step": step, "torch_rng": torch.get_rng_state(), "alpha_dpo": objective.state}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    if vhead is not None:
        state["value_head"], state["value_opt"] = vhead.state_dict(), vopt.state_dict()
    return state


def save_checkpoint(engine, spec: dict, step: int, client_state: dict, rank: int) -> None:
    """A DeepSpeed checkpoint of `step` (all ranks), then the pointer to it; older ones are deleted."""
    ckpt_dir = Path(spec["checkpoints"])
    tag = f"step-{step:06d}"
    # LoRA: the frozen base weights are the start-of-round model's, loaded again on resume
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=bool(spec.get("lora")))
    dist.barrier()
    if rank == 0:
        artifacts.write_json(ckpt_dir / "latest.json", {"tag": tag, "step": step})
        for old in ckpt_dir.glob("step-*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
        print(f"train: checkpoint at step {step} -> {ckpt_dir / tag}", flush=True)


def resume(engine, spec: dict, objective, vhead, vopt) -> int:
    """Loads the latest checkpoint, if there is one: returns the number of steps already done."""
    latest = latest_checkpoint(spec.get("checkpoints", ""))
    if latest is None:
        return 0
    load_path, state = engine.load_checkpoint(spec["checkpoints"], tag=latest["tag"],
                                              load_module_strict=not spec.get("lora"))
    if load_path is None:
        raise RuntimeError(f"train: could not load the checkpoint {spec['checkpoints']}/{latest['tag']}")
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"])
    objective.state = state["alpha_dpo"]
    if vhead is not None:
        vhead.load_state_dict(state["value_head"])
        vopt.load_state_dict(state["value_opt"])
    print(f"train: resuming from the checkpoint of step {state['step']} ({load_path})", flush=True)
    return state["step"]


def truncate_metrics(path: Path, steps_done: int) -> None:
    """Keeps the metric lines of the steps a resumed run does not redo."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= steps_done]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
