"""The training stage's loss dispatch: every configurable loss name reaches the right function
with the right hyper-parameters, from per-sequence sums and token counts alone."""
import math

import pytest
import torch

from selfalign.kernels import losses as L
from selfalign.kernels.losses import PAIR_LOSSES
from selfalign.tasks.train_worker import Objective

# ALGORITHMS.md 8.1 toy batch
PC = torch.tensor([-100.0, -72, -150, -40], dtype=torch.float64)
PR = torch.tensor([-135.0, -66, -160, -90], dtype=torch.float64)
RC = torch.tensor([-105.0, -70, -148, -45], dtype=torch.float64)
RR = torch.tensor([-130.0, -60, -150, -85], dtype=torch.float64)
NC = torch.tensor([50.0, 40, 80, 25], dtype=torch.float64)
NR = torch.tensor([60.0, 30, 70, 45], dtype=torch.float64)
SPEC = {"beta": 0.1, "label_smoothing": 0.0, "gamma_beta_ratio": 0.5, "alpha": 0.2, "alpha_mode": "stable"}


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES) + ["alpha_dpo"])
def test_every_loss_name_dispatches(name):
    losses, c, r = Objective(SPEC | {"loss": name}, world=1)(PC, PR, RC, RR, NC, NR)
    assert losses.shape == (4,) and torch.isfinite(losses).all()
    assert not c.requires_grad and not r.requires_grad


def test_golden_values_through_the_dispatch():
    # ALGORITHMS.md 8.2 / 8.3
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
    # stable mode initialises from the first batch (ALGORITHMS.md 8.4, last row: mean 1.053214)
    fresh = Objective(SPEC | {"loss": "alpha_dpo", "beta": 2.5, "gamma_beta_ratio": 0.6}, world=1)
    assert fresh(PC, PR, RC, RR, NC, NR)[0].mean().item() == pytest.approx(1.053214, abs=1e-6)
    assert math.isfinite(float(first.std))
