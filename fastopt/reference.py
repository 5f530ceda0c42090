"""The NumPy float64 reference: the definition of correct for every backend.

Written straight from the papers' equations and torch.optim's documented algorithms, for
reading rather than speed, and independently of the kernels' code path: the kernels keep
raw accumulators and rescale them (``fastopt/scalars.py``), while this module keeps
Dozat's *scheduled* accumulators, i.e. for the bias-correction schedule it stores the
corrected mean itself and updates it with mu_t = mu (1 - mu^(t-1)) / (1 - mu^t).

Dozat, "Optimizing CNNs", Algorithm 1::

    h_t    <- grad f(theta_{t-1})  or  R_u(grad f(theta_{t-1})), u ~ N(0, 1)
    v_t    <- nu_t v_{t-1} + {(1 - nu_t) or 1} h_t^p
    vbar_t <- v_t^(1/p) + eps
    g_t    <- {1 or alpha_t / vbar_t} grad f(theta_{t-1})
    m_t    <- mu_t m_{t-1} + {(1 - mu_t) or 1} g_t
    mbar_t <- {mu_{t+1} m_t + {(1 - mu_t) or 1} g_t  or  m_t}
    Delta  <- {alpha_t / vbar_t or 1} mbar_t
    theta_t = theta_{t-1} - Delta

Where torch.optim writes a rule differently from the papers, the preset follows torch and
so does this module; each such place says so in a comment ("torch:").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .spec import (
    Accumulation,
    Curvature,
    Denominator,
    Eps,
    Extra,
    Momentum,
    MomentumInput,
    Norm,
    Schedule,
    Spec,
    WeightDecay,
)


def sutskever_mu(t: int, mu_max: float) -> float:
    """Sutskever et al. (2013): mu_t = min(1 - 2^(-1 - log2(floor(t/250) + 1)), mu_max)."""
    return min(1.0 - 2.0 ** (-1.0 - math.log2(math.floor(t / 250) + 1)), mu_max)


def unbiased_mass(base: float, k: int) -> float:
    """1 - base^k, the weight an exponential mean started at zero has gathered after k
    steps, evaluated without the cancellation that 1.0 - base**k suffers near base = 1
    (log1p keeps the digits of ln base; expm1 those of the difference)."""
    if base < 0.5:  # base^k <= 1/2 for k >= 1: no cancellation (and base - 1 is inexact)
        return 1.0 - base**k
    return -math.expm1(k * math.log1p(base - 1.0)) + 0.0  # (+ 0.0: no -0.0 at k = 0)


def scheduled(schedule: Schedule, base: float, t: int, cap: float | None = None) -> float:
    """The decay parameter at step t under a schedule (Dozat section 3)."""
    if schedule == Schedule.CONSTANT:
        return base
    if schedule == Schedule.BIAS_CORRECTION:
        return base * unbiased_mass(base, t - 1) / unbiased_mass(base, t)
    if schedule == Schedule.TRUE_MEAN:
        return (t - 1) / t
    if schedule == Schedule.INCREASING:
        return sutskever_mu(t, base if cap is None else cap)
    raise ValueError(f"schedule {schedule!r} has no closed form here")


@dataclass
class ParamState:
    """Dozat-form state of one parameter (None where the rule keeps nothing)."""

    t: int = 0
    m: np.ndarray | None = None  # the scheduled momentum mean/sum
    v: np.ndarray | None = None  # the scheduled denominator accumulator
    vmax_raw: np.ndarray | None = None  # AMSGrad, torch convention (see below)
    gavg: np.ndarray | None = None  # centered RMSprop: running mean of h
    u: np.ndarray | None = None  # Adadelta: running mean of squared updates
    nadam_prod: float = 1.0  # torch NAdam: product of mu_i
    extra: dict[str, Any] = field(default_factory=dict)


class Reference:
    """Steps a list of float64 arrays by one spec and hyperparameters.

    ``hyper`` uses fastopt's generic names: lr, mu, nu, eps, weight_decay, dampening,
    mu_max, nu_max, momentum_decay, lr_decay, initial_accumulator_value.
    """

    def __init__(self, spec: Spec, hyper: dict[str, Any], params: list[np.ndarray]):
        self.spec = spec
        self.hyper = dict(hyper)
        self.params = [np.array(p, dtype=np.float64, copy=True) for p in params]
        self.states = [ParamState() for _ in params]

    def step(self, grads: list[np.ndarray], hvps: list[np.ndarray] | None = None, lr: float | None = None):
        """One step; ``hvps`` are the Hessian-vector products when curvature is HVP."""
        if lr is not None:
            self.hyper["lr"] = lr
        for i, g in enumerate(grads):
            hv = None if hvps is None else np.asarray(hvps[i], dtype=np.float64)
            self.params[i] = self._step_one(
                self.params[i], np.asarray(g, dtype=np.float64), hv, self.states[i]
            )
        return self.params

    def _step_one(self, theta: np.ndarray, grad: np.ndarray, hvp: np.ndarray | None, st: ParamState):
        s, hp = self.spec, self.hyper
        st.t += 1
        t = st.t
        lr0 = float(hp["lr"])
        # Adagrad's lr decay (torch): alpha_t = lr / (1 + (t - 1) lr_decay)
        alpha = lr0 / (1.0 + (t - 1) * float(hp.get("lr_decay", 0.0)))
        eps = float(hp.get("eps", 0.0))
        wd = float(hp.get("weight_decay", 0.0))

        g = -grad if s.maximize else grad.copy()
        if wd != 0.0:  # torch applies decay only when it is set (0 * inf would be NaN)
            if s.weight_decay == WeightDecay.L2:
                g = g + wd * theta
            else:  # decoupled (Loshchilov & Hutter), with the undecayed lr as torch does
                theta = theta * (1.0 - lr0 * wd)
        h = hvp if s.curvature == Curvature.HVP else g

        # ---- the adaptive denominator vbar (None: no denominator)
        vbar = None
        if s.denominator != Denominator.NONE:
            vbar = self._denominator(h, st, t, eps)

        # ---- RAdam (Liu et al.): the adaptive lr is used only once its variance is finite
        use_vbar = vbar is not None
        if s.extra == Extra.RADAM:
            nu = float(hp["nu"])
            rho_inf = 2.0 / (1.0 - nu) - 1.0
            rho_t = rho_inf - 2.0 * t * nu**t / (1.0 - nu**t)
            if rho_t > 5.0:
                r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                alpha = alpha * r
                # torch: l_t = sqrt(1 - nu^t) / (sqrt(v_raw) + eps), v_raw = v_hat (1 - nu^t)
                v_raw = st.v * unbiased_mass(nu, t)
                vbar = (np.sqrt(v_raw) + eps) / math.sqrt(unbiased_mass(nu, t))
            else:
                use_vbar = False

        # Adadelta (Zeiler): the step is RMS[Delta]_{t-1} / RMS[g]_t * g
        if s.extra == Extra.ADADELTA:
            rms_delta = np.sqrt(st.u + eps)
            precond_g = rms_delta * g / vbar
        elif use_vbar:
            precond_g = g / vbar
        else:
            precond_g = g

        if s.momentum == Momentum.NONE:
            delta = alpha * precond_g
        else:
            if s.momentum_input == MomentumInput.UNSCALED:
                g_in = g
            elif s.momentum_input == MomentumInput.PRECONDITIONED:
                g_in = precond_g  # torch RMSprop: buf = mu buf + g / vbar, then lr
            else:
                g_in = alpha * precond_g
            mbar = self._momentum(g_in, st, t)
            if s.momentum_input == MomentumInput.UNSCALED:
                if s.extra == Extra.ADADELTA:
                    raise AssertionError("excluded by the spec")
                delta = alpha * (mbar / vbar if use_vbar else mbar)
            elif s.momentum_input == MomentumInput.PRECONDITIONED:
                delta = alpha * mbar
            else:
                delta = mbar

        if s.extra == Extra.ADADELTA:
            rho = self._nu(t)
            st.u = rho * st.u + (1.0 - rho) * precond_g**2
        return theta - delta

    # -- pieces -------------------------------------------------------------------------
    def _nu(self, t: int) -> float:
        s, hp = self.spec, self.hyper
        return scheduled(s.nu_schedule, float(hp["nu"]), t, hp.get("nu_max"))

    def _denominator(self, h: np.ndarray, st: ParamState, t: int, eps: float) -> np.ndarray:
        s, hp = self.spec, self.hyper
        if st.v is None:
            # torch Adagrad's initial_accumulator_value; decaying means start at zero, which
            # is what bias correction assumes
            init = (
                float(hp.get("initial_accumulator_value", 0.0)) if s.denominator == Denominator.SUM else 0.0
            )
            st.v = np.full_like(h, init)
            if s.centered:
                st.gavg = np.zeros_like(h)
            if s.amsgrad:
                st.vmax_raw = np.zeros_like(h)
            if s.extra == Extra.ADADELTA:
                st.u = np.zeros_like(h)
        if s.denominator == Denominator.SUM:
            nu_t, weight = 1.0, 1.0  # AdaGrad: a true sum
        else:
            nu_t = self._nu(t)
            weight = 1.0 - nu_t
        if s.norm == Norm.LINF:
            # p -> inf: v_t = max(nu_t v_{t-1}, |h|) (Kingma & Ba's AdaMax)
            a = np.abs(h) + eps if s.eps == Eps.INSIDE else np.abs(h)
            st.v = np.maximum(nu_t * st.v, a)
            root = st.v
        else:
            p = 1 if s.norm == Norm.L1 else 2
            st.v = nu_t * st.v + weight * np.abs(h) ** p
            v = st.v
            if s.amsgrad:
                # torch (and Reddi et al. without correction): the max is taken of the
                # uncorrected average v_raw = v_hat k_t, then corrected with k_t of today.
                k = self._raw_over_hat(t)
                st.vmax_raw = np.maximum(st.vmax_raw, v * k)
                v = st.vmax_raw / k
            if s.centered:
                # Graves' centered RMSprop: E[h^2] - E[h]^2 (after AMSGrad's max, if any)
                st.gavg = nu_t * st.gavg + weight * h
                v = v - st.gavg**2
            if s.eps == Eps.INSIDE:
                return (v + eps) ** (1.0 / p)
            root = v ** (1.0 / p)
        if s.eps == Eps.INSIDE:
            return root  # LINF: eps went in before the max
        return root + eps

    def _raw_over_hat(self, t: int) -> float:
        """v_raw / v_hat for the nu schedule: what torch stores against the scheduled mean."""
        s, hp = self.spec, self.hyper
        if s.denominator == Denominator.SUM:
            return 1.0
        if s.nu_schedule == Schedule.BIAS_CORRECTION:
            return unbiased_mass(float(hp["nu"]), t)
        if s.nu_schedule == Schedule.TRUE_MEAN:
            return float(t)
        return 1.0

    def _momentum(self, g_in: np.ndarray, st: ParamState, t: int) -> np.ndarray:
        s, hp = self.spec, self.hyper
        mu = float(hp["mu"])
        if st.m is None:
            st.m = np.zeros_like(g_in)
        if s.mu_schedule == Schedule.NADAM:
            # torch NAdam (Dozat's Nadam with a warming schedule):
            # mu_t = beta1 (1 - 0.5 * 0.96^(t psi)); m is the plain EMA with beta1;
            # theta -= lr (1 - mu_t)/(1 - prod_t) g/vbar + lr mu_{t+1}/(1 - prod_t mu_{t+1}) m/vbar
            psi = float(hp.get("momentum_decay", 4e-3))
            mu_t = mu * (1.0 - 0.5 * 0.96 ** (t * psi))
            mu_next = mu * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
            st.nadam_prod *= mu_t
            st.m = mu * st.m + (1.0 - mu) * g_in
            return (
                mu_next / (1.0 - st.nadam_prod * mu_next) * st.m + (1.0 - mu_t) / (1.0 - st.nadam_prod) * g_in
            )
        cap = hp.get("mu_max")
        mu_t = scheduled(s.mu_schedule, mu, t, cap)
        mu_next = scheduled(s.mu_schedule, mu, t + 1, cap)
        if s.momentum_accumulation == Accumulation.MEAN:
            weight = 1.0 - mu_t
        else:
            # torch SGD: the buffer starts as the first gradient; dampening from step 2 on
            weight = 1.0 if t == 1 else 1.0 - float(hp.get("dampening", 0.0))
        st.m = mu_t * st.m + weight * g_in
        if s.momentum == Momentum.NESTEROV:
            g_weight = (1.0 - mu_t) if s.momentum_accumulation == Accumulation.MEAN else 1.0
            return mu_next * st.m + g_weight * g_in
        return st.m
