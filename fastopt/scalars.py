"""Per-step scalars: everything about a step that does not depend on the element.

The schedules of mu, nu and lr, bias corrections, RAdam's rectification and NAdam's
momentum products are computed here once per step and param group, on the host, in
double precision. Every backend receives the same :class:`StepScalars` and applies the
per-element rule of ``fastopt/rule.py`` (C++: ``csrc/update_math.h``) with them.

Accumulators are stored raw, as torch.optim stores them (for example Adam's ``exp_avg`` is
the uncorrected decaying mean) and the schedule's correction is a scale applied when the
value is used. Dozat's scheduled form (mu_t = mu (1 - mu^(t-1)) / (1 - mu^t) applied to a
corrected mean) is algebraically the same; ``fastopt/reference.py`` implements that form,
so the two are checked against each other.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .spec import Accumulation, Denominator, Extra, Momentum, Norm, Schedule, Spec, WeightDecay


class StepScalars(NamedTuple):
    """Scalars of one step. The rule, per element (m, v raw accumulators)::

    g    = grad * grad_scale, negated under maximize, + weight_decay * p (L2)
    p    = p * decay_factor                                   (decoupled decay)
    v    = v * v_decay + |h|^p * v_weight      (LINF: max(v * v_decay, |h|))
    vbar = root(v * v_scale) + eps
    m    = m * m_decay + x * m_weight          (x: g, g / vbar or lr g / vbar)
    mbar = m * m_out + x * g_out               (g_out = 0 for classical momentum)
    p    = p - lr * mbar / vbar                (per momentum input)
    """

    lr: float
    weight_decay: float  # L2 coefficient (0 when decay is decoupled)
    decay_factor: float  # 1 - lr * wd for decoupled decay, else 1
    grad_scale: float  # multiplies the gradient first (1 / loss scale under AMP)
    m_decay: float
    m_weight: float
    m_out: float
    g_out: float
    v_decay: float
    v_weight: float
    v_scale: float
    eps: float
    use_denominator: bool  # False during RAdam's unrectified first steps


def increasing_mu(t: int, mu_max: float) -> float:
    """Sutskever et al.'s schedule: 1 - 2^(-1 - log2(floor(t / 250) + 1)), capped."""
    return min(1.0 - 2.0 ** (-1.0 - math.log2(math.floor(t / 250) + 1)), mu_max)


def nadam_mu(t: int, beta1: float, momentum_decay: float) -> float:
    """torch.optim.NAdam's momentum at step t."""
    return beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))


# (beta1, momentum_decay) -> (t, product up to t): steps ask for t, t + 1, ... in turn
_NADAM_PRODUCTS: dict[tuple[float, float], tuple[int, float]] = {}


def nadam_mu_product(t: int, beta1: float, momentum_decay: float) -> float:
    """prod_{i <= t} mu_i of torch.optim.NAdam (kept as state 'mu_product' there).

    Multiplied up in the same order whatever the cache holds, so the value is the same
    whether it is computed afresh or continued from step t - 1.
    """
    key = (beta1, momentum_decay)
    start, prod = _NADAM_PRODUCTS.get(key, (0, 1.0))
    if start > t:
        start, prod = 0, 1.0
    for i in range(start + 1, t + 1):
        prod *= nadam_mu(i, beta1, momentum_decay)
    if len(_NADAM_PRODUCTS) > 64:  # a few hyperparameter sets at a time is the use
        _NADAM_PRODUCTS.clear()
    _NADAM_PRODUCTS[key] = (t, prod)
    return prod


def _momentum_coefficients(spec: Spec, h: dict[str, Any], t: int) -> tuple[float, float, float, float]:
    """(m_decay, m_weight, m_out, g_out) for step t >= 1."""
    if spec.momentum == Momentum.NONE:
        return 0.0, 0.0, 0.0, 0.0
    mu = float(h["mu"])
    nesterov = spec.momentum == Momentum.NESTEROV
    sched = spec.mu_schedule
    if spec.momentum_accumulation == Accumulation.SUM:
        cap = float(h.get("mu_max") or mu)
        mu_t = increasing_mu(t, cap) if sched == Schedule.INCREASING else mu
        mu_next = increasing_mu(t + 1, cap) if sched == Schedule.INCREASING else mu
        # torch.optim.SGD starts the buffer at the first gradient, undamped.
        weight = 1.0 if t == 1 else 1.0 - float(h.get("dampening", 0.0))
        return mu_t, weight, (mu_next if nesterov else 1.0), (1.0 if nesterov else 0.0)
    if sched == Schedule.CONSTANT:
        return mu, 1.0 - mu, (mu if nesterov else 1.0), ((1.0 - mu) if nesterov else 0.0)
    if sched == Schedule.BIAS_CORRECTION:
        corr_t = 1.0 - mu**t
        if nesterov:
            # mu_{t+1} m_hat_t + (1 - mu_t) g with m_hat_t = m_t / (1 - mu^t)
            return mu, 1.0 - mu, mu / (1.0 - mu ** (t + 1)), (1.0 - mu) / corr_t
        return mu, 1.0 - mu, 1.0 / corr_t, 0.0
    if sched == Schedule.TRUE_MEAN:
        # raw running sum S_t; the mean is S_t / t
        if nesterov:
            return 1.0, 1.0, 1.0 / (t + 1), 1.0 / t
        return 1.0, 1.0, 1.0 / t, 0.0
    if sched == Schedule.INCREASING:
        mu_max = float(h.get("mu_max") or mu)
        mu_t, mu_next = increasing_mu(t, mu_max), increasing_mu(t + 1, mu_max)
        return mu_t, 1.0 - mu_t, (mu_next if nesterov else 1.0), ((1.0 - mu_t) if nesterov else 0.0)
    if sched == Schedule.NADAM:
        psi = float(h.get("momentum_decay", 4e-3))
        mu_t, mu_next = nadam_mu(t, mu, psi), nadam_mu(t + 1, mu, psi)
        prod_t = nadam_mu_product(t, mu, psi)
        return mu, 1.0 - mu, mu_next / (1.0 - prod_t * mu_next), (1.0 - mu_t) / (1.0 - prod_t)
    raise AssertionError(sched)


def _denominator_coefficients(spec: Spec, h: dict[str, Any], t: int) -> tuple[float, float, float]:
    """(v_decay, v_weight, v_scale) for step t >= 1."""
    if spec.denominator == Denominator.NONE:
        return 0.0, 0.0, 1.0
    if spec.denominator == Denominator.SUM:
        return 1.0, 1.0, 1.0
    nu = float(h["nu"])
    sched = spec.nu_schedule
    if spec.norm == Norm.LINF:
        # running max: v = max(nu_t v, |h|) with the scheduled nu_t itself, nothing to rescale
        if sched == Schedule.CONSTANT:
            nu_t = nu
        elif sched == Schedule.BIAS_CORRECTION:
            nu_t = nu * (1.0 - nu ** (t - 1)) / (1.0 - nu**t)
        elif sched == Schedule.TRUE_MEAN:
            nu_t = (t - 1) / t
        else:
            nu_t = increasing_mu(t, float(h.get("nu_max") or nu))
        return nu_t, 1.0, 1.0
    if sched == Schedule.CONSTANT:
        return nu, 1.0 - nu, 1.0
    if sched == Schedule.BIAS_CORRECTION:
        return nu, 1.0 - nu, 1.0 / (1.0 - nu**t)
    if sched == Schedule.TRUE_MEAN:
        return 1.0, 1.0, 1.0 / t
    if sched == Schedule.INCREASING:
        nu_t = increasing_mu(t, float(h.get("nu_max") or nu))
        return nu_t, 1.0 - nu_t, 1.0
    raise AssertionError(sched)


def radam_rectification(t: int, beta2: float) -> float | None:
    """RAdam's rectification term r_t, or None while rho_t <= 5 (no adaptive lr yet)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t)
    if rho_t <= 5.0:
        return None
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


def step_scalars(spec: Spec, h: dict[str, Any], t: int, lr: float | None = None) -> StepScalars:
    """The scalars of step ``t`` (1-based) for a param group's hyperparameters ``h``.

    ``h`` uses fastopt's generic names: lr, mu, nu, eps, weight_decay, dampening,
    mu_max, nu_max, momentum_decay, lr_decay. ``lr`` overrides ``h['lr']``.
    """
    if t < 1:
        raise ValueError(f"step must be >= 1, got {t}")
    base_lr = float(h["lr"] if lr is None else lr)
    lr_t = base_lr / (1.0 + (t - 1) * float(h.get("lr_decay", 0.0)))
    wd = float(h.get("weight_decay", 0.0))
    m_decay, m_weight, m_out, g_out = _momentum_coefficients(spec, h, t)
    v_decay, v_weight, v_scale = _denominator_coefficients(spec, h, t)
    eps = float(h.get("eps", 0.0))
    use_denominator = spec.denominator != Denominator.NONE
    if spec.extra == Extra.RADAM:
        rect = radam_rectification(t, float(h["nu"]))
        use_denominator = rect is not None
        # torch: lr * m_hat * r_t * sqrt(1 - nu^t) / (sqrt(v) + eps), i.e. eps is scaled too
        eps = eps * math.sqrt(v_scale)
        lr_t = lr_t * (rect if rect is not None else 1.0)
    decoupled = spec.weight_decay == WeightDecay.DECOUPLED
    return StepScalars(
        lr=lr_t,
        weight_decay=0.0 if decoupled else wd,
        decay_factor=1.0 - base_lr * wd if decoupled else 1.0,
        grad_scale=1.0,
        m_decay=m_decay,
        m_weight=m_weight,
        m_out=m_out,
        g_out=g_out,
        v_decay=v_decay,
        v_weight=v_weight,
        v_scale=v_scale,
        eps=eps,
        use_denominator=use_denominator,
    )


_SEED_MODULUS = 1 << 31


def rounding_seed(t: int, salt: int = 0) -> int:
    """The stochastic-rounding seed of step ``t`` of the tensors identified by ``salt`` (the
    param group's index): a function of the step, so a run resumed from a checkpoint draws
    the same rounding as the run that wrote it. Distinct steps get well-spread seeds (a
    Weyl sequence). Integer arithmetic only, so a device computation of the same formula in
    int64 gives the same seed."""
    return (t * 0x9E3779B1 + salt * 0x7F4A7C15 + 1) % _SEED_MODULUS
