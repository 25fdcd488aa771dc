"""Tests of the sort-free top-p filter (selfalign.kernels.sampling).

The reference sorts: float64 cumulative mass, in descending order, of the same float32
probabilities the filter computes (torch.softmax of the float32 logits), and keeps a token iff the
mass strictly before it is < p. On rows without a tie at the boundary the kept sets must be equal,
except for tokens whose mass before them is within MARGIN of p: the filter sums in float32, which
may round such a knife-edge decision either way (as vLLM's float32 cumsum does). Those tokens are
counted, so a test cannot pass by excusing every token. Each case runs on the topk fast path, on the
histogram search alone (fast_k=0), and on a mix (fast_k small) one row per block."""
from __future__ import annotations

import pytest
import torch

from selfalign.kernels.sampling import sample_inverse_cdf, top_p_filter, top_p_threshold

MARGIN = 1e-5
PATHS = {"fast": {"fast_k": 64}, "radix": {"fast_k": 0}, "mixed-rowwise": {"fast_k": 3, "chunk_elements": 1}}
paths = pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())


def reference_keep(logits: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept mask, each token's distance |mass before it - p|) by sorting."""
    probs = torch.softmax(logits, dim=-1).double()
    vals, idx = probs.sort(dim=-1, descending=True, stable=True)
    before = vals.cumsum(-1) - vals
    keep_sorted = before < p.double().unsqueeze(1)
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(1, idx, keep_sorted)
    dist = torch.zeros_like(before).scatter_(1, idx, (before - p.double().unsqueeze(1)).abs())
    return keep, dist


def kept(out: torch.Tensor) -> torch.Tensor:
    return out != float("-inf")


def rows_with_several_p(logits: torch.Tensor, ps: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row once per p, in one batch (each row carries its own p)."""
    b = logits.shape[0]
    return logits.repeat(len(ps), 1), torch.tensor(ps).repeat_interleave(b)


def distributions(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = 3001
    random = torch.randn(6, vocab, generator=g) * torch.tensor([0.5, 1, 2, 3, 5, 8]).unsqueeze(1)
    peaked = torch.randn(5, vocab, generator=g) * 2
    peaked[:, :40] += 10 + 3 * torch.randn(5, 40, generator=g)  # a trained model's few dozen likely tokens
    near_uniform = 0.05 * torch.randn(4, vocab, generator=g)
    masked = torch.randn(5, vocab, generator=g) * 3
    masked[torch.rand(5, vocab, generator=g) < 0.7] = float("-inf")  # already-filtered tokens
    masked[0, 1:] = float("-inf")  # one token left
    masked[1, :-2] = float("-inf")  # two left
    masked[1, -2:] = torch.tensor([0.5, -1.0])
    return {"random": random, "peaked": peaked, "near_uniform": near_uniform, "masked": masked}


@paths
@pytest.mark.parametrize("name", ["random", "peaked", "near_uniform", "masked"])
def test_kept_set_equals_the_sorting_reference(name, path):
    logits = distributions()[name]
    x, p = rows_with_several_p(logits, [1e-4, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 0.999])
    before = x.clone()
    out = top_p_filter(x, p, **path)
    assert torch.equal(x, before)  # not in place unless asked
    ref, dist = reference_keep(x, p)
    got = kept(out)
    differ = got != ref
    bad = (differ & (dist > MARGIN)).nonzero().tolist()
    assert not bad, f"(row, token) {bad[:10]} differ from the reference away from the boundary"
    excused = int(differ.sum())
    assert excused <= 0.02 * int(ref.sum()), f"{excused} knife-edge tokens differ: more than rounding explains"
    # kept tokens keep their logits exactly; removed ones are -inf
    assert torch.equal(out[got], x[got])
    assert (got.sum(-1) >= 1).all()


@paths
def test_threshold_is_the_smallest_kept_probability(path):
    logits = torch.cat(list(distributions(1).values()))
    x, p = rows_with_several_p(logits, [0.2, 0.6, 0.9])
    probs = torch.softmax(x, -1)
    ref, dist = reference_keep(x, p)
    t = top_p_threshold(probs, p, fast_k=path["fast_k"])
    smallest = torch.where(ref, probs, torch.tensor(float("inf"))).min(-1).values
    clear = (dist > MARGIN).all(-1)  # rows with no knife-edge token
    assert clear.float().mean() > 0.5
    assert torch.equal(t[clear], smallest[clear])


@paths
def test_a_tie_at_the_boundary_is_kept_whole(path):
    """Probabilities 0.4 (one token), then 5 tokens tied at 0.1, then a tail. With p = 0.55 the
    tokens after the first need 0.15 more: a sort keeps two of the tie (which two is arbitrary),
    this filter keeps all five."""
    tail = 200
    probs = torch.cat([torch.tensor([0.4]), torch.full((5,), 0.1), torch.full((tail,), 0.1 / tail)])
    logits = probs.log().unsqueeze(0)
    logits = logits[:, torch.randperm(logits.shape[1], generator=torch.Generator().manual_seed(3))]
    p = torch.tensor([0.55])
    out = top_p_filter(logits, p, **path)
    q = torch.softmax(logits, -1)
    tied = (q - 0.1).abs() < 1e-6
    assert tied.sum() == 5
    assert torch.equal(kept(out), (q >= q[tied].min()))  # the top token and the whole tie
    ref, _ = reference_keep(logits, p)
    assert int(ref.sum()) == 3 and bool((ref <= kept(out)).all())  # the sort keeps a subset of the tie
    # ties at the top: p tiny keeps every token tied for the largest probability
    flat = torch.zeros(1, 50)
    flat[0, [7, 21, 33]] = 2.0
    out = top_p_filter(flat, torch.tensor([1e-9]), **path)
    assert kept(out).nonzero()[:, 1].tolist() == [7, 21, 33]


@paths
def test_p_one_rows_are_untouched_and_tiny_p_keeps_the_argmax(path):
    logits = torch.cat(list(distributions(2).values()))
    logits[3, 5] = float("nan")  # no distribution: returned as is, whatever its p
    n = logits.shape[0]
    p = torch.tensor([1.0, 1.5, 1e-12, 0.0, -0.5] * n)[:n]
    out = top_p_filter(logits, p, **path)
    untouched = (p >= 1) | (torch.arange(n) == 3)
    assert torch.equal(out[untouched].nan_to_num(), logits[untouched].nan_to_num())
    for row in (~untouched).nonzero().squeeze(1).tolist():
        assert kept(out[row]).nonzero().squeeze(1).tolist() == [int(logits[row].argmax())]
    # every row at p = 1: the very same values, no work done
    same = top_p_filter(logits, torch.ones(n), **path)
    assert torch.equal(same.nan_to_num(), logits.nan_to_num())


@paths
def test_a_row_is_filtered_the_same_alone_or_in_any_batch(path):
    """Rows do not interact: a request's tokens do not depend on what else is in vLLM's batch
    (shards are drawn the same by one engine or several)."""
    logits = torch.cat(list(distributions(4).values()))
    p = torch.linspace(0.05, 0.99, logits.shape[0])
    p[::4] = 1.0
    whole = top_p_filter(logits, p, **path)
    perm = torch.randperm(logits.shape[0], generator=torch.Generator().manual_seed(5))
    assert torch.equal(top_p_filter(logits[perm], p[perm], **path), whole[perm])
    for row in (0, 7, 13):
        assert torch.equal(top_p_filter(logits[row:row + 1], p[row:row + 1], **path), whole[row:row + 1])


def test_edge_shapes_and_in_place():
    assert top_p_filter(torch.empty(0, 10), torch.empty(0)).shape == (0, 10)
    assert top_p_filter(torch.empty(3, 0), torch.full((3,), 0.5)).shape == (3, 0)
    one = torch.tensor([[0.3], [float("-inf")]])
    assert torch.equal(top_p_filter(one, torch.tensor([0.5, 0.5])), one)  # one token / nothing left
    x = torch.randn(4, 100)
    x[2] = float("-inf")
    p = torch.tensor([0.5, 1.0, 0.5, 0.8], dtype=torch.float64)
    expect = top_p_filter(x, p)
    assert torch.equal(expect[2], x[2]) and not torch.equal(expect[0], x[0])
    y = x.clone()
    assert top_p_filter(y, p, inplace=True) is y and torch.equal(y, expect)


def test_bad_input_is_named():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        top_p_filter(x, torch.ones(2))
    with pytest.raises(ValueError, match="float32"):
        top_p_filter(x.double(), torch.ones(3))
    with pytest.raises(ValueError, match=r"\(batch, vocab\)"):
        top_p_filter(x[0], torch.ones(3))
    with pytest.raises(ValueError, match="row 1 is NaN"):
        top_p_filter(x, torch.tensor([0.5, float("nan"), 0.5]))


@pytest.mark.slow
def test_vllm_worker_top_p_on_cpu(tiny_model, tmp_path):
    """The real vLLM worker (CPU): its top-p (TopPLogitsProcessor) is in effect and samples what
    vLLM's own sort-based top-p samples, seed for seed: a tiny p gives the greedy tokens, p = 0.5
    the same samples as vLLM's top-p 0.5 (and not those of p = 1), p = 1 the same as before.
    Its draw is the inverse-CDF one (other samples than vLLM's Gumbel-max draw), reproducible."""
    from selfalign.flows.config import load_config
    from selfalign.tasks import artifacts, generate

    cfg = load_config(None, {"model.policy": tiny_model, "model.reference": tiny_model, "data.prompts": "p",
                             "data.eval_prompts": "e", "data.offline_pairs": "o"})
    prompts = [{"id": f"p{i}", "prompt": f"What is {i} + 1?"} for i in range(6)]

    def draw(name: str, native: bool, native_sampler: bool = False) -> dict[str, list]:
        runs = {"greedy": generate.sampling_run(tmp_path / f"{name}-greedy.parquet", n=1, temperature=0,
                                                top_p=1.0, max_tokens=12)}
        for label, p in (("tiny", 1e-6), ("half", 0.5), ("one", 1.0)):
            runs[label] = generate.sampling_run(tmp_path / f"{name}-{label}.parquet", n=3, temperature=1.0,
                                                top_p=p, max_tokens=12) | {"seed": 1234}
        job = generate.build_job(cfg.generate, cfg.model, tiny_model, prompts, list(runs.values()), seed=5) | {
            "native_top_p": native, "native_sampler": native_sampler}
        generate.run_vllm(job, tmp_path / f"{name}.json", cfg.generate.kv_cache_gib)
        return {label: [r["response_ids"] for r in artifacts.read_table(run["output"])] for label, run in runs.items()}

    ours = draw("ours", native=False)
    greedy = [ids for ids in ours["greedy"] for _ in range(3)]
    assert ours["tiny"] == greedy  # only the argmax survives a tiny p, whatever the seed
    assert ours["one"] != greedy and ours["half"] != ours["one"]  # sampled; p = 0.5 cut something
    vllm = draw("vllm", native=True)
    assert vllm["tiny"] == greedy
    assert ours["half"] == vllm["half"] and ours["one"] == vllm["one"]
    # The same job drawn with vLLM's Gumbel-max noise instead of our inverse-CDF draw: other samples
    # for the same seeds (so the worker's draw is really ours), the same greedy and tiny-p tokens.
    gumbel = draw("gumbel", native=False, native_sampler=True)
    assert gumbel["tiny"] == greedy and gumbel["greedy"] == ours["greedy"]
    assert gumbel["one"] != ours["one"] and gumbel["half"] != ours["half"]
    assert draw("again", native=False) == ours  # seeded: the same samples on every run


@pytest.mark.slow
def test_processor_follows_the_batch_through_adds_removes_and_moves():
    """TopPLogitsProcessor's row -> p table against a model of vLLM's persistent batch: requests
    removed, added into the first free rows, the batch condensed (last row moved into a hole) and
    rows swapped, as vLLM reports them; after each step every row is filtered with its own p."""
    import random
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from selfalign.tasks import vllm_worker

    cls = vllm_worker.TopPLogitsProcessor
    proc = cls(SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=16)), torch.device("cpu"), False)
    assert proc.is_argmax_invariant()
    rng = random.Random(0)
    batch: list[float] = []  # p of each row (1.0: a request without TOP_P_KEY)
    seen_rows_with_p = 0
    for step in range(60):
        removed = rng.sample(range(len(batch)), rng.randint(0, min(3, len(batch))))
        slots: list[float | None] = list(batch)
        for row in removed:
            slots[row] = None
        added = []
        for _ in range(rng.randint(0, 3)):
            p = rng.choice([1e-9, 0.3, 0.7, 0.95, 1.0, None])
            row = slots.index(None) if None in slots else len(slots)
            if row >= 16:
                break
            slots[row:row + 1] = [1.0 if p is None else p]
            extra = None if p is None else {vllm_worker.TOP_P_KEY: p}
            added.append((row, SamplingParams(temperature=1.0, extra_args=extra), None, []))
        moved = []
        while None in slots:
            hole = slots.index(None)
            while slots and slots[-1] is None:
                slots.pop()
            if hole >= len(slots):
                break
            slots[hole], slots[-1] = slots[-1], None
            moved.append((len(slots) - 1, hole, MoveDirectionality.UNIDIRECTIONAL))
            slots.pop()
        if len(slots) >= 2 and rng.random() < 0.5:
            i, j = rng.sample(range(len(slots)), 2)
            slots[i], slots[j] = slots[j], slots[i]
            moved.append((i, j, MoveDirectionality.SWAP))
        batch = slots
        proc.update_state(BatchUpdate(batch_size=len(batch), removed=removed, added=added, moved=moved))
        if step % 3 == 0:
            proc.update_state(None)  # a step without changes
        logits = torch.randn(len(batch), 64, generator=torch.Generator().manual_seed(step)) * 2
        expect = top_p_filter(logits, torch.tensor(batch, dtype=torch.float64))
        assert torch.equal(proc.apply(logits.clone()), expect), f"step {step}, batch p {batch}"
        seen_rows_with_p += sum(p < 1 for p in batch)
    assert seen_rows_with_p > 100
    with pytest.raises(ValueError, match=vllm_worker.TOP_P_KEY):
        cls.validate_params(SamplingParams(extra_args={vllm_worker.TOP_P_KEY: 1.5}))
    cls.validate_params(SamplingParams(extra_args={vllm_worker.TOP_P_KEY: 0.9}))


# --- sample_inverse_cdf -------------------------------------------------------------------------

def reference_draw(logits: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, distance of the target from the nearest running sum) by a float64 running sum over
    the whole row: the first token whose running sum exceeds u * total."""
    probs = torch.softmax(logits, dim=-1).double()
    cum = probs.cumsum(-1)
    target = u.double().unsqueeze(1) * cum[:, -1:]
    tok = (cum <= target).sum(-1).clamp(max=logits.shape[1] - 1)
    return tok, (cum - target).abs().amin(-1)


DRAW_MARGIN = 1e-6  # float32 sums of up to 3001 probabilities: a few 1e-8 of the row's mass
SAMPLE_PATHS = {"default": {}, "small-blocks": {"block": 7}, "rowwise": {"block": 64, "chunk_elements": 1}}
sample_paths = pytest.mark.parametrize("path", SAMPLE_PATHS.values(), ids=SAMPLE_PATHS.keys())


@sample_paths
@pytest.mark.parametrize("name", ["random", "peaked", "near_uniform", "masked"])
def test_draw_equals_the_running_sum_reference(name, path):
    """For the same u, the token of the float64 running sum over the whole row. Float32 block sums
    (float32 probabilities summed) may move a target lying within DRAW_MARGIN of a running sum to the
    neighbouring token: such rows are counted (at most 5%), and the rest must agree exactly."""
    logits = distributions()[name].repeat(40, 1)
    g = torch.Generator().manual_seed(1)
    u = torch.rand(logits.shape[0], generator=g, dtype=torch.float64)
    u[:4] = torch.tensor([0.0, 1 - 2 ** -53, 0.5, 1e-12])
    got = sample_inverse_cdf(logits, u, **path)
    want, dist = reference_draw(logits, u)
    knife_edge = dist < DRAW_MARGIN
    assert bool((got[~knife_edge] == want[~knife_edge]).all())
    assert int(knife_edge.sum()) <= 0.05 * len(u)
    assert bool(torch.isfinite(logits.gather(1, got.unsqueeze(1))).all())  # never a filtered token


def fixed_rows(g: torch.Generator) -> torch.Tensor:
    """One peaked row, one flat, one with filtered tokens at block edges (vocab 50)."""
    vocab = 50
    rows = torch.stack([torch.randn(vocab, generator=g) * 2, 0.1 * torch.randn(vocab, generator=g),
                        torch.randn(vocab, generator=g)])
    rows[0, 5] += 6  # one token with most of the mass
    rows[2, [0, 6, 7, 13, 48, 49]] = float("-inf")  # block boundaries of block=7, and the tail
    return rows


@pytest.mark.parametrize("path", [SAMPLE_PATHS["default"], SAMPLE_PATHS["small-blocks"]], ids=["default", "small-blocks"])
def test_draws_follow_the_softmax_distribution(path):
    """200k draws from fixed rows: every token's count within 5 standard deviations of N * p, and
    filtered tokens never drawn. (The row-at-a-time path draws what the default path draws, draw for
    draw: the next test.)"""
    g = torch.Generator().manual_seed(2)
    rows = fixed_rows(g)
    vocab = rows.shape[1]
    n = 200_000
    for row in rows:
        u = torch.rand(n, generator=g, dtype=torch.float64)
        counts = torch.bincount(sample_inverse_cdf(row.expand(n, vocab).contiguous(), u, **path), minlength=vocab)
        p = torch.softmax(row, -1).double()
        sd = (n * p * (1 - p)).sqrt()
        assert bool(((counts - n * p).abs() <= 5 * sd + 1).all()), (counts, n * p)
        assert int(counts[p == 0].sum()) == 0


def test_draw_of_a_row_does_not_depend_on_the_batch_or_its_blocks():
    logits = distributions()["random"]
    u = torch.rand(logits.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole = sample_inverse_cdf(logits, u)
    assert torch.equal(whole, sample_inverse_cdf(logits, u, chunk_elements=1))
    for row in fixed_rows(torch.Generator().manual_seed(2)):
        many = row.expand(2000, row.shape[0]).contiguous()
        uu = torch.rand(2000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        assert torch.equal(sample_inverse_cdf(many, uu), sample_inverse_cdf(many, uu, **SAMPLE_PATHS["rowwise"]))
    for i in range(logits.shape[0]):
        assert int(sample_inverse_cdf(logits[i:i + 1], u[i:i + 1])) == int(whole[i])


def test_draw_edge_rows_and_shapes():
    u = torch.full((4,), 0.3, dtype=torch.float64)
    x = torch.randn(4, 5)
    x[0] = float("-inf")  # no distribution: the argmax (0)
    x[1, 2] = float("nan")  # NaN: the argmax, which is the NaN
    x[2, [1, 3]] = float("inf")  # +inf: the first +inf token
    x[3, :4] = float("-inf")  # a single token left
    assert sample_inverse_cdf(x, u).tolist() == [0, 2, 1, 4]
    assert sample_inverse_cdf(torch.zeros(0, 9), torch.zeros(0, dtype=torch.float64)).shape == (0,)
    one = torch.tensor([[0.0, 0.0]])  # u = 0.5 falls exactly on the boundary: the second token
    assert sample_inverse_cdf(one, torch.tensor([0.5], dtype=torch.float64)).tolist() == [1]
    assert sample_inverse_cdf(one, torch.tensor([0.49], dtype=torch.float64)).tolist() == [0]


def test_draw_bad_input_is_named():
    with pytest.raises(ValueError, match="float32"):
        sample_inverse_cdf(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2))
    with pytest.raises(ValueError, match=r"u must have shape \(2,\)"):
        sample_inverse_cdf(torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(batch, vocab\)"):
        sample_inverse_cdf(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="vocabulary is empty"):
        sample_inverse_cdf(torch.zeros(2, 0), torch.zeros(2))


@pytest.mark.slow
def test_vllm_cpu_sampler_draws_by_inverse_cdf():
    """With `use_inverse_cdf_sampler`, vLLM's CPU TopKTopPSampler returns sample_inverse_cdf's token
    for each row's number: a seeded row's from its own generator (one per step), so the same seed
    draws the same tokens whatever rows surround it; vLLM's top-k still applies first."""
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from selfalign.tasks import vllm_worker

    assert vllm_worker.use_inverse_cdf_sampler()
    assert vllm_worker.use_inverse_cdf_sampler()  # idempotent
    sampler = TopKTopPSampler()
    assert sampler.forward.__func__ is TopKTopPSampler.forward_cpu
    logits = distributions()["random"]
    gens = {i: torch.Generator().manual_seed(100 + i) for i in (1, 4)}
    got, _ = sampler.forward(logits.clone(), gens, None, None)
    for i in gens:
        u = torch.rand(1, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + i))
        assert int(got[i]) == int(sample_inverse_cdf(logits[i:i + 1], u))
    # Row 4 alone, with the same seed: the same token.
    alone, _ = sampler.forward(logits[4:5].clone(), {0: torch.Generator().manual_seed(104)}, None, None)
    assert int(alone[0]) == int(got[4])
    # top-k 1 leaves the argmax whatever the number.
    k1, _ = sampler.forward(logits.clone(), {}, torch.ones(logits.shape[0], dtype=torch.long), None)
    assert torch.equal(k1, logits.argmax(-1))


def test_the_sampler_patch_is_gated_on_the_vllm_it_was_checked_against(monkeypatch):
    """`use_inverse_cdf_sampler` replaces a method of vLLM's CPU sampler (no public hook exists). It
    applies only to the version it was checked against; any other vLLM samples with its own draw.
    This test fails on a vLLM bump until the patch is checked again and PATCHED_VLLM moved on."""
    vllm = pytest.importorskip("vllm")
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from selfalign.tasks import vllm_worker

    assert vllm.__version__ == vllm_worker.PATCHED_VLLM, (
        f"vLLM {vllm.__version__}: check tasks/vllm_worker.use_inverse_cdf_sampler against its CPU sampler, "
        f"then set PATCHED_VLLM")
    original = TopKTopPSampler.forward_cpu
    monkeypatch.setattr(TopKTopPSampler, "forward_cpu", original)  # restored after the test
    monkeypatch.setattr(vllm, "__version__", "0.0.1")
    assert vllm_worker.use_inverse_cdf_sampler() is False and TopKTopPSampler.forward_cpu is original
