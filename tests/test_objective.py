"""The training stage's loss dispatch: every configurable loss name reaches the right function
with the right hyper-parameters, from per-sequence sums and token counts alone."""
import math

import pytest
import torch

from selfalign.kernels.losses import PAIR_LOSSES
from selfalign.tasks.train_worker import Objective

# docs/algorithms.md 8.1 toy batch
PC = torch.tensor([-100.0, -72, -150, -40], dtype=torch.float64)
PR = torch.tensor([-135.0, -66, -160, -90], dtype=torch.float64)
RC = torch.tensor([-105.0, -70, -148, -45], dtype=torch.float64)
RR = torch.tensor([-130.0, -60, -150, -85], dtype=torch.float64)
NC = torch.tensor([50.0, 40, 80, 25], dtype=torch.float64)
NR = torch.tensor([60.0, 30, 70, 45], dtype=torch.float64)
RC1 = torch.tensor([-98.0, -75, -160, -44], dtype=torch.float64)  # MRPO's additional reference
RR1 = torch.tensor([-140.0, -63, -155, -95], dtype=torch.float64)
SPEC = {"beta": 0.1, "label_smoothing": 0.0, "gamma_beta_ratio": 0.5, "alpha": 0.2, "alpha_mode": "stable",
        "mrpo": {"eta": 0.1, "alpha": -1.0, "convention": "code", "naive": False},
        "hpo": {"preference": "dpo", "lam": 1.0, "eta": 1.0, "w_max": 20.0, "tau": 0.7, "nll": "mean",
                "on_rejected": True}}


def _args(name):
    if name == "mrpo":
        return (PC, PR, torch.stack([RC, RC1]), torch.stack([RR, RR1]), NC, NR)
    if name == "hpo":
        aux_c, aux_r, values = torch.full_like(PC, 0.8), torch.full_like(PC, -0.4), torch.full_like(PC, 0.1)
        return (PC, PR, RC, RR, NC, NR, aux_c, aux_r, values)
    return (PC, PR, RC, RR, NC, NR)


LN2 = math.log(2)
# First-step loss at policy == reference (h = c = r = 0), beta = 0.1, the config's defaults; None where
# it depends on the policy's own log-probs (reference-free parts). tests/test_train.py checks some of
# them through the training stage.
AT_REFERENCE = {
    "dpo": LN2, "cdpo": LN2, "robust": LN2, "sigmoid_norm": LN2, "aot": LN2, "mrpo": LN2,
    "ipo": 25.0, "sppo_hard": 50.0, "hinge": 1.0, "apo_zero": 1.0, "apo_down": 1.0,
    "bco_pair": 2 * LN2, "nca_pair": 2 * LN2, "discopop": 0.5 * LN2 + 0.5,
    "exo_pair": -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3)),
    "simpo": None, "alpha_dpo": None, "hpo": None,
}


def test_every_configurable_loss_has_its_round_start_value():
    from selfalign.tasks.train_config import LOSSES

    assert LOSSES == sorted(PAIR_LOSSES) + ["alpha_dpo", "mrpo", "hpo"]
    assert set(AT_REFERENCE) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(n for n, v in AT_REFERENCE.items() if v is not None))
def test_each_loss_at_the_round_start(name):
    """Policy == reference, as at the start of every round: the loss is the value above on every pair."""
    spec = SPEC | {"loss": name} | ({"label_smoothing": 0.1} if name == "cdpo" else {})
    rc, rr = (torch.stack([PC, PC]), torch.stack([PR, PR])) if name == "mrpo" else (PC, PR)
    losses = Objective(spec, world=1)(PC, PR, rc, rr, NC, NR)[0]
    torch.testing.assert_close(losses, torch.full_like(losses, AT_REFERENCE[name]), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES) + ["alpha_dpo", "mrpo", "hpo"])
def test_every_loss_name_dispatches(name):
    losses, c, r = Objective(SPEC | {"loss": name}, world=1)(*_args(name))
    assert losses.shape == (4,) and torch.isfinite(losses).all()
    assert not c.requires_grad and not r.requires_grad


def test_golden_values_through_the_dispatch():
    # docs/algorithms.md 8.2 / 8.3
    mean = lambda name, **kw: Objective(SPEC | {"loss": name} | kw, world=1)(PC, PR, RC, RR, NC, NR)[0].mean().item()
    assert mean("dpo") == pytest.approx(0.377660, abs=1e-6)
    assert mean("cdpo", label_smoothing=0.1) == pytest.approx(0.457660, abs=1e-6)
    assert mean("ipo") == pytest.approx(23.135944, abs=1e-6)
    assert mean("sigmoid_norm") == pytest.approx(0.683671, abs=1e-6)
    assert mean("simpo", beta=2.0, gamma_beta_ratio=0.5) == pytest.approx(0.839192, abs=1e-6)
    assert mean("exo_pair") == pytest.approx(1.543749, abs=1e-6)


def test_alpha_dpo_state_carries_across_steps():
    obj = Objective(SPEC | {"loss": "alpha_dpo", "beta": 2.5, "gamma_beta_ratio": 0.6}, world=1)
    obj(PC, PR, RC, RR, NC, NR)
    first = obj.state
    obj(PC, PR, RC, RR, NC, NR)
    assert first.initialized and obj.state is not first
    # stable mode initialises from the first batch (docs/algorithms.md 8.4, last row: mean 1.053214)
    fresh = Objective(SPEC | {"loss": "alpha_dpo", "beta": 2.5, "gamma_beta_ratio": 0.6}, world=1)
    assert fresh(PC, PR, RC, RR, NC, NR)[0].mean().item() == pytest.approx(1.053214, abs=1e-6)
    assert math.isfinite(float(first.std))


def test_mrpo_golden_values_through_the_dispatch():
    # docs/algorithms.md 8.5: rows (primary = S_ref, additional = S_ref1)
    mean = lambda **kw: Objective(SPEC | {"loss": "mrpo", "mrpo": SPEC["mrpo"] | kw}, world=1)(*_args("mrpo"))[0].mean().item()
    assert mean() == pytest.approx(0.452039, abs=1e-6)
    assert mean(naive=True) == pytest.approx(0.467082, abs=1e-6)
    assert mean(eta=-0.1, alpha=0.5) == pytest.approx(0.485053, abs=1e-6)
    assert mean(convention="swapped") == pytest.approx(0.466399, abs=1e-6)


def test_hpo_golden_values_through_the_dispatch():
    # docs/algorithms.md 8.7, pair 1: L_total 3.009361 with token-mean NLL (2.0, 2.25); value loss 0.209
    obj = Objective(SPEC | {"loss": "hpo"}, world=1)
    args = [a[:1] for a in _args("hpo")]
    losses, c, r = obj(*args)
    assert losses.item() == pytest.approx(3.009361, abs=1e-6)
    assert obj.value_loss(args[-1], args[-3], args[-2]).item() == pytest.approx(0.209, abs=1e-6)
    no_nll = SPEC | {"loss": "hpo", "hpo": SPEC["hpo"] | {"lam": 0.0}}
    assert obj.__class__(no_nll, world=1)(*args)[0].item() == pytest.approx(0.313262, abs=1e-6)


def test_a_new_loss_needs_only_its_function_and_its_config_field(monkeypatch):
    """The contract of docs/extending.md: tensors by parameter name, hyper-parameters by config key."""
    import torch.nn.functional as F

    from selfalign.kernels import losses

    def margin_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                        *, beta: float = 0.1, margin: float = 1.0):
        h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
        return -F.logsigmoid(beta * h - margin), (beta * h).detach(), (0 * h).detach()

    monkeypatch.setitem(losses.PAIR_LOSSES, "margin_dpo", margin_dpo_loss)
    got = Objective(SPEC | {"loss": "margin_dpo", "margin": 0.5, "unrelated": 3}, world=1)(PC, PR, RC, RR, NC, NR)[0]
    h = (PC - RC) - (PR - RR)
    torch.testing.assert_close(got, -torch.nn.functional.logsigmoid(0.1 * h - 0.5))
    default = Objective(SPEC | {"loss": "margin_dpo"}, world=1)(PC, PR, RC, RR, NC, NR)[0]
    torch.testing.assert_close(default, -torch.nn.functional.logsigmoid(0.1 * h - 1.0))
