"""Score stage: the DPO implicit reward of every sample,
    score(x, y) = S_policy(y | x) - S_reference(y | x),
with S the summed log-prob of the response tokens (prompt masked, end-of-turn token counted), no beta
and no length normalisation (docs/algorithms.md §2.4). The same pass scores the held-out offline pairs, so
the round knows how well this reward ranks pairs a human labelled (the guard reads it).

With `score.shards` = N > 1 the stage runs N worker processes (`python -m selfalign.tasks.score
<job.json>`; on GPUs one device each), concurrently through `map_workers` (Prefect task mapping in the
pipeline). Every worker plans the same batches as a single scorer would and computes batches w, w+N,
w+2N, ... of them under every model; the stage merges the parts. A sequence is computed in the same
batch either way, so the merged scores are those of one worker."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from selfalign.tasks import artifacts
from selfalign.tasks.config_base import ModelConfig, digest
from selfalign.tasks.data import encode_prompt, encode_response, load_tokenizer
from selfalign.tasks.lm_logps import Seq, load_model, logps_of, reference_logps
from selfalign.tasks.score_config import ScoreConfig


def pair_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float:
    """Fraction of pairs whose chosen response gets the higher implicit reward."""
    if not chosen_scores:
        return math.nan
    return sum(c > r for c, r in zip(chosen_scores, rejected_scores)) / len(chosen_scores)


@dataclass
class ScoreSettings:
    """What scoring reads of the run's config (model.dtype, model.trust_remote_code, score.batch_tokens,
    score.packing) and MRPO's additional references: all a scoring worker receives."""
    dtype: str = "float32"
    trust_remote_code: bool = False
    batch_tokens: int = 16384
    packing: bool = True
    references: list[tuple[str, str]] = field(default_factory=list)  # (model, tokenizer or "")

    @classmethod
    def of(cls, s: ScoreConfig, m: ModelConfig, references: Sequence[tuple[str, str]] = ()) -> "ScoreSettings":
        return cls(m.dtype, m.trust_remote_code, s.batch_tokens, s.packing, list(references))


def score_key(s: ScoreConfig, m: ModelConfig, samples: Path, policy: str, reference: str, heldout: list[dict[str, str]],
              references: Sequence[tuple[str, str]] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the stage is skipped by: its own keys (not the worker count) and the model's, the
    samples, the two models, the held-out rows and MRPO's additional references (absent for other
    losses); and those config keys by name."""
    settings = s.keyed() | m.settings()
    key = {"config": digest(settings), "samples": artifacts.input_token(samples),
           "policy": artifacts.input_token(policy), "reference": artifacts.input_token(reference),
           "heldout": digest(heldout)}
    if references:
        key["mrpo_references"] = [[artifacts.input_token(path), tok] for path, tok in references]
    return key, settings


def run_score(s: ScoreConfig, m: ModelConfig, samples_path: Path, policy: str, reference: str,
              heldout: list[dict[str, str]], out_path: Path, log=print, map_workers=None,
              references: Sequence[tuple[str, str]] = (), cluster=None) -> dict[str, Any]:
    """Adds `policy_logp`, `ref_logp`, `score` to every finished sample (NaN for truncated ones,
    which the pair stage drops anyway) and scores the held-out pairs with the same reward. With
    `references` (MRPO's additional ones: (model, tokenizer or "")) also `mrpo_ref_logps`: one summed
    log-prob per reference. With score.shards > 1 the log-probs come from that many worker processes
    (`score_workers`); with a `cluster` (tasks/cluster.py, address set) from that many Ray tasks, one at least."""
    t0 = time.time()
    samples = artifacts.read_table(samples_path)
    settings = ScoreSettings.of(s, m, references)
    if s.shards > 1 or (cluster is not None and cluster.address):
        tok, live, seqs = score_sequences(settings, samples, heldout, policy)
        values = score_workers(s.shards, settings, samples_path, policy, reference, heldout, out_path.parent,
                               log, map_workers, cluster)
    else:
        tok, live, seqs, values = score_values(settings, samples, policy, reference, heldout, log)
    return _write_scores(samples, live, seqs, values, settings.references, heldout, out_path, t0, log)


def score_sequences(s: ScoreSettings, samples: list[dict[str, Any]], heldout: list[dict[str, str]], policy: str):
    """(policy tokenizer, indices of the finished samples, the sequences to score: those samples'
    then each held-out pair's chosen and rejected)."""
    tok = load_tokenizer(policy, s.trust_remote_code)
    prompt_ids = {}
    def pids(prompt: str) -> list[int]:
        if prompt not in prompt_ids:
            prompt_ids[prompt] = encode_prompt(tok, prompt)
        return prompt_ids[prompt]

    live = [i for i, s in enumerate(samples) if s["finish_reason"] == "stop"]
    seqs: list[Seq] = [(pids(samples[i]["prompt"]), samples[i]["response_ids"]) for i in live]
    for h in heldout:
        seqs.append((pids(h["prompt"]), encode_response(tok, h["chosen"])))
        seqs.append((pids(h["prompt"]), encode_response(tok, h["rejected"])))
    return tok, live, seqs


def score_values(s: ScoreSettings, samples: list[dict[str, Any]], policy: str, reference: str,
                 heldout: list[dict[str, str]], log=print, part: tuple[int, int] | None = None):
    """The log-probs of `score_sequences` under policy, reference and MRPO's additional references:
    (tok, live, seqs, {"policy": [...], "ref": [...], "extra": [[...] per reference]}). part=(w, n):
    only worker w's batches of n (others None)."""
    tok, live, seqs = score_sequences(s, samples, heldout, policy)
    result = {}
    for name, path in (("policy", policy), ("ref", reference)):
        model = load_model(path, s.dtype, s.trust_remote_code)
        every = max(1, len(seqs) // 4)
        def progress(done, total, name=name):
            if done == total or done // every != (done - 1) // every:
                log(f"score[{name}]: {done}/{total} sequences")
        result[name] = logps_of(model, seqs, tok.pad_token_id, s.batch_tokens, progress, packing=s.packing, part=part)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # MRPO: the additional references' log-probs of every finished sample, computed once here; the
    # pair stage carries those of the chosen and rejected responses into the pair table.
    extra = s.references
    items = [(samples[i]["prompt"], samples[i]["response"], *seqs[j]) for j, i in enumerate(live)]
    extra_logps = []
    for k, (path, tok_path) in enumerate(extra, 1):
        log(f"score[mrpo ref {k}]: {path}")
        extra_logps.append(reference_logps(path, tok_path, tok, items, dtype=s.dtype,
                                           trust_remote_code=s.trust_remote_code, batch_tokens=s.batch_tokens,
                                           packing=s.packing, part=part))
    return tok, live, seqs, {"policy": result["policy"], "ref": result["ref"], "extra": extra_logps}


def _write_scores(samples, live, seqs, result, extra, heldout, out_path: Path, t0: float, log) -> dict[str, Any]:
    extra_logps = result["extra"]
    for s in samples:
        s["policy_logp"] = s["ref_logp"] = s["score"] = math.nan
        if extra:
            s["mrpo_ref_logps"] = [math.nan] * len(extra)
    for j, i in enumerate(live):
        s = samples[i]
        s["policy_logp"], s["ref_logp"] = result["policy"][j], result["ref"][j]
        s["score"] = s["policy_logp"] - s["ref_logp"]
        if extra:
            s["mrpo_ref_logps"] = [vals[j] for vals in extra_logps]
    artifacts.write_table(out_path, samples)

    n = len(live)
    rewards = [p - r for p, r in zip(result["policy"][n:], result["ref"][n:])]
    acc = pair_accuracy(rewards[0::2], rewards[1::2])
    stats = {"score/seconds": time.time() - t0, "score/sequences": len(seqs),
             "eval/pair_accuracy": acc, "score/heldout_pairs": len(heldout)}
    log(f"score: {len(seqs)} sequences in {stats['score/seconds']:.1f}s; "
        f"implicit reward ranks {acc:.3f} of {len(heldout)} held-out pairs correctly")
    return stats


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' parts (`score_values` with part=(w, n)) as one: every value from the one worker
    that computed it."""
    def merge(lists: list[list], what: str) -> list[float]:
        out = []
        for i, vals in enumerate(zip(*lists)):
            have = [v for v in vals if v is not None]
            if len(have) != 1:
                raise RuntimeError(f"score: sequence {i} of {what} was computed by {len(have)} workers, not 1")
            out.append(have[0])
        return out

    return {"policy": merge([p["policy"] for p in parts], "the policy"),
            "ref": merge([p["ref"] for p in parts], "the reference"),
            "extra": [merge([p["extra"][k] for p in parts], f"MRPO reference {k + 1}")
                      for k in range(len(parts[0]["extra"]))]}


def score_workers(n: int, settings: ScoreSettings, samples_path: Path, policy: str, reference: str,
                  heldout: list[dict[str, str]], work_dir: Path, log=print, map_workers=None,
                  cluster=None) -> dict[str, Any]:
    """The stage's log-probs from `n` (score.shards) worker processes, merged. `map_workers(calls)`
    runs `run_score_worker(job, job_path)` for each call concurrently (default: threads). With a
    `cluster` (address set) the workers are Ray tasks (tasks/cluster.py)."""
    from selfalign.tasks.procs import thread_map, worker_resources

    ray_workers = None
    if cluster is not None and cluster.address:
        from selfalign.tasks import cluster as ray_workers
    calls = []
    for w, res in enumerate(worker_resources(n, 1, "score.shards") if ray_workers is None else [{}] * n):
        job = {"settings": asdict(settings), "samples": str(samples_path), "policy": policy, "reference": reference,
               "heldout": heldout, "part": [w, n], "output": str(work_dir / f"score_part.worker-{w}.json")} | res
        if ray_workers is not None:
            job = ray_workers.prepare_score_job(cluster, job)
        calls.append((job, work_dir / f"score_job.worker-{w}.json"))
    log(f"score: {n} workers" + " of the Ray cluster" * (ray_workers is not None))
    if map_workers is not None:
        outputs = map_workers(calls)
    elif ray_workers is not None:
        outputs = thread_map(lambda c: ray_workers.run_score_worker(cluster, c[0], c[1], log), calls)
    else:
        outputs = thread_map(lambda c: run_score_worker(c[0], c[1], log), calls)
    parts = [artifacts.read_json(p) for p in outputs]
    for p in outputs:
        Path(p).unlink(missing_ok=True)
    return merge_parts(parts)


def run_score_worker(job: dict[str, Any], job_path: Path, log=print) -> Path:
    """One scoring worker in a process of its own (on GPUs: the device in `devices`; on CPU: pinned to
    `cpus`, one torch thread each, or `threads` threads); returns the path of its part."""
    from selfalign.tasks.procs import run_worker_process

    artifacts.write_json(job_path, job)
    env = dict(os.environ)
    if job.get("devices") is not None:
        env["CUDA_VISIBLE_DEVICES"] = job["devices"]
    if job.get("threads"):
        env["OMP_NUM_THREADS"] = str(job["threads"])
    rc, tail = run_worker_process("selfalign.tasks.score", job_path, env, job.get("cpus"), log)
    if rc != 0:
        raise RuntimeError(f"scoring worker {job['part'][0]} failed (exit {rc}):\n" + "\n".join(tail))
    return Path(job["output"])


def _worker(job: dict[str, Any]) -> None:
    from selfalign.tasks.procs import PROGRESS

    if job.get("cpus") or job.get("threads"):
        torch.set_num_threads(job.get("threads") or len(job["cpus"]))
    settings = ScoreSettings(**job["settings"])
    settings.references = [tuple(r) for r in settings.references]
    w, n = job["part"]
    log = lambda m: print(f"{PROGRESS}[worker {w}] {m}", flush=True)
    samples = artifacts.read_table(Path(job["samples"]))
    _, _, _, values = score_values(settings, samples, job["policy"], job["reference"], job["heldout"], log, part=(w, n))
    artifacts.write_json(Path(job["output"]), values)


if __name__ == "__main__":
    _worker(json.loads(Path(sys.argv[1]).read_text()))
