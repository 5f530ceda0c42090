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

The formulas are written once, for a step ``t`` that is either an int (:func:`step_scalars`,
on the host, in Python's float64 arithmetic) or a 0-dim float64 tensor
(:class:`fastopt.device_scalars.DeviceScalars`: capturable steps keep t on the device, where
reading it back would synchronize). Arithmetic operators and ``**`` serve both as they are;
the few functions that do not (sqrt, floor, log2, expm1, min, a condition on t) go through the
helpers below, which take math's function for a float and torch's for a tensor. A condition
on t is therefore a :func:`_where` (both sides computed on the device), never an ``if``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

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


Value = float | torch.Tensor  # a Python float (host) or a 0-dim float64 tensor (device)
NadamProduct = Callable[[Value, Value], Value]  # (t, mu_t) -> prod_{i <= t} mu_i


def _unary(host: Callable[[Any], Any], device: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda x: device(x) if isinstance(x, torch.Tensor) else host(x)


_sqrt = _unary(math.sqrt, torch.sqrt)
_floor = _unary(math.floor, torch.floor)
_log2 = _unary(math.log2, torch.log2)
_expm1 = _unary(math.expm1, torch.expm1)


def one_minus_power(base: float, t: Value) -> Value:
    """1 - base^t for a decay rate ``base`` in [0, 1]: a bias correction's denominator.

    Computed as -expm1(t ln base). The direct form cancels when base is close to 1: its
    relative error grows to 2^-53 / (1 - base^t), 5e-10 at base = 1 - 1e-9 and t = 2, which
    float64 params then carry into every update."""
    if base <= 0.0:  # 0^t (no logarithm of 0): 1 - 0 from the first step on
        return 1.0 - base**t
    return 0.0 - _expm1(t * math.log(base))  # (not -expm1: 1 - base^0 is +0, not -0)


def _minimum(x: Value, cap: float) -> Value:
    return torch.clamp(x, max=cap) if isinstance(x, torch.Tensor) else min(x, cap)


def _where(cond: bool | torch.Tensor, a: Value, b: Value) -> Value:
    """``a if cond else b``. On the device both are computed, so the unselected one must be
    harmless (no NaN: it would still trip anomaly checks)."""
    if not isinstance(cond, torch.Tensor):
        return a if cond else b
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        a = torch.full_like(cond, a, dtype=torch.float64)  # torch.where of two floats is float32
    return torch.where(cond, a, b)


def _cap(h: dict[str, Any], key: str, default: float) -> float:
    """The INCREASING schedule's cap: the hyperparameter where it is set (0 included)."""
    value = h.get(key)
    return default if value is None else float(value)


def increasing_mu(t: Value, mu_max: float) -> Value:
    """Sutskever et al.'s schedule: 1 - 2^(-1 - log2(floor(t / 250) + 1)), capped."""
    return _minimum(1.0 - 2.0 ** (-1.0 - _log2(_floor(t / 250) + 1)), mu_max)


def nadam_mu(t: Value, beta1: float, momentum_decay: float) -> Value:
    """torch.optim.NAdam's momentum at step t."""
    return beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))


def nadam_hyper(h: dict[str, Any]) -> tuple[float, float]:
    """NAdam's (beta1, momentum_decay) from a param group's hyperparameters."""
    return float(h["mu"]), float(h.get("momentum_decay", 4e-3))


# (beta1, momentum_decay) -> {t: product up to t} for the last few t asked for: groups or
# buckets at different step counts each continue from their own
_NADAM_PRODUCTS: dict[tuple[float, float], dict[int, float]] = {}
_NADAM_KEPT = 8


def nadam_mu_product(t: int, beta1: float, momentum_decay: float) -> float:
    """prod_{i <= t} mu_i of torch.optim.NAdam (kept as state 'mu_product' there).

    Multiplied up in the same order whatever the cache holds, so the value is the same
    whether it is computed afresh or continued from an earlier step.
    """
    key = (beta1, momentum_decay)
    kept = _NADAM_PRODUCTS.setdefault(key, {})
    start = max((s for s in kept if s <= t), default=0)
    prod = kept.get(start, 1.0)
    for i in range(start + 1, t + 1):
        prod *= nadam_mu(i, beta1, momentum_decay)
    if len(_NADAM_PRODUCTS) > 64:  # a few hyperparameter sets at a time is the use
        _NADAM_PRODUCTS.clear()
        kept = _NADAM_PRODUCTS[key] = {}
    if t not in kept and len(kept) >= _NADAM_KEPT:
        del kept[next(iter(kept))]  # the oldest entry
    kept.pop(t, None)
    kept[t] = prod
    return prod


def _momentum_coefficients(
    spec: Spec, h: dict[str, Any], t: Value, nadam_product: NadamProduct
) -> tuple[Value, Value, Value, Value]:
    """(m_decay, m_weight, m_out, g_out) for step t >= 1."""
    if spec.momentum == Momentum.NONE:
        return 0.0, 0.0, 0.0, 0.0
    mu = float(h["mu"])
    nesterov = spec.momentum == Momentum.NESTEROV
    sched = spec.mu_schedule
    if spec.momentum_accumulation == Accumulation.SUM:
        cap = _cap(h, "mu_max", mu)
        mu_t = increasing_mu(t, cap) if sched == Schedule.INCREASING else mu
        mu_next = increasing_mu(t + 1, cap) if sched == Schedule.INCREASING else mu
        # torch.optim.SGD starts the buffer at the first gradient, undamped.
        weight = _where(t == 1, 1.0, 1.0 - float(h.get("dampening", 0.0)))
        return mu_t, weight, (mu_next if nesterov else 1.0), (1.0 if nesterov else 0.0)
    if sched == Schedule.CONSTANT:
        return mu, 1.0 - mu, (mu if nesterov else 1.0), ((1.0 - mu) if nesterov else 0.0)
    if sched == Schedule.BIAS_CORRECTION:
        corr_t = one_minus_power(mu, t)
        if nesterov:
            # mu_{t+1} m_hat_t + (1 - mu_t) g with m_hat_t = m_t / (1 - mu^t)
            return mu, 1.0 - mu, mu / one_minus_power(mu, t + 1), (1.0 - mu) / corr_t
        return mu, 1.0 - mu, 1.0 / corr_t, 0.0
    if sched == Schedule.TRUE_MEAN:
        # raw running sum S_t; the mean is S_t / t
        if nesterov:
            return 1.0, 1.0, 1.0 / (t + 1), 1.0 / t
        return 1.0, 1.0, 1.0 / t, 0.0
    if sched == Schedule.INCREASING:
        mu_max = _cap(h, "mu_max", mu)
        mu_t, mu_next = increasing_mu(t, mu_max), increasing_mu(t + 1, mu_max)
        return mu_t, 1.0 - mu_t, (mu_next if nesterov else 1.0), ((1.0 - mu_t) if nesterov else 0.0)
    if sched == Schedule.NADAM:
        mu, psi = nadam_hyper(h)
        mu_t, mu_next = nadam_mu(t, mu, psi), nadam_mu(t + 1, mu, psi)
        prod_t = nadam_product(t, mu_t)
        return mu, 1.0 - mu, mu_next / (1.0 - prod_t * mu_next), (1.0 - mu_t) / (1.0 - prod_t)
    raise AssertionError(sched)


def _denominator_coefficients(spec: Spec, h: dict[str, Any], t: Value) -> tuple[Value, Value, Value]:
    """(v_decay, v_weight, v_scale) for step t >= 1."""
    if spec.denominator == Denominator.NONE:
        return 0.0, 0.0, 1.0
    if spec.denominator == Denominator.SUM:
        return 1.0, 1.0, 1.0
    nu = float(h["nu"])
    sched = spec.nu_schedule
    if spec.norm == Norm.LINF:
        # running max: v = max(nu_t v, |h|) with the scheduled nu_t itself, nothing to rescale
        nu_t: Value
        if sched == Schedule.CONSTANT:
            nu_t = nu
        elif sched == Schedule.BIAS_CORRECTION:
            nu_t = nu * one_minus_power(nu, t - 1) / one_minus_power(nu, t)
        elif sched == Schedule.TRUE_MEAN:
            nu_t = (t - 1) / t
        else:
            nu_t = increasing_mu(t, _cap(h, "nu_max", nu))
        return nu_t, 1.0, 1.0
    if sched == Schedule.CONSTANT:
        return nu, 1.0 - nu, 1.0
    if sched == Schedule.BIAS_CORRECTION:
        return nu, 1.0 - nu, 1.0 / one_minus_power(nu, t)
    if sched == Schedule.TRUE_MEAN:
        return 1.0, 1.0, 1.0 / t
    if sched == Schedule.INCREASING:
        nu_t = increasing_mu(t, _cap(h, "nu_max", nu))
        return nu_t, 1.0 - nu_t, 1.0
    raise AssertionError(sched)


def radam_rectification(t: Value, beta2: float) -> tuple[Value, bool | torch.Tensor]:
    """(r_t, rho_t > 5): RAdam's rectification term, 1 while rho_t <= 5 (no adaptive lr yet).

    r_t is computed from rho_t = 6 in place of a rho_t <= 5, so that the side a device
    evaluation computes without selecting it takes no sqrt of a negative. rho_t < rho_inf,
    so with rho_inf <= 5 no step is ever rectified (and rho_inf - 4 may be 0).
    """
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    if rho_inf <= 5.0:
        return 1.0, False
    beta2_t = beta2**t
    rho_t = rho_inf - 2.0 * t * beta2_t / (1.0 - beta2_t)
    rectified = rho_t > 5.0
    rho = _where(rectified, rho_t, 6.0)
    rect = _sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return _where(rectified, rect, 1.0), rectified


def scalars_for(
    spec: Spec, h: dict[str, Any], t: Value, lr: Value, nadam_product: NadamProduct
) -> StepScalars:
    """The scalars of step ``t`` by the formulas both evaluators share (see the module's
    docstring). ``lr``: the base lr; ``nadam_product``: NAdam's momentum product up to t,
    which each evaluator keeps its own way. With a tensor ``t`` the fields are tensors or
    host floats, ``use_denominator`` a bool or a bool tensor."""
    lr_t = lr / (1.0 + (t - 1) * float(h.get("lr_decay", 0.0)))
    wd = float(h.get("weight_decay", 0.0))
    m_decay, m_weight, m_out, g_out = _momentum_coefficients(spec, h, t, nadam_product)
    v_decay, v_weight, v_scale = _denominator_coefficients(spec, h, t)
    eps = float(h.get("eps", 0.0))
    use_denominator = spec.denominator != Denominator.NONE
    if spec.extra == Extra.RADAM:
        rect, use_denominator = radam_rectification(t, float(h["nu"]))
        # torch: lr * m_hat * r_t * sqrt(1 - nu^t) / (sqrt(v) + eps), i.e. eps is scaled too
        eps = eps * _sqrt(v_scale)
        lr_t = lr_t * rect
    decoupled = spec.weight_decay == WeightDecay.DECOUPLED
    return StepScalars(
        lr=lr_t,
        weight_decay=0.0 if decoupled else wd,
        decay_factor=1.0 - lr * wd if decoupled else 1.0,
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


def step_scalars(
    spec: Spec, h: dict[str, Any], t: int, lr: float | None = None, mu_product: float | None = None
) -> StepScalars:
    """The scalars of step ``t`` (1-based) for a param group's hyperparameters ``h``.

    ``h`` uses fastopt's generic names: lr, mu, nu, eps, weight_decay, dampening,
    mu_max, nu_max, momentum_decay, lr_decay. ``lr`` overrides ``h['lr']``.
    ``mu_product``: under the NAdam schedule, prod_{i < t} mu_i as carried from the earlier
    steps (torch.optim.NAdam's 'mu_product' state, which follows a beta1 changed during the
    run); by default the product of the schedule at the current beta1.
    """
    if t < 1:
        raise ValueError(f"step must be >= 1, got {t}")
    base_lr = float(h["lr"] if lr is None else lr)
    if mu_product is None:
        return scalars_for(spec, h, t, base_lr, lambda t, mu_t: nadam_mu_product(t, *nadam_hyper(h)))
    carried = float(mu_product)
    return scalars_for(spec, h, t, base_lr, lambda t, mu_t: carried * mu_t)


_SEED_MODULUS = 1 << 31


def rounding_seed(t: int | torch.Tensor, salt: int = 0) -> int | torch.Tensor:
    """The stochastic-rounding seed of step ``t`` of the tensors identified by ``salt`` (the
    param group's index): a function of the step, so a run resumed from a checkpoint draws
    the same rounding as the run that wrote it. Distinct steps get well-spread seeds (a
    Weyl sequence): (t * 0x9E3779B1 + salt * 0x7F4A7C15 + 1) mod 2^31, in integer arithmetic
    only. Each term is reduced mod 2^31 first (the same residues), so that ``t`` may also be
    an int64 device tensor: no product there reaches int64 overflow."""
    m = _SEED_MODULUS
    return (t % m * (0x9E3779B1 % m) + (salt * 0x7F4A7C15 + 1) % m) % m
