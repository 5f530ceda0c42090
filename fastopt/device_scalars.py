"""Step scalars computed on the device, for capturable steps.

A capturable step (torch.optim's ``capturable=True``; a step that can be recorded in a CUDA
graph and replayed) keeps the step count, and possibly lr, in device tensors. The host then
cannot compute :func:`fastopt.scalars.step_scalars` without reading them back, which would
synchronize and break capture. :class:`DeviceScalars` computes the same values with torch
tensor ops on the device, in float64, and writes them into a fixed float64 tensor laid out as
``triton_kernels.SCALAR_FIELDS`` (the :class:`StepScalars` fields, then the rounding seed),
which the kernels read through their ``scalars_tensor`` argument.

Python branches here depend only on the spec's switches and on the host-float
hyperparameters, both fixed when a graph is captured; everything that depends on the step
count is a tensor op (``torch.where`` in place of ``if``). The formulas follow
``fastopt/scalars.py`` operation by operation, so the two agree to the last few ulps (libm's
and torch's pow/log2 may round differently).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .scalars import _SEED_MODULUS, StepScalars, nadam_mu_product
from .spec import Accumulation, Denominator, Extra, Momentum, Norm, Schedule, Spec, WeightDecay

# Layout of the scalars tensor; the same tuple as ``triton_kernels.SCALAR_FIELDS``, defined
# here too so that this module does not import Triton.
SCALAR_FIELDS = (*StepScalars._fields, "seed")
_INDEX = {name: i for i, name in enumerate(SCALAR_FIELDS)}

# rounding_seed's multipliers, as in fastopt/scalars.py
_SEED_T = 0x9E3779B1
_SEED_SALT = 0x7F4A7C15

Value = float | torch.Tensor  # a host constant (fixed at capture) or a 0-dim float64 device tensor


class DeviceScalars:
    """Step scalars computed on the device from a device step count (capturable steps).

    ``compute(t, lr)`` writes the scalars of step ``t`` into :attr:`out` (the same tensor at
    every call, so a captured graph keeps reading the current values) without any host
    synchronization. Values equal ``step_scalars(spec, hyper, t, lr)`` with ``grad_scale``
    1 (the AMP inverse scale travels separately) and ``use_denominator`` as 1.0 / 0.0; the
    last entry is ``rounding_seed(t, salt)``.

    Host-float hyperparameters, and a host-float ``lr``, are baked into a captured graph as
    constants; pass ``lr`` as a device tensor to change it between replays.
    """

    def __init__(
        self, spec: Spec, hyper: dict[str, Any], device: torch.device | str, salt: int = 0, start: int = 0
    ) -> None:
        """``hyper``: the param group's hyperparameters under fastopt's generic names (mu, nu,
        eps, weight_decay, dampening, mu_max, nu_max, momentum_decay, lr_decay), host floats;
        ``lr`` is given to :meth:`compute`. ``salt``: the rounding seed's salt (the param
        group's index). ``start``: the number of steps already taken (a run resumed from a
        checkpoint at step ``start``); state carried from step to step starts at its value
        there."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.spec = spec
        self.hyper = dict(hyper)
        self.device = torch.device(device)
        self.salt = int(salt)
        self.out = torch.zeros(len(SCALAR_FIELDS), dtype=torch.float64, device=self.device)
        # the seed's salt term, reduced on the host so the int64 product cannot overflow
        self._seed_offset = (self.salt * _SEED_SALT + 1) % _SEED_MODULUS
        self._nadam_prod: torch.Tensor | None = None
        self._nadam_last_t: torch.Tensor | None = None
        if spec.momentum != Momentum.NONE and spec.mu_schedule == Schedule.NADAM:
            mu, psi = self._nadam_hyper()
            # prod_{i <= start} mu_i and the step it belongs to: copied to the device once,
            # here, and advanced on the device from then on
            prod = nadam_mu_product(start, mu, psi) if start > 0 else 1.0
            self._nadam_prod = torch.tensor(prod, dtype=torch.float64, device=self.device)
            self._nadam_last_t = torch.tensor(float(start), dtype=torch.float64, device=self.device)

    def compute(self, t: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
        """Write the scalars of step ``t`` into :attr:`out` and return it.

        ``t``: a 0-dim or 1-element float32/float64 device tensor holding the number of the
        step being taken (>= 1, already incremented). Where the spec carries state from step
        to step (NAdam's momentum product) it must equal the previous call's ``t`` (a step
        skipped by a GradScaler's found_inf: the state does not advance) or that plus 1,
        the first call's previous ``t`` being ``start``; a larger jump would leave factors
        out of the product, and cannot be seen without synchronizing.
        ``lr``: the param group's lr, a host float or a 0-dim device tensor.
        """
        tt = t.reshape(()).to(dtype=torch.float64)
        values = self._values(tt, lr)
        out = self.out
        for name, value in zip(StepScalars._fields, values):
            _write(out[_INDEX[name]], value)
        _write(out[_INDEX["seed"]], self._seed(t.reshape(())))
        return out

    # ---- the formulas of fastopt/scalars.py, with t a device tensor -----------------------

    def _values(self, t: torch.Tensor, lr: float | torch.Tensor) -> tuple[Value, ...]:
        spec, h = self.spec, self.hyper
        if isinstance(lr, torch.Tensor):
            base_lr: Value = lr.reshape(()).to(dtype=torch.float64)
        else:
            base_lr = float(lr)
        lr_t: Value = base_lr / (1.0 + (t - 1.0) * float(h.get("lr_decay", 0.0)))
        wd = float(h.get("weight_decay", 0.0))
        m_decay, m_weight, m_out, g_out = self._momentum(t)
        v_decay, v_weight, v_scale = self._denominator(t)
        eps: Value = float(h.get("eps", 0.0))
        use_denominator: Value = 1.0 if spec.denominator != Denominator.NONE else 0.0
        if spec.extra == Extra.RADAM:
            rect, rectified = _radam_rectification(t, float(h["nu"]))
            use_denominator = rectified.to(torch.float64)
            # torch scales eps by sqrt(1 - nu^t) too (see step_scalars)
            eps = eps * _sqrt(v_scale)
            lr_t = lr_t * rect
        decoupled = spec.weight_decay == WeightDecay.DECOUPLED
        return (
            lr_t,
            0.0 if decoupled else wd,
            1.0 - base_lr * wd if decoupled else 1.0,  # the base lr, as step_scalars does
            1.0,
            m_decay,
            m_weight,
            m_out,
            g_out,
            v_decay,
            v_weight,
            v_scale,
            eps,
            use_denominator,
        )

    def _momentum(self, t: torch.Tensor) -> tuple[Value, Value, Value, Value]:
        spec, h = self.spec, self.hyper
        if spec.momentum == Momentum.NONE:
            return 0.0, 0.0, 0.0, 0.0
        mu = float(h["mu"])
        nesterov = spec.momentum == Momentum.NESTEROV
        sched = spec.mu_schedule
        if spec.momentum_accumulation == Accumulation.SUM:
            cap = float(h.get("mu_max") or mu)
            increasing = sched == Schedule.INCREASING
            mu_t = _increasing_mu(t, cap) if increasing else mu
            mu_next = _increasing_mu(t + 1.0, cap) if increasing else mu
            # torch.optim.SGD starts the buffer at the first gradient, undamped
            # (full_like: torch.where of two Python floats would be float32)
            damped = torch.full_like(t, 1.0 - float(h.get("dampening", 0.0)))
            weight = torch.where(t == 1.0, 1.0, damped)
            return mu_t, weight, (mu_next if nesterov else 1.0), (1.0 if nesterov else 0.0)
        if sched == Schedule.CONSTANT:
            return mu, 1.0 - mu, (mu if nesterov else 1.0), ((1.0 - mu) if nesterov else 0.0)
        if sched == Schedule.BIAS_CORRECTION:
            corr_t = 1.0 - torch.pow(mu, t)
            if nesterov:
                return mu, 1.0 - mu, mu / (1.0 - torch.pow(mu, t + 1.0)), (1.0 - mu) / corr_t
            return mu, 1.0 - mu, 1.0 / corr_t, 0.0
        if sched == Schedule.TRUE_MEAN:
            if nesterov:
                return 1.0, 1.0, 1.0 / (t + 1.0), 1.0 / t
            return 1.0, 1.0, 1.0 / t, 0.0
        if sched == Schedule.INCREASING:
            mu_max = float(h.get("mu_max") or mu)
            mu_t, mu_next = _increasing_mu(t, mu_max), _increasing_mu(t + 1.0, mu_max)
            return mu_t, 1.0 - mu_t, (mu_next if nesterov else 1.0), ((1.0 - mu_t) if nesterov else 0.0)
        if sched == Schedule.NADAM:
            mu, psi = self._nadam_hyper()
            mu_t, mu_next = _nadam_mu(t, mu, psi), _nadam_mu(t + 1.0, mu, psi)
            prod_t = self._advance_nadam_product(t, mu_t)
            return mu, 1.0 - mu, mu_next / (1.0 - prod_t * mu_next), (1.0 - mu_t) / (1.0 - prod_t)
        raise AssertionError(sched)

    def _denominator(self, t: torch.Tensor) -> tuple[Value, Value, Value]:
        spec, h = self.spec, self.hyper
        if spec.denominator == Denominator.NONE:
            return 0.0, 0.0, 1.0
        if spec.denominator == Denominator.SUM:
            return 1.0, 1.0, 1.0
        nu = float(h["nu"])
        sched = spec.nu_schedule
        if spec.norm == Norm.LINF:
            nu_t: Value
            if sched == Schedule.CONSTANT:
                nu_t = nu
            elif sched == Schedule.BIAS_CORRECTION:
                nu_t = nu * (1.0 - torch.pow(nu, t - 1.0)) / (1.0 - torch.pow(nu, t))
            elif sched == Schedule.TRUE_MEAN:
                nu_t = (t - 1.0) / t
            else:
                nu_t = _increasing_mu(t, float(h.get("nu_max") or nu))
            return nu_t, 1.0, 1.0
        if sched == Schedule.CONSTANT:
            return nu, 1.0 - nu, 1.0
        if sched == Schedule.BIAS_CORRECTION:
            return nu, 1.0 - nu, 1.0 / (1.0 - torch.pow(nu, t))
        if sched == Schedule.TRUE_MEAN:
            return 1.0, 1.0, 1.0 / t
        if sched == Schedule.INCREASING:
            nu_t = _increasing_mu(t, float(h.get("nu_max") or nu))
            return nu_t, 1.0 - nu_t, 1.0
        raise AssertionError(sched)

    def _nadam_hyper(self) -> tuple[float, float]:
        return float(self.hyper["mu"]), float(self.hyper.get("momentum_decay", 4e-3))

    def _advance_nadam_product(self, t: torch.Tensor, mu_t: torch.Tensor) -> torch.Tensor:
        """prod_{i <= t} mu_i: multiplied in when t is a new step, kept when t repeats (a
        skipped step), in the same order as the host's nadam_mu_product."""
        assert self._nadam_prod is not None and self._nadam_last_t is not None
        advance = t > self._nadam_last_t
        self._nadam_prod.copy_(torch.where(advance, self._nadam_prod * mu_t, self._nadam_prod))
        self._nadam_last_t.copy_(torch.where(advance, t, self._nadam_last_t))
        return self._nadam_prod

    def _seed(self, t: torch.Tensor) -> torch.Tensor:
        """rounding_seed(t, salt) in int64: (t A + salt B + 1) mod 2^31, with t and A reduced
        mod 2^31 first (the same residue) so that no product reaches int64 overflow."""
        ti = torch.remainder(torch.round(t.to(torch.float64)).to(torch.int64), _SEED_MODULUS)
        return torch.remainder(ti * (_SEED_T % _SEED_MODULUS) + self._seed_offset, _SEED_MODULUS)


def _increasing_mu(t: torch.Tensor, cap: float) -> torch.Tensor:
    """scalars.increasing_mu: min(1 - 2^(-1 - log2(floor(t / 250) + 1)), cap)."""
    n = torch.floor(t / 250.0) + 1.0
    return torch.clamp(1.0 - torch.pow(2.0, -1.0 - torch.log2(n)), max=cap)


def _nadam_mu(t: torch.Tensor, beta1: float, momentum_decay: float) -> torch.Tensor:
    """scalars.nadam_mu: beta1 (1 - 0.5 * 0.96^(t psi))."""
    return beta1 * (1.0 - 0.5 * torch.pow(0.96, t * momentum_decay))


def _radam_rectification(t: torch.Tensor, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_t or 1, rho_t > 5) of scalars.radam_rectification. r_t is computed from a rho_t
    moved into the valid range where rho_t <= 5, so no NaN arises in the unselected branch
    (a NaN there would still poison gradients or a debug-mode NaN check)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = torch.pow(beta2, t)
    rho_t = rho_inf - 2.0 * t * beta2_t / (1.0 - beta2_t)
    rectified = rho_t > 5.0
    rho = torch.where(rectified, rho_t, 6.0)
    rect = torch.sqrt((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))
    return torch.where(rectified, rect, 1.0), rectified


def _sqrt(value: Value) -> Value:
    return torch.sqrt(value) if isinstance(value, torch.Tensor) else math.sqrt(value)


def _write(slot: torch.Tensor, value: Value) -> None:
    # fill_ passes a host constant as a kernel argument (baked into a captured graph): no
    # host-to-device copy
    if isinstance(value, torch.Tensor):
        slot.copy_(value)
    else:
        slot.fill_(float(value))
