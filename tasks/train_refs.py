"""What the training worker computes once, before its first update, for the pairs that lack it:
reference log-probs of replay pairs (the policy still equals the reference then; cached on disk by
`tasks.refcache`), MRPO's additional references' log-probs, HPO's auxiliary rewards. Each rank computes
its share; the results are exchanged so every rank holds all."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from selfalign.tasks import refcache
from selfalign.tasks.data import load_hook
from selfalign.tasks.lm_logps import logps_of, reference_logps

def shared(todo: list[int], compute, rank: int, world: int) -> dict[int, Any]:
    """Ranks split `todo` (row indices), each runs `compute(its indices) -> values`, and all ranks
    get every result."""
    mine = todo[rank::world]
    local = dict(zip(mine, compute(mine))) if mine else {}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        for part in gathered:
            local.update(part)
    return local


def open_cache(spec: dict, model: str, rank: int, world: int, device: str, tokenizer: str = ""):
    """The reference log-prob cache of `model` (tasks/refcache.py; with a separate `tokenizer`, of
    the two together), or None (off, or a hub id). Rank 0 fingerprints; every rank reads the cache
    before any rank writes to it."""
    if not spec.get("ref_cache"):
        return None
    root = Path(spec["ref_cache"])
    fp = [None]
    if rank == 0:
        parts = [refcache.model_fingerprint(m, root) for m in ([model, tokenizer] if tokenizer else [model])]
        fp = ["-".join(parts) if all(parts) else None]
    if world > 1:
        dist.broadcast_object_list(fp, src=0)
    if fp[0] is None:
        return None
    return refcache.LogpCache(root, fp[0], spec["dtype"], torch.device(device).type)


def _cached(caches: list, rows: list[dict], missing: list[int]) -> tuple[list[int], dict[int, Any]]:
    """Splits `missing` into rows still to compute and rows that every cache (one per reference
    model) holds: {row: ([chosen value per cache], [rejected value per cache])}."""
    todo, found = [], {}
    for i in missing:
        vals = [[c.get(k) if c is not None else None for c in caches] for k in _pair_keys(rows[i])]
        if caches and all(v is not None for side in vals for v in side):
            found[i] = vals
        else:
            todo.append(i)
    return todo, found


def _store(caches: list, rows: list[dict], computed: dict[int, Any]) -> None:
    """Rank 0 adds computed values ({row: ([chosen per cache], [rejected per cache])}) to the caches."""
    for j, cache in enumerate(caches):
        if cache is not None:
            cache.put({k: side[j] for i, vals in computed.items() for k, side in zip(_pair_keys(rows[i]), vals)})


def _pair_keys(r: dict) -> tuple[str, str]:
    return (refcache.entry_key(r["prompt"], r["chosen"], r["prompt_ids"], r["chosen_ids"]),
            refcache.entry_key(r["prompt"], r["rejected"], r["prompt_ids"], r["rejected_ids"]))


def fill_reference_logps(model, rows: list[dict], pad_id: int, rank: int, world: int, batch_tokens: int,
                          packing: bool = False, cache=None) -> None:
    """Reference log-probs for rows that lack them (replay pairs), computed with the untouched
    start-of-round weights; ranks split the work and exchange the results. With a `cache`
    (refcache.LogpCache of this model), values found there are not recomputed and new ones are
    added to it by rank 0."""
    def compute(idx):
        seqs = [s for i in idx for s in ((rows[i]["prompt_ids"], rows[i]["chosen_ids"]),
                                          (rows[i]["prompt_ids"], rows[i]["rejected_ids"]))]
        model.eval()
        vals = logps_of(model, seqs, pad_id, batch_tokens, packing=packing)
        model.train()
        return [(vals[2 * j], vals[2 * j + 1]) for j in range(len(idx))]

    missing = [i for i, r in enumerate(rows) if not math.isfinite(r["ref_chosen_logp"])]
    caches = [cache] if cache is not None else []
    todo, found = _cached(caches, rows, missing)
    computed = shared(todo, compute, rank, world)
    for i, (c, r) in computed.items():
        rows[i]["ref_chosen_logp"], rows[i]["ref_rejected_logp"] = c, r
    for i, ([c], [r]) in found.items():
        rows[i]["ref_chosen_logp"], rows[i]["ref_rejected_logp"] = c, r
    if rank == 0:
        _store(caches, rows, {i: ([c], [r]) for i, (c, r) in computed.items()})
    if missing and rank == 0:
        print(f"train: reference log-probs of {len(missing)} replay pairs: {len(found)} from the cache, "
              f"{len(todo)} computed", flush=True)


def fill_mrpo_reference_logps(rows: list[dict], spec: dict, tok, rank: int, world: int, device: str) -> None:
    """MRPO's additional references for rows that lack them (replay pairs; generated pairs carry the
    score stage's): `mrpo_ref_chosen_logps` / `mrpo_ref_rejected_logps`, one value per reference.
    Each reference scores with its own tokenizer and chat template when it differs from the policy's."""
    refs = spec["mrpo"]["references"]

    def complete(r: dict) -> bool:
        vals = (r.get("mrpo_ref_chosen_logps") or []) + (r.get("mrpo_ref_rejected_logps") or [])
        return len(vals) == 2 * len(refs) and all(math.isfinite(v) for v in vals)

    def compute(idx):
        items = [(rows[i]["prompt"], rows[i][side], rows[i]["prompt_ids"], rows[i][f"{side}_ids"])
                 for i in idx for side in ("chosen", "rejected")]
        per_ref = [reference_logps(path, tok_path, tok, items, dtype=spec["dtype"],
                                   trust_remote_code=spec["trust_remote_code"],
                                   batch_tokens=spec["batch_tokens"], device=device,
                                   packing=spec.get("packing", False))
                   for path, tok_path in refs]
        return [([v[2 * j] for v in per_ref], [v[2 * j + 1] for v in per_ref]) for j in range(len(idx))]

    caches = [open_cache(spec, path, rank, world, device, tok_path) for path, tok_path in refs]
    missing = [i for i, r in enumerate(rows) if not complete(r)]
    todo, found = _cached(caches, rows, missing)
    computed = shared(todo, compute, rank, world)
    for i, (c, r) in (found | computed).items():
        rows[i]["mrpo_ref_chosen_logps"], rows[i]["mrpo_ref_rejected_logps"] = c, r
    if rank == 0:
        _store(caches, rows, computed)


def fill_aux_rewards(rows: list[dict], spec: dict, rank: int, world: int) -> None:
    """HPO: r_aux = sum_k c_k R_k(prompt, response) of every pair's chosen and rejected response,
    from the user hooks named in train.hpo.rewards (`aux_chosen`, `aux_rejected`)."""
    hooks = [(load_hook(h, "train.hpo.rewards"), w) for h, w in spec["hpo"]["rewards"]]

    def r_aux(prompt: str, response: str) -> float:
        return sum(w * float(fn(prompt, response)) for fn, w in hooks)

    def compute(idx):
        return [(r_aux(rows[i]["prompt"], rows[i]["chosen"]), r_aux(rows[i]["prompt"], rows[i]["rejected"])) for i in idx]

    for i, (c, r) in shared(list(range(len(rows))), compute, rank, world).items():
        if not (math.isfinite(c) and math.isfinite(r)):
            raise ValueError(f"train.hpo.rewards: non-finite auxiliary reward ({c}, {r}) for pair {rows[i]['prompt_id']!r}")
        rows[i]["aux_chosen"], rows[i]["aux_rejected"] = c, r
