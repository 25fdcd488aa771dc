"""Preference losses: golden values of docs/algorithms.md §8, float64 gradchecks, behaviour."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from selfalign.kernels import losses as L

F64 = torch.float64


def t(values, dtype=F64):
    return torch.as_tensor(values, dtype=dtype)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), t(expected), atol=atol, rtol=0)


# docs/algorithms.md §8.1: four pairs, sequence sums and response token counts.
TOY = dict(
    policy_chosen_logps=t([-100.0, -72.0, -150.0, -40.0]),
    policy_rejected_logps=t([-135.0, -66.0, -160.0, -90.0]),
    ref_chosen_logps=t([-105.0, -70.0, -148.0, -45.0]),
    ref_rejected_logps=t([-130.0, -60.0, -150.0, -85.0]),
    chosen_lengths=torch.tensor([50, 40, 80, 25]),
    rejected_lengths=torch.tensor([60, 30, 70, 45]),
)
REF1_CHOSEN = t([-98.0, -75.0, -160.0, -44.0])
REF1_REJECTED = t([-140.0, -63.0, -155.0, -95.0])
POLICY = ("policy_chosen_logps", "policy_rejected_logps")
REFS = ("ref_chosen_logps", "ref_rejected_logps")
LENGTHS = ("chosen_lengths", "rejected_lengths")
USES_LENGTHS = {L.ipo_loss, L.sigmoid_norm_loss, L.simpo_loss}


def call(fn, batch, **kw):
    """Pass each loss the tensors it takes, by keyword."""
    names = POLICY + (() if fn is L.simpo_loss else REFS) + (LENGTHS if fn in USES_LENGTHS else ())
    return fn(**{n: batch[n] for n in names}, **kw)


def random_batch(seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=g, dtype=F64)  # noqa: E731
    return dict(
        policy_chosen_logps=-u(20, 120), policy_rejected_logps=-u(20, 120),
        ref_chosen_logps=-u(20, 120), ref_rejected_logps=-u(20, 120),
        chosen_lengths=torch.randint(5, 60, (b,), generator=g),
        rejected_lengths=torch.randint(5, 60, (b,), generator=g),
    )


# --- §8.2 DPO family / TRL loss types, beta = 0.1 ------------------------------------------------

GOLDEN_82 = [
    ("dpo", {}, [0.313262, 0.513015, 0.371101, 0.313262], 0.377660),
    ("cdpo", {"label_smoothing": 0.1}, [0.413262, 0.553015, 0.451101, 0.413262], 0.457660),
    ("robust", {"label_smoothing": 0.1}, [0.188262, 0.463015, 0.271101, 0.188262], 0.277660),
    ("hinge", {}, [0.0, 0.6, 0.2, 0.0], 0.2),
    ("ipo", {}, [23.200278, 23.522500, 23.835319, 21.985679], 23.135944),
    ("ipo", {"average": False}, [25.0, 1.0, 9.0, 25.0], 15.0),
    ("sppo_hard", {}, [0.0, 50.0, 74.0, 0.0], 31.0),
    ("nca_pair", {}, [1.198154, 1.315952, 1.253839, 1.198154], 1.241525),
    ("bco_pair", {}, [0.948154, 1.235627, 1.111401, 0.948154], 1.060834),
    ("apo_zero", {}, [0.755081, 0.904178, 0.818775, 0.755081], 0.808279),
    ("apo_down", {}, [0.891401, 0.851478, 0.760192, 0.891401], 0.848618),
    ("exo_pair", {"label_smoothing": 1e-3}, [1.276310, 2.099226, 1.523150, 1.276310], 1.543749),
    ("sigmoid_norm", {}, [0.684023, 0.685675, 0.687272, 0.677713], 0.683671),
    ("aot", {}, [0.513015, 0.371101, 0.313262, 0.313262], 0.377660),
    ("discopop", {"tau": 0.05}, [0.367879, 0.670267, 0.449329, 0.367879], 0.463839),
]


@pytest.mark.parametrize("name,kw,per_pair,mean", GOLDEN_82, ids=[f"{g[0]}{g[1]}" for g in GOLDEN_82])
def test_pair_loss_golden(name, kw, per_pair, mean):
    losses, chosen, rejected = call(L.PAIR_LOSSES[name], TOY, beta=0.1, **kw)
    close(losses, per_pair)
    close(losses.mean(), mean)
    assert losses.shape == chosen.shape == rejected.shape == (4,)


@pytest.mark.parametrize("beta,ratio,per_pair,mean", [
    (2.5, 0.55, [1.136871, 0.898123, 0.882335, 0.898123], 0.953863),
    (2.0, 0.5, [0.974077, 0.798139, 0.786414, 0.798139], 0.839192),
])
def test_simpo_golden(beta, ratio, per_pair, mean):
    losses, chosen, _ = call(L.simpo_loss, TOY, beta=beta, gamma_beta_ratio=ratio)
    close(losses, per_pair)
    close(losses.mean(), mean)
    close(chosen, beta * TOY["policy_chosen_logps"] / TOY["chosen_lengths"])


# --- §8.4 alpha-DPO ------------------------------------------------------------------------------

ALPHA_KW = dict(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2)
D_PI = t([0.25, 0.4, 0.410714, 0.4])


def implied_margin(losses, beta=2.5):
    # loss = softplus(-beta (D_pi - m))  =>  m = D_pi + log(expm1(loss)) / beta
    d_pi = TOY["policy_chosen_logps"] / TOY["chosen_lengths"] - TOY["policy_rejected_logps"] / TOY["rejected_lengths"]
    return d_pi + torch.log(torch.expm1(losses)) / beta


@pytest.mark.parametrize("mode,state,c1,c2,margins,per_pair,mean", [
    ("official", L.AlphaDPOState(), 0.019058, 0.008469, [4.479603, 3.692390, 2.933291, 7.497255],
     [10.574034, 8.231241, 6.308265, 17.743137], 10.714170),
    ("official", L.AlphaDPOState(0.2, 1.5, True), 0.199058, 1.358469, [0.597685, 0.592778, 0.588045, 0.616497],
     [1.219363, 0.962876, 0.939180, 0.999948], 1.030342),
    ("stable", L.AlphaDPOState(), 0.190575, 0.084687, [0.582897, 0.504176, 0.428266, 0.884662],
     [1.193458, 0.831821, 0.715327, 1.472252], 1.053214),
], ids=["official-zero-init", "official-warm", "stable-first-batch"])
def test_alpha_dpo_golden(mode, state, c1, c2, margins, per_pair, mean):
    losses, _, _, new = L.alpha_dpo_loss(**TOY, state=state, mode=mode, **ALPHA_KW)
    close(new.mean, c1)
    close(new.std, c2)
    assert new.initialized
    close(implied_margin(losses), margins)
    close(losses, per_pair)
    close(losses.mean(), mean)


def test_alpha_dpo_batch_statistics_and_rewards():
    # §8.4: mu_b = 0.190575, unbiased s_b = 0.084687, visible as the stable first-batch state.
    _, chosen, rejected, new = L.alpha_dpo_loss(**TOY, mode="stable", **ALPHA_KW)
    close(new.mean, 0.190575)
    close(new.std, 0.084687)
    a_pi = TOY["policy_chosen_logps"] / TOY["chosen_lengths"]
    a_ref = TOY["ref_chosen_logps"] / TOY["chosen_lengths"]
    close(chosen, 2.5 * (a_pi - 0.2 * (a_pi - a_ref)))
    assert not rejected.requires_grad


def test_alpha_dpo_stable_is_finite_when_policy_equals_reference():
    same = dict(TOY, ref_chosen_logps=TOY["policy_chosen_logps"].clone(),
                ref_rejected_logps=TOY["policy_rejected_logps"].clone())
    official, _, _, _ = L.alpha_dpo_loss(**same, mode="official", **ALPHA_KW)
    assert torch.isnan(official).all()  # the released code's 0/0, reproduced on purpose
    stable, _, _, state = L.alpha_dpo_loss(**same, mode="stable", **ALPHA_KW)
    assert torch.isfinite(stable).all() and torch.isfinite(torch.as_tensor(state.std))
    # z = 0, so the margin is gamma_beta_ratio alone: exactly SimPO.
    simpo, _, _ = call(L.simpo_loss, TOY, beta=2.5, gamma_beta_ratio=0.6)
    close(stable, simpo.tolist(), atol=1e-12)
    one = {k: v[:1] for k, v in same.items()}
    assert torch.isfinite(L.alpha_dpo_loss(**one, **ALPHA_KW)[0]).all()


def test_alpha_dpo_state_is_explicit_and_not_mutated():
    state = L.AlphaDPOState(0.2, 1.5, True)
    first = L.alpha_dpo_loss(**TOY, state=state, mode="stable", **ALPHA_KW)
    second = L.alpha_dpo_loss(**TOY, state=state, mode="stable", **ALPHA_KW)
    assert state == L.AlphaDPOState(0.2, 1.5, True)
    close(first[0], second[0].tolist(), atol=0)  # no hidden global carried between calls
    close(first[3].mean, 0.199058)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.mean = 0.0


def test_alpha_dpo_stable_ema_after_first_batch():
    _, _, _, s1 = L.alpha_dpo_loss(**TOY, mode="stable", **ALPHA_KW)
    other = random_batch(seed=3, b=4)
    _, _, _, s2 = L.alpha_dpo_loss(**other, state=s1, mode="stable", **ALPHA_KW)
    m = (other["policy_chosen_logps"] - other["ref_chosen_logps"]) / other["chosen_lengths"] \
        - (other["policy_rejected_logps"] - other["ref_rejected_logps"]) / other["rejected_lengths"]
    close(s2.mean, 0.9 * 0.190575 + 0.1 * m.mean().item())
    close(s2.std, 0.9 * 0.084687 + 0.1 * m.std().item())


def test_alpha_dpo_update_false_leaves_state():
    state = L.AlphaDPOState(0.2, 1.5, True)
    losses, _, _, out = L.alpha_dpo_loss(**TOY, state=state, update=False, mode="official", **ALPHA_KW)
    assert out is state
    m = (TOY["policy_chosen_logps"] - TOY["ref_chosen_logps"]) / TOY["chosen_lengths"] \
        - (TOY["policy_rejected_logps"] - TOY["ref_rejected_logps"]) / TOY["rejected_lengths"]
    close(implied_margin(losses), (0.6 + 0.2 * (m - 0.2) / 1.5).tolist())


def test_alpha_dpo_gather_uses_all_ranks_for_statistics():
    other = random_batch(seed=1, b=4)
    full = {k: torch.cat([TOY[k], other[k]]) for k in TOY}
    lw = lambda b: b["policy_chosen_logps"] / b["chosen_lengths"] - b["ref_chosen_logps"] / b["chosen_lengths"]  # noqa: E731
    ll = lambda b: b["policy_rejected_logps"] / b["rejected_lengths"] - b["ref_rejected_logps"] / b["rejected_lengths"]  # noqa: E731
    other_m = lw(other) - ll(other)
    seen = []

    def gather(m):
        seen.append(m.shape)
        return torch.cat([m, other_m])  # this rank first, like accelerator.gather on rank 0

    for mode in ("official", "stable"):
        local, _, _, s_local = L.alpha_dpo_loss(**TOY, mode=mode, gather=gather, **ALPHA_KW)
        whole, _, _, s_whole = L.alpha_dpo_loss(**full, mode=mode, **ALPHA_KW)
        close(local, whole[:4].tolist(), atol=1e-12)
        close(s_local.std, s_whole.std.item(), atol=1e-12)
    assert seen == [(4,), (4,)]
    single, _, _, _ = L.alpha_dpo_loss(**TOY, mode="stable", **ALPHA_KW)
    assert not torch.allclose(single, local)


def test_alpha_dpo_gradient_is_simpo_gradient_with_detached_margin():
    batch = {k: (v.clone().requires_grad_() if k in POLICY else v) for k, v in TOY.items()}
    losses, _, _, _ = L.alpha_dpo_loss(**batch, mode="stable", **ALPHA_KW)
    losses.sum().backward()
    margins = implied_margin(losses.detach())
    expected = -2.5 * torch.sigmoid(-2.5 * (D_PI - margins)) / TOY["chosen_lengths"]
    close(batch["policy_chosen_logps"].grad, expected.tolist())


# --- §8.5 MRPO -----------------------------------------------------------------------------------

MREF = dict(policy_chosen_logps=TOY["policy_chosen_logps"], policy_rejected_logps=TOY["policy_rejected_logps"],
            ref_chosen_logps=torch.stack([TOY["ref_chosen_logps"], REF1_CHOSEN]),
            ref_rejected_logps=torch.stack([TOY["ref_rejected_logps"], REF1_REJECTED]))


def test_mrpo_adaptive_code_convention_golden():
    cw, cl, v = L._mrpo_clip_and_weights(MREF["ref_chosen_logps"], MREF["ref_rejected_logps"], eta=0.1, alpha=-1)
    close(v[1], [0.626866, 0.545455, 0.714286, 0.560440])
    close(v.sum(0), [1.0] * 4, atol=1e-12)
    close(cw[1], [-100.493658, -73.787313, -155.436215, -44.0])
    close(cl[1], [-137.420719, -62.753731, -155.0, -90.687732])
    lw, ll = L.mrpo_combined_reference(MREF["ref_chosen_logps"], MREF["ref_rejected_logps"])
    close(lw, [-104.539526, -73.025681, -154.184925, -44.674470])
    close(ll, [-136.435907, -62.038922, -153.763942, -89.870062])
    losses, chosen, _ = L.mrpo_loss(**MREF)
    close(losses, [0.549959, 0.474577, 0.302113, 0.481506])
    close(losses.mean(), 0.452039)
    close(chosen, (0.1 * (MREF["policy_chosen_logps"] - lw)).tolist())
    naive, _, _ = L.mrpo_loss(**MREF, naive=True)
    close(naive, [0.614705, 0.491085, 0.321540, 0.440999])
    close(naive.mean(), 0.467082)


def test_mrpo_fixed_golden():
    cw, cl, _ = L._mrpo_clip_and_weights(MREF["ref_chosen_logps"], MREF["ref_rejected_logps"], eta=-0.1, alpha=0.5)
    close(cw[1], [-98.0, -75.0, -160.0, -44.0])
    close(cl[1], [-140.0, -63.0, -155.0, -93.5])
    lw, ll = L.mrpo_combined_reference(MREF["ref_chosen_logps"], MREF["ref_rejected_logps"], eta=-0.1, alpha=0.5)
    close(lw, [-104.307764, -74.313568, -159.306859, -44.620115])
    close(ll, [-139.306898, -62.355440, -154.313568, -92.807056])
    losses, _, _ = L.mrpo_loss(**MREF, eta=-0.1, alpha=0.5)
    close(losses, [0.693104, 0.438974, 0.201536, 0.606598])
    close(losses.mean(), 0.485053)
    close(L.mrpo_loss(**MREF, eta=-0.1, alpha=0.5, naive=True)[0].mean(), 0.490148)


def test_mrpo_swapped_convention_golden():
    lw, ll = L.mrpo_combined_reference(MREF["ref_chosen_logps"], MREF["ref_rejected_logps"], convention="swapped")
    close(lw, [-104.032558, -73.199882, -155.099979, -44.562633])
    close(ll, [-136.954052, -62.199310, -154.666219, -90.111352])
    losses, _, _ = L.mrpo_loss(**MREF, convention="swapped")
    close(losses, [0.594612, 0.474055, 0.301780, 0.495149])
    close(losses.mean(), 0.466399)


def test_mrpo_fixed_alpha_limits_pick_one_reference():
    prim = L.dpo_loss(*(MREF[n] for n in POLICY), TOY["ref_chosen_logps"], TOY["ref_rejected_logps"])[0]
    close(L.mrpo_loss(**MREF, alpha=1.0)[0], prim.tolist(), atol=1e-9)
    # eta = -10 makes the clipping band wide enough that ref1 passes unchanged.
    ext = L.dpo_loss(*(MREF[n] for n in POLICY), REF1_CHOSEN, REF1_REJECTED)[0]
    close(L.mrpo_loss(**MREF, alpha=0.0, eta=-10.0)[0], ext.tolist(), atol=1e-9)
    close(L.mrpo_loss(**MREF, alpha=0.0, eta=-10.0, convention="swapped")[0], prim.tolist(), atol=1e-9)


@pytest.mark.parametrize("convention", ["code", "swapped"])
@pytest.mark.parametrize("naive", [False, True])
def test_mrpo_k3_identical_references_reduce_to_dpo(convention, naive):
    refs = {n: TOY[n].expand(3, 4).clone() for n in REFS}
    got = L.mrpo_loss(*(TOY[n] for n in POLICY), *refs.values(), naive=naive, convention=convention)[0]
    close(got, L.dpo_loss(*(TOY[n] for n in POLICY + REFS))[0].tolist(), atol=1e-9)


def test_mrpo_k3_weights_and_clipping():
    rc = torch.stack([TOY["ref_chosen_logps"], REF1_CHOSEN, REF1_CHOSEN - 30])
    rr = torch.stack([TOY["ref_rejected_logps"], REF1_REJECTED, REF1_REJECTED + 1])
    cw, cl, v = L._mrpo_clip_and_weights(rc, rr, eta=0.1, alpha=-1)
    close(v.sum(0), [1.0] * 4, atol=1e-12)
    assert (v > 0).all()
    p = TOY["ref_chosen_logps"]
    assert ((cw[1:] >= 1.1 * p - 1e-9) & (cw[1:] <= 0.9 * p + 1e-9)).all()  # band never wider than eta
    lw, _ = L.mrpo_combined_reference(rc, rr, convention="code")
    assert ((lw >= cw.min(0).values) & (lw <= cw.max(0).values)).all()  # a mean of the references
    losses, _, _ = L.mrpo_loss(TOY["policy_chosen_logps"], TOY["policy_rejected_logps"], rc, rr)
    assert losses.shape == (4,) and torch.isfinite(losses).all()


def test_mrpo_adaptive_weight_when_no_reference_discriminates():
    # Both references score y_w and y_l alike: the official alpha = 0/(0 + 0 + 1e-6) = 0, so the
    # code convention keeps only (clipped) ref1 and the swapped one only the primary; no 0/0.
    rc = torch.stack([TOY["ref_chosen_logps"], REF1_CHOSEN])
    cw, _, v = L._mrpo_clip_and_weights(rc, rc.clone(), eta=0.1, alpha=-1)
    close(v, [[1.0] * 4, [0.0] * 4], atol=0)
    close(L.mrpo_combined_reference(rc, rc.clone())[0], cw[1].tolist(), atol=1e-9)
    close(L.mrpo_combined_reference(rc, rc.clone(), convention="swapped")[0], cw[0].tolist(), atol=1e-9)


def test_mrpo_rejects_bad_shapes_and_convention():
    with pytest.raises(ValueError, match=r"\(4,\)"):
        L.mrpo_loss(*(TOY[n] for n in POLICY + REFS))
    with pytest.raises(ValueError, match="'both'"):
        L.mrpo_loss(**MREF, convention="both")


# --- §8.7 HPO ------------------------------------------------------------------------------------

PAIR1 = {k: v[:1] for k, v in TOY.items()}
HPO_KW = dict(chosen_aux_rewards=t([0.8]), rejected_aux_rewards=t([-0.4]), values=t([0.1]))


def test_hpo_golden():
    kw = dict(beta=0.1, eta=1.0, lam=1.0, w_max=20.0, nll="mean")
    total, _, _ = L.hpo_loss(**PAIR1, **HPO_KW, **kw)
    pref, _, _ = L.hpo_loss(**PAIR1, **HPO_KW, **dict(kw, lam=0.0))
    close(pref, [0.313262])
    close(total - pref, [2.696100])
    close(total, [3.009361])
    # w = (2.013753, 0.606531) with NLL (2.0, 2.25): recovered from the chosen-only term.
    only_w = L.hpo_loss(**PAIR1, **HPO_KW, **kw, aux_on_rejected=False)[0] - pref
    close(only_w / 2.0, [2.013753])
    close(2 * (total - pref) - only_w, [0.606531 * 2.25])
    values = t([0.1, 0.1], dtype=F64).requires_grad_()
    lv = L.expectile_loss(values, t([0.8, -0.4]), tau=0.7)
    close(lv.mean(), 0.209)
    lv.mean().backward()
    close(values.grad, [-0.7 * 0.7, 0.3 * 0.5])  # d/dV of mean |tau - 1(u<0)| u^2


def test_hpo_weight_clip_sum_nll_and_kto():
    big = dict(HPO_KW, chosen_aux_rewards=t([1e4]))
    pref = L.hpo_loss(**PAIR1, **big, lam=0.0)[0]
    only_w = L.hpo_loss(**PAIR1, **big, w_max=20.0, aux_on_rejected=False)[0] - pref
    close(only_w, [20.0 * 2.0])
    summed = L.hpo_loss(**PAIR1, **HPO_KW, nll="sum", aux_on_rejected=False)[0] - pref
    close(summed, [math.exp(0.7) * 100.0])
    kto, chosen, _ = L.hpo_loss(**TOY, **{k: v.expand(4) for k, v in HPO_KW.items()}, preference="kto", lam=0.0)
    c = TOY["policy_chosen_logps"] - TOY["ref_chosen_logps"]
    r = TOY["policy_rejected_logps"] - TOY["ref_rejected_logps"]
    z_c, z_r = max(c.mean().item(), 0.0), max(r.mean().item(), 0.0)
    close(kto, (0.5 * (2 - torch.sigmoid(0.1 * (c - z_r)) - torch.sigmoid(0.1 * (z_c - r)))).tolist())
    close(chosen, (0.1 * c).tolist())
    with pytest.raises(ValueError, match="'kl'"):
        L.hpo_loss(**PAIR1, **HPO_KW, preference="kl")


def test_hpo_kto_reference_point_is_detached():
    batch = {k: (v.clone().requires_grad_() if k in POLICY else v) for k, v in TOY.items()}
    aux = {k: v.expand(4) for k, v in HPO_KW.items()}
    L.hpo_loss(**batch, **aux, preference="kto", lam=0.0)[0].sum().backward()
    c = TOY["policy_chosen_logps"] - TOY["ref_chosen_logps"]
    r = TOY["policy_rejected_logps"] - TOY["ref_rejected_logps"]
    s = torch.sigmoid(0.1 * (c - max(r.mean().item(), 0.0)))
    close(batch["policy_chosen_logps"].grad, (-0.5 * 0.1 * s * (1 - s)).tolist(), atol=1e-12)


# --- gradients -----------------------------------------------------------------------------------

def _gradcheck(f, batch):
    inputs = tuple(batch[n].clone().requires_grad_() for n in POLICY)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(L.PAIR_LOSSES))
def test_pair_loss_gradcheck(name):
    batch = random_batch()
    fn = L.PAIR_LOSSES[name]
    _gradcheck(lambda pw, pl: call(fn, dict(batch, policy_chosen_logps=pw, policy_rejected_logps=pl),
                                   beta=0.1)[0], batch)


@pytest.mark.parametrize("mode", ["official", "stable"])
def test_alpha_dpo_gradcheck(mode):
    batch = random_batch(seed=2)
    pw0, pl0 = batch["policy_chosen_logps"], batch["policy_rejected_logps"]

    def f(pw, pl):
        # Moving the reference with the policy (values only) keeps M, hence the margin, fixed, so
        # finite differences see exactly the gradient a detached margin gives. A margin that leaked
        # gradient would add a term here that the numeric side does not have.
        return L.alpha_dpo_loss(pw, pl, batch["ref_chosen_logps"] + (pw - pw0).detach(),
                                batch["ref_rejected_logps"] + (pl - pl0).detach(),
                                batch["chosen_lengths"], batch["rejected_lengths"],
                                state=L.AlphaDPOState(0.1, 0.5, True), mode=mode, **ALPHA_KW)[0]
    _gradcheck(f, batch)


@pytest.mark.parametrize("k,naive,convention", [(2, False, "code"), (2, False, "swapped"), (2, True, "code"),
                                                (3, False, "code"), (3, True, "swapped")])
def test_mrpo_gradcheck(k, naive, convention):
    batch = random_batch(seed=4)
    extra = random_batch(seed=5)
    rc = torch.stack([batch["ref_chosen_logps"], extra["ref_chosen_logps"], extra["policy_chosen_logps"]][:k])
    rr = torch.stack([batch["ref_rejected_logps"], extra["ref_rejected_logps"], extra["policy_rejected_logps"]][:k])
    _gradcheck(lambda pw, pl: L.mrpo_loss(pw, pl, rc, rr, naive=naive, convention=convention)[0], batch)


@pytest.mark.parametrize("preference,nll", [("dpo", "mean"), ("dpo", "sum"), ("kto", "mean")])
def test_hpo_gradcheck(preference, nll):
    batch = random_batch(seed=6)
    # Policy below the reference everywhere: the KTO reference point is clamped at 0, locally constant.
    batch["ref_chosen_logps"] = batch["policy_chosen_logps"] + 3.0
    batch["ref_rejected_logps"] = batch["policy_rejected_logps"] + 1.0
    g = torch.Generator().manual_seed(7)
    aux = dict(chosen_aux_rewards=torch.randn(5, generator=g, dtype=F64),
               rejected_aux_rewards=torch.randn(5, generator=g, dtype=F64),
               values=torch.randn(5, generator=g, dtype=F64))
    _gradcheck(lambda pw, pl: L.hpo_loss(pw, pl, *(batch[n] for n in REFS + LENGTHS), **aux,
                                         preference=preference, nll=nll, eta=0.5, w_max=3.0)[0], batch)


def test_expectile_gradcheck():
    values = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(8)).requires_grad_()
    targets = torch.linspace(-2, 2, 6, dtype=F64) + 0.05
    assert torch.autograd.gradcheck(lambda v: L.expectile_loss(v, targets, tau=0.8), (values,))


# --- behaviour -----------------------------------------------------------------------------------

ALL_LOSSES = [
    *(lambda b, fn=fn: call(fn, b) for fn in dict.fromkeys(L.PAIR_LOSSES.values())),
    lambda b: L.alpha_dpo_loss(**b)[:3],
    lambda b: L.mrpo_loss(b["policy_chosen_logps"], b["policy_rejected_logps"],
                          torch.stack([b["ref_chosen_logps"], REF1_CHOSEN]),
                          torch.stack([b["ref_rejected_logps"], REF1_REJECTED])),
    lambda b: L.hpo_loss(**b, **{k: v.expand(4) for k, v in HPO_KW.items()}),
]


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_rewards_are_detached_and_loss_has_grad(loss):
    batch = {k: (v.clone().requires_grad_() if k in POLICY + REFS else v) for k, v in TOY.items()}
    losses, chosen, rejected = loss(batch)
    assert losses.requires_grad and losses.shape == (4,)
    assert not chosen.requires_grad and not rejected.requires_grad
    assert chosen.shape == rejected.shape == (4,)


def test_round_start_dpo_is_ln2():
    # §8.6: at a DICE round start the policy is its own reference.
    losses, chosen, rejected = L.dpo_loss(TOY["policy_chosen_logps"], TOY["policy_rejected_logps"],
                                          TOY["policy_chosen_logps"], TOY["policy_rejected_logps"], beta=0.1)
    close(losses, [math.log(2)] * 4, atol=1e-12)
    close(chosen - rejected, [0.0] * 4, atol=0)


@pytest.mark.parametrize("name", ["dpo", "robust", "nca_pair", "bco_pair", "discopop", "exo_pair", "aot"])
def test_extreme_margins_stay_finite(name):
    # log(sigmoid(-1000)) underflows to -inf; logsigmoid gives -1000.
    batch = dict(TOY, policy_chosen_logps=TOY["policy_chosen_logps"] - 1e4)
    losses = call(L.PAIR_LOSSES[name], batch, beta=0.1)[0]
    assert torch.isfinite(losses).all()
    if name == "dpo":
        assert losses.min() > 990


def test_hyper_parameter_validation_and_defaults():
    with pytest.raises(ValueError, match="0.5"):
        L.robust_loss(*(TOY[n] for n in POLICY + REFS), label_smoothing=0.5)
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.ipo_loss(*(TOY[n] for n in POLICY + REFS))
    with pytest.raises(ValueError, match="'trl'"):
        L.alpha_dpo_loss(**TOY, mode="trl")
    zero = L.exo_pair_loss(*(TOY[n] for n in POLICY + REFS), label_smoothing=0.0)[0]
    close(zero, [1.276310, 2.099226, 1.523150, 1.276310])


def test_empty_response_does_not_divide_by_zero():
    batch = dict(TOY, chosen_lengths=torch.tensor([0, 40, 80, 25]),
                 policy_chosen_logps=t([0.0, -72.0, -150.0, -40.0]), ref_chosen_logps=t([0.0, -70.0, -148.0, -45.0]))
    for fn in (L.simpo_loss, L.ipo_loss, L.sigmoid_norm_loss):
        assert torch.isfinite(call(fn, batch)[0]).all()


def test_aot_mean_is_permutation_invariant_but_pairs_are_not():
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = {k: v[perm] for k, v in TOY.items()}
    a, b = call(L.aot_loss, TOY)[0], call(L.aot_loss, shuffled)[0]
    close(a, b.tolist(), atol=1e-12)  # losses are per rank, not per pair
    assert not torch.allclose(a, call(L.dpo_loss, TOY)[0])
    close(a.mean(), call(L.dpo_loss, TOY)[0].mean().item())
