"""Preference losses as pure functions over per-sequence log-probs.
Over 400 lines for one contract: every loss of train.loss, each a short pure function under it.

Inputs are summed response log-probs S(y) of shape (B,) (``policy_*``, ``ref_*``) and, where a loss
needs token averages A(y) = S(y)/|y|, response token counts ``chosen_lengths``/``rejected_lengths``
(B,). Hyper-parameters are keyword-only. Every loss returns ``(losses, chosen_rewards,
rejected_rewards)``: per-pair losses (B,) (the caller takes the mean) and detached rewards (B,) in the
loss's own units. ``alpha_dpo_loss`` additionally returns its updated running state.
Notation: c = S_pi(y_w) - S_ref(y_w), r = S_pi(y_l) - S_ref(y_l), h = c - r.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _avg(logps: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if lengths is None:
        raise ValueError("this loss averages log-probs per token: pass chosen_lengths and rejected_lengths")
    # A fully masked response has 0 labels and sum 0; dividing by 1 keeps it 0 instead of NaN.
    return logps / lengths.clamp(min=1)


def _sigmoid(x: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * x) - label_smoothing * F.logsigmoid(-beta * x)


def _ratios(pc, pr, rc, rr) -> tuple[torch.Tensor, torch.Tensor]:
    return pc - rc, pr - rr


def _rewards(beta: float, c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * c.detach(), beta * r.detach()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al., 2023), sigmoid form; ``label_smoothing`` > 0 gives cDPO.

    h = (S_pi(y_w) - S_pi(y_l)) - (S_ref(y_w) - S_ref(y_l))      (summed log-probs)
    loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    rewards = beta * (S_pi(y) - S_ref(y)), detached.
    Shapes: all inputs (B,), outputs (B,).
    """
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_lengths=None, rejected_lengths=None, *, beta: float = 0.1, average: bool = True) -> Losses:
    """IPO (Azar et al., 2023, arXiv 2310.12036), TRL semantics (same number in 0.8.6, 0.12 and 1.x).

    average=True:  h_bar = c/|y_w| - r/|y_l|;  loss = (h_bar - 1/(2 beta))^2   (needs lengths)
    average=False: loss = (h - 1/(2 beta))^2 on sums, as in the original DPO repository.
    Rewards: beta * log-ratio in the same aggregation (per-token when averaged). Shapes (B,).
    """
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if average:
        c, r = _avg(c, chosen_lengths), _avg(r, rejected_lengths)
    return (c - r - 1 / (2 * beta)) ** 2, *_rewards(beta, c, r)


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               *, beta: float = 0.1) -> Losses:
    """SLiC hinge (Zhao et al., 2023, arXiv 2305.10425), TRL ``hinge``: loss = relu(1 - beta * h).
    Shapes (B,)."""
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1 - beta * (c - r)), *_rewards(beta, c, r)


def robust_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                *, beta: float = 0.1, label_smoothing: float = 0.0) -> Losses:
    """Robust DPO (Chowdhury et al., 2024, arXiv 2403.00409), TRL ``robust``; eps = label flip rate.

    loss = [-(1 - eps) * logsigmoid(beta h) + eps * logsigmoid(-beta h)] / (1 - 2 eps). Shapes (B,).
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = c - r
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses, *_rewards(beta, c, r)


def exo_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  *, beta: float = 0.1, label_smoothing: float = 1e-3) -> Losses:
    """EXO, pairwise (Ji et al., 2024, arXiv 2402.00856), TRL ``exo_pair``: reverse KL between the
    model's and the (smoothed) label's preference distribution.

    loss = sig(beta h) * (logsigmoid(beta h) - log(1 - eps)) + sig(-beta h) * (logsigmoid(-beta h) - log eps)
    eps = 0 is replaced by 1e-3 as TRL does (log 0 would be infinite). Shapes (B,).
    """
    eps = label_smoothing or 1e-3
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (c - r)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return losses, *_rewards(beta, c, r)


def bco_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  *, beta: float = 0.1, delta: float = 0.0) -> Losses:
    """BCO, pairwise (Jung et al., 2024, arXiv 2404.04656), TRL ``bco_pair``.

    loss = -logsigmoid(beta c - delta) - logsigmoid(-(beta r - delta)).
    delta = 0 is TRL HEAD; TRL 0.12 used a running mean of the batch rewards, which the caller can
    keep and pass here. Shapes (B,).
    """
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * c - delta) - F.logsigmoid(-(beta * r - delta))
    return losses, *_rewards(beta, c, r)


def sppo_hard_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   *, beta: float = 0.1) -> Losses:
    """SPPO with hard labels (Wu et al., 2024, arXiv 2405.00675), TRL ``sppo_hard``.

    loss = (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2   (raw log-ratios, not scaled by beta). Shapes (B,).
    """
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2, *_rewards(beta, c, r)


def nca_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  *, beta: float = 0.1) -> Losses:
    """NCA, pairwise (Chen et al., 2024, arXiv 2402.05369), TRL ``nca_pair``.

    loss = -logsigmoid(beta c) - 0.5 logsigmoid(-beta c) - 0.5 logsigmoid(-beta r). Shapes (B,).
    """
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    return losses, *_rewards(beta, c, r)


def apo_zero_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  *, beta: float = 0.1) -> Losses:
    """APO-zero (D'Oosterlinck et al., 2024, arXiv 2408.06266), TRL ``apo_zero``: push chosen up and
    rejected down. loss = (1 - sig(beta c)) + sig(beta r). Shapes (B,)."""
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r), *_rewards(beta, c, r)


def apo_down_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  *, beta: float = 0.1) -> Losses:
    """APO-down (D'Oosterlinck et al., 2024, arXiv 2408.06266), TRL ``apo_down``: push both down,
    rejected more. loss = sig(beta c) + (1 - sig(beta h)). Shapes (B,)."""
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * (c - r))), *_rewards(beta, c, r)


def discopop_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  *, beta: float = 0.1, tau: float = 0.05) -> Losses:
    """DiscoPOP / log-ratio modulated loss (Lu et al., 2024, arXiv 2406.08414), TRL ``discopop``.

    z = beta h;  m = sig(z / tau);  loss = (1 - m) * (-logsigmoid(z)) + m * exp(-z). Shapes (B,).
    """
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (c - r)
    # m * exp(-z) taken in log space: the naive product is 0 * inf = NaN once z < -710 (float64).
    losses = torch.sigmoid(-z / tau) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)
    return losses, *_rewards(beta, c, r)


def sigmoid_norm_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_lengths, rejected_lengths, *, beta: float = 0.1) -> Losses:
    """Length-normalised DPO, TRL 1.x ``sigmoid_norm``.

    h_bar = c/|y_w| - r/|y_l|;  loss = -logsigmoid(beta * h_bar). Rewards per token. Shapes (B,).
    """
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    c, r = _avg(c, chosen_lengths), _avg(r, rejected_lengths)
    return _sigmoid(c - r, beta), *_rewards(beta, c, r)


def aot_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta: float = 0.1, label_smoothing: float = 0.0) -> Losses:
    """AOT, paired (Melnyk et al., 2024, arXiv 2406.05882), TRL ``aot``.

    Sort the policy margins S_pi(y_w) - S_pi(y_l) and the reference margins independently within the
    batch, d = sorted_pi - sorted_ref; loss = sigmoid loss on d (with cDPO smoothing).
    The i-th loss belongs to the i-th rank, not to pair i: only the batch mean is meaningful, and it
    depends on which pairs share the batch. Rewards are the usual unsorted beta * c, beta * r. (B,).
    """
    pi_sorted, _ = torch.sort(policy_chosen_logps - policy_rejected_logps)
    ref_sorted, _ = torch.sort(ref_chosen_logps - ref_rejected_logps)
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _sigmoid(pi_sorted - ref_sorted, beta, label_smoothing), *_rewards(beta, c, r)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
               *, beta: float = 2.0, gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0) -> Losses:
    """SimPO (Meng et al., 2024, arXiv 2405.14734), as in the official trainer: reference-free.

    logits = (A_pi(y_w) - A_pi(y_l)) - gamma_beta_ratio      (token averages)
    loss = -(1 - ls) logsigmoid(beta logits) - ls logsigmoid(-beta logits)   (= -logsig(beta D - gamma))
    rewards = beta * A_pi(y), detached. Shapes (B,).
    """
    aw, al = _avg(policy_chosen_logps, chosen_lengths), _avg(policy_rejected_logps, rejected_lengths)
    return _sigmoid(aw - al - gamma_beta_ratio, beta, label_smoothing), *_rewards(beta, aw, al)


@dataclass(frozen=True)
class AlphaDPOState:
    """Running normaliser of alpha-DPO's margin M: EMA of the batch mean and std.

    Values are 0-dim tensors after the first call (floats before), so no device sync is needed.
    Checkpoint it with the model if a resumed run must continue the same normalisation.
    """
    mean: torch.Tensor | float = 0.0
    std: torch.Tensor | float = 0.0
    initialized: bool = False


def alpha_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   chosen_lengths, rejected_lengths, *, state: AlphaDPOState | None = None,
                   beta: float = 2.5, gamma_beta_ratio: float = 0.6, alpha: float = 0.2,
                   label_smoothing: float = 0.0, mode: str = "stable", decay: float = 0.9,
                   eps: float = 1e-8, update: bool = True,
                   gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AlphaDPOState]:
    """alpha-DPO / AlphaDPO (Wu et al., 2024, arXiv 2410.10148), official ``alpha-dpo`` branch.

    D_pi = A_pi(y_w) - A_pi(y_l);  M = D_pi - (A_ref(y_w) - A_ref(y_l))          (token averages)
    (c1, c2) = running (mean, std) of M, updated from this batch before use (see modes)
    margin = sg[alpha * (M - c1) / c2 + gamma_beta_ratio];  logits = D_pi - margin
    loss = -(1 - ls) logsigmoid(beta logits) - ls logsigmoid(-beta logits)
    rewards = beta * (A_pi(y) - alpha * (A_pi(y) - A_ref(y))), detached (as the official code logs).

    Batch statistics are the mean and unbiased std of ``gather(M)`` (M of all ranks for this
    micro-batch; ``gather=None`` = one process), under no_grad. Modes:
    * "official": c1 = c2 = 0 initially, c <- decay*c + (1-decay)*stat on every call, no epsilon.
      Bit-faithful, including its artefacts: margins ~10x too large for the first calls and 0/0 = NaN
      when policy == reference (std 0).
    * "stable" (default): the first call sets c1, c2 to the batch statistics, later calls use the EMA;
      c2 is clamped to >= eps and a single gathered value counts as std 0, so policy == reference
      gives z = 0 and the SimPO loss instead of NaN.
    ``update=False`` (e.g. evaluation) uses the state without folding this batch in and returns it
    unchanged; an uninitialised stable state then normalises with the batch's own statistics.
    Shapes: tensors (B,); returns (losses, chosen_rewards, rejected_rewards, new_state).
    """
    if mode not in ("official", "stable"):
        raise ValueError(f"alpha_dpo_loss mode must be 'official' or 'stable', got {mode!r}")
    state = state if state is not None else AlphaDPOState()
    pw, pl = _avg(policy_chosen_logps, chosen_lengths), _avg(policy_rejected_logps, rejected_lengths)
    rw, rl = _avg(ref_chosen_logps, chosen_lengths), _avg(ref_rejected_logps, rejected_lengths)
    d_pi = pw - pl
    with torch.no_grad():
        m = (d_pi - (rw - rl)).detach()
        gathered = m if gather is None else gather(m)
        mu = gathered.mean()
        if mode == "stable" and gathered.numel() < 2:
            sd = torch.zeros_like(mu)  # unbiased std of one value is NaN
        else:
            sd = gathered.std()
        c1 = torch.as_tensor(state.mean, dtype=m.dtype, device=m.device)
        c2 = torch.as_tensor(state.std, dtype=m.dtype, device=m.device)
        if mode == "stable" and not state.initialized:
            c1, c2 = mu, sd
        elif update:
            c1, c2 = decay * c1 + (1 - decay) * mu, decay * c2 + (1 - decay) * sd
        denom = c2.clamp(min=eps) if mode == "stable" else c2
        margin = alpha * (m - c1) / denom + gamma_beta_ratio
    losses = _sigmoid(d_pi - margin, beta, label_smoothing)
    chosen_rewards = beta * (pw - alpha * (pw - rw)).detach()
    rejected_rewards = beta * (pl - alpha * (pl - rl)).detach()
    new_state = AlphaDPOState(c1, c2, True) if update else state
    return losses, chosen_rewards, rejected_rewards, new_state


def _mrpo_clip_and_weights(ref_chosen_logps, ref_rejected_logps, *, eta: float, alpha: float):
    """CTRO clipping of references 1.. around reference 0 and ARWC "own-confidence" weights v (K, B).

    v_k is the share of reference k's discriminative confidence |S_k(y_w) - S_k(y_l)|, the official
    1e-6 going to the primary's confidence so that K = 2 gives exactly v_1 = alpha_code,
    v_0 = 1 - alpha_code. A fixed alpha >= 0 gives v_0 = 1 - alpha, v_k = alpha/(K-1).
    """
    rw, rl = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    if rw.dim() != 2 or rw.shape[0] < 2 or rw.shape != rl.shape:
        raise ValueError(f"MRPO needs (K>=2, B) reference log-probs, got {tuple(rw.shape)} and {tuple(rl.shape)}")
    k = rw.shape[0]
    conf = (rw - rl).abs()
    if alpha < 0:
        conf = torch.cat([conf[:1] + 1e-6, conf[1:]])
        v = conf / conf.sum(0)
    else:
        v = torch.cat([torch.full_like(conf[:1], 1 - alpha), torch.full_like(conf[1:], alpha / (k - 1))])
    # Each additional reference gets the official K=2 budget against the primary, pairwise.
    p_w, p_l = rw[:1], rl[:1]
    if eta >= 0:
        b_w, b_l = ((rw[1:] + p_w) / 2).abs(), ((rl[1:] + p_l) / 2).abs()
        e_w, e_l = eta * b_w / (b_w + b_l), eta * b_l / (b_w + b_l)
    else:
        e_w = e_l = -eta
    # Log-probs are negative, so (1 + e) * p <= p <= (1 - e) * p is a band of relative width e.
    cw = torch.minimum(torch.maximum(rw[1:], (1 + e_w) * p_w), (1 - e_w) * p_w)
    cl = torch.minimum(torch.maximum(rl[1:], (1 + e_l) * p_l), (1 - e_l) * p_l)
    return torch.cat([p_w, cw]), torch.cat([p_l, cl]), v


def mrpo_combined_reference(ref_chosen_logps, ref_rejected_logps, *, eta: float = 0.1,
                            alpha: float = -1.0, convention: str = "code") -> tuple[torch.Tensor, torch.Tensor]:
    """MRPO's combined reference log-probs: log H = -logsumexp_k(log w_k - S_k) after CTRO clipping,
    H = (sum_k w_k / p_k)^-1 the weighted harmonic mean. Inputs (K, B), outputs two (B,) tensors.
    See ``mrpo_loss`` for w."""
    if convention not in ("code", "swapped"):
        raise ValueError(f"MRPO convention must be 'code' or 'swapped', got {convention!r}")
    cw, cl, v = _mrpo_clip_and_weights(ref_chosen_logps, ref_rejected_logps, eta=eta, alpha=alpha)
    w = v if convention == "swapped" else (1 - v) / (v.shape[0] - 1)
    return -torch.logsumexp(torch.log(w) - cw, dim=0), -torch.logsumexp(torch.log(w) - cl, dim=0)


def mrpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              *, beta: float = 0.1, eta: float = 0.1, alpha: float = -1.0, naive: bool = False,
              convention: str = "code") -> Losses:
    """MRPO (Le et al., 2024, arXiv 2405.16388), official demo code generalised to K references.

    ref_* are (K, B) summed log-probs; row 0 = primary reference (the policy's own start, "ref2" in
    the code), rows 1.. = additional references ("ref1" for K = 2). All reference maths is detached.
    CTRO: each additional S_k is clipped into [(1+e) S_0, (1-e) S_0]; eta >= 0: e_w = eta*q,
      e_l = eta*(1-q), q = |b_w|/(|b_w|+|b_l|), b = (S_k + S_0)/2 (pairwise with the primary);
      eta < 0: e = |eta| on both sides.
    ARWC: v_k = own confidence share (alpha < 0) or v_0 = 1-alpha, v_k = alpha/(K-1) (fixed alpha).
    Combined reference: l = -log sum_k w_k exp(-S_k), with
      convention="code":    w_k = (1 - v_k)/(K - 1)  -- K = 2: alpha weighs the primary in the
                            harmonic mean, as the official code does (alpha = 1 -> primary only);
      convention="swapped": w_k = v_k                -- each reference weighted by its own confidence.
    loss = -logsigmoid(beta * [(S_pi(y_w) - S_pi(y_l)) - (l_w - l_l)]); rewards beta * (S_pi - l).
    naive=True ("Multi-DPO"): loss = sum_k v_k * DPO(ref = clipped S_k) (the code's alpha weighs
    ref1 here); rewards against the primary reference, as the official code logs them.
    K > 2 choice: "code" weights are "one minus the own share", renormalised, which is the only
    reading in which a reference's weight is the others' confidence for K = 2 and stays a convex
    combination for K > 2; both conventions and the pairwise CTRO budget reduce to the code at K = 2.
    Shapes: policy (B,), references (K, B), outputs (B,).
    """
    if naive:
        cw, cl, v = _mrpo_clip_and_weights(ref_chosen_logps, ref_rejected_logps, eta=eta, alpha=alpha)
        h = (policy_chosen_logps - policy_rejected_logps) - (cw - cl)
        losses = (v * _sigmoid(h, beta)).sum(0)
        return losses, *_rewards(beta, policy_chosen_logps - cw[0], policy_rejected_logps - cl[0])
    lw, ll = mrpo_combined_reference(ref_chosen_logps, ref_rejected_logps, eta=eta, alpha=alpha,
                                     convention=convention)
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, lw, ll, beta=beta)


def expectile_loss(values: torch.Tensor, targets: torch.Tensor, tau: float = 0.7) -> torch.Tensor:
    """Expectile regression (IQL, Kostrikov et al., 2021, arXiv 2110.06169) for HPO's value head.

    u = targets - values;  loss = |tau - 1(u < 0)| * u^2, elementwise (the caller takes the mean).
    tau > 0.5 leans the value towards the upper expectile of the rewards. Shapes: any, equal.
    """
    u = targets - values
    return (tau - (u < 0).to(u.dtype)).abs() * u**2


def hpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_lengths, rejected_lengths, chosen_aux_rewards, rejected_aux_rewards, values,
             *, beta: float = 0.1, preference: str = "dpo", eta: float = 1.0, lam: float = 1.0,
             w_max: float = 20.0, nll: str = "mean", aux_on_rejected: bool = True) -> Losses:
    """HPO (Badrinath et al., 2024, arXiv 2405.17956), reconstructed: no public code (docs/algorithms.md §4).

    loss = L_pref + lam * mean_y[ -w(y) * log pi(y|x) ]
    L_pref = DPO sigmoid on sums, or preference="kto": TRL 0.8 kto_pair, the per-pair mean of
      1 - sig(beta (c - z_r)) and 1 - sig(beta (z_c - r)), z = sg[clamp(batch mean of c or r, >= 0)]
    A(y) = sg[r_aux(y) - V(x)];  w(y) = min(exp(A / eta), w_max)
    log pi(y|x) = S_pi(y)/|y| (nll="mean") or S_pi(y) (nll="sum"); mean_y over {y_w, y_l}, or y_w
    only if aux_on_rejected=False. V(x) = ``values`` comes from a value head trained separately
    with ``expectile_loss`` on r_aux. Rewards: beta * (S_pi - S_ref), detached.
    Shapes: all tensors (B,), outputs (B,).
    """
    c, r = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if preference == "dpo":
        pref = _sigmoid(c - r, beta)
    elif preference == "kto":
        z_c, z_r = c.detach().mean().clamp(min=0), r.detach().mean().clamp(min=0)
        pref = 0.5 * ((1 - torch.sigmoid(beta * (c - z_r))) + (1 - torch.sigmoid(beta * (z_c - r))))
    else:
        raise ValueError(f"hpo_loss preference must be 'dpo' or 'kto', got {preference!r}")
    if nll == "mean":
        lp_w, lp_l = _avg(policy_chosen_logps, chosen_lengths), _avg(policy_rejected_logps, rejected_lengths)
    elif nll == "sum":
        lp_w, lp_l = policy_chosen_logps, policy_rejected_logps
    else:
        raise ValueError(f"hpo_loss nll must be 'mean' or 'sum', got {nll!r}")
    # Clamping the exponent rather than the weight keeps exp() finite for huge advantages.
    cap = math.log(w_max)
    w_w = torch.exp(((chosen_aux_rewards - values).detach() / eta).clamp(max=cap))
    w_l = torch.exp(((rejected_aux_rewards - values).detach() / eta).clamp(max=cap))
    aux = 0.5 * (w_w * -lp_w + w_l * -lp_l) if aux_on_rejected else w_w * -lp_w
    return pref + lam * aux, *_rewards(beta, c, r)


# Config name -> loss. Tensor arguments differ: ipo (average=True), sigmoid_norm and simpo also take
# chosen_lengths/rejected_lengths; simpo takes no reference log-probs. Call with keyword arguments.
PAIR_LOSSES = {
    "dpo": dpo_loss,
    "cdpo": dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
    "exo_pair": exo_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "nca_pair": nca_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "aot": aot_loss,
    "simpo": simpo_loss,
}
