"""The whole family on every CPU backend against the NumPy reference, and the reference
itself against closed forms worked out by hand."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import max_rel_err, run_backend_vs_reference
from optim_db import cpu_backends

import fastopt
from fastopt import presets
from fastopt.reference import Reference
from fastopt.spec import Schedule, Spec, WeightDecay, family

FAMILY = list(family())
# every hyperparameter set away from its neutral value, so every coefficient matters
HYPER = dict(
    lr=0.01, mu=0.9, nu=0.99, eps=1e-3, weight_decay=0.1, dampening=0.1, mu_max=0.95, nu_max=0.995,
    initial_accumulator_value=0.1, lr_decay=0.01, momentum_decay=0.1,
)  # fmt: skip
SHAPES = [(3,), (2, 2), (0,), (1,)]


def test_family_size():
    # Dozat counts ~750 variants of Algorithm 1; fastopt's switches add AMSGrad, centering,
    # eps placement, the NAdam schedule, Adadelta and RAdam
    assert len(FAMILY) == len(set(FAMILY)) > 3000


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("chunk", range(8))
def test_every_spec_matches_reference_float64(backend, chunk):
    """4 steps of every spec in float64: agreement to 1e-10 (rounding only)."""
    failures = []
    for spec in FAMILY[chunk::8]:
        ours, ref = run_backend_vs_reference(spec, HYPER, SHAPES, steps=4, backend=backend)
        err = max_rel_err(ours, ref)
        if not err < 1e-10:
            failures.append((spec.short(), err))
    assert not failures, failures[:10]


@pytest.mark.parametrize("backend", cpu_backends())
def test_orthogonal_switches_match_reference(backend):
    """Decoupled decay and maximize on a spread of the family."""
    failures = []
    for spec in FAMILY[::37]:
        for changes in ({"weight_decay": WeightDecay.DECOUPLED}, {"maximize": True}):
            s = spec.replace(**changes)
            ours, ref = run_backend_vs_reference(s, HYPER, SHAPES, steps=3, backend=backend)
            if not max_rel_err(ours, ref) < 1e-10:
                failures.append(s.short())
    assert not failures, failures[:10]


def test_family_lists_each_rule_once():
    """No two specs of the family step alike: 8 reference steps of every spec give distinct
    params. Gradients and H u are drawn separately, every hyperparameter is away from
    neutral, and the data reach every switch: three elements' gradients shrink a
    hundredfold after three steps (a decaying accumulator decreases: AMSGrad's max
    matters), three stay below initial_accumulator_value (it decides a SUM max: eps
    placement matters). Equal rules agree to rounding; distinct ones differ by far more
    than the 1e-9 the comparison rounds to."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(6)
    scale = [
        np.array([1.0, 1.0, 1.0, 0.01, 0.01, 0.01]) * (1.0 if k < 3 else 0.01) ** (np.arange(6) < 3)
        for k in range(8)
    ]
    grads = [rng.standard_normal(6) * sc for sc in scale]
    hvps = [rng.standard_normal(6) * sc for sc in scale]
    # no weight decay (not a switch of the family): it would keep the shrunk gradients large
    hyper = dict(HYPER, weight_decay=0.0)
    seen: dict[tuple, str] = {}
    duplicates = []
    for spec in FAMILY:
        ref = Reference(spec, hyper, [p0])
        for g, hv in zip(grads, hvps):
            ref.step([g], [hv])
        key = tuple(np.round(ref.params[0], 9))
        if key in seen:
            duplicates.append((spec.short(), seen[key]))
        seen[key] = spec.short()
    assert not duplicates, (len(duplicates), duplicates[:5])


@pytest.mark.parametrize("backend", cpu_backends())
def test_explicit_zero_cap_pins_the_increasing_schedule(backend):
    """mu_max = nu_max = 0 is a cap, not "unset": every INCREASING spec agrees with the
    reference (which pins mu_t = nu_t = 0) rather than falling back to mu and nu."""
    hyper = dict(HYPER, mu_max=0.0, nu_max=0.0)
    specs = [s for s in FAMILY if Schedule.INCREASING in (s.mu_schedule, s.nu_schedule)][::5]
    assert specs
    failures = []
    for spec in specs:
        ours, ref = run_backend_vs_reference(spec, hyper, SHAPES, steps=3, backend=backend)
        if not max_rel_err(ours, ref) < 1e-10:
            failures.append(spec.short())
    assert not failures, failures[:10]


# ---- the reference against hand-derived values --------------------------------------------


def test_reference_adam_first_step_is_sign_step():
    # bias-corrected: m_hat = g, v_hat = g^2, so the first step is lr * g / (|g| + eps)
    g = np.array([0.5, -2.0, 3.0])
    ref = Reference(presets.spec("adam"), dict(lr=0.1, mu=0.9, nu=0.999, eps=0.0), [np.zeros(3)])
    ref.step([g])
    np.testing.assert_allclose(ref.params[0], -0.1 * np.sign(g), rtol=1e-14)


def test_reference_true_mean_momentum_is_arithmetic_mean():
    spec = Spec(momentum=1, mu_schedule=2)  # classical momentum, true-mean schedule
    grads = [np.array([1.0]), np.array([2.0]), np.array([6.0])]
    ref = Reference(spec, dict(lr=1.0, mu=0.5), [np.zeros(1)])
    moved = 0.0
    for k, g in enumerate(grads, 1):
        ref.step([g])
        moved += np.mean([x[0] for x in grads[:k]])  # step k moves by the mean of g_1..g_k
    np.testing.assert_allclose(ref.params[0], [-moved], rtol=1e-14)


def test_reference_sutskever_schedule_values():
    from fastopt.reference import sutskever_mu

    # 1 - 2^(-1 - log2(floor(t/250) + 1)): 0.5 up to t=249, 0.75 from 250, 5/6 from 500
    assert sutskever_mu(1, 0.99) == 0.5
    assert sutskever_mu(250, 0.99) == 0.75
    assert sutskever_mu(500, 0.99) == pytest.approx(1 - 1 / 6)
    assert sutskever_mu(10**9, 0.95) == 0.95


def test_reference_adagrad_two_steps():
    g1, g2 = 3.0, 4.0
    ref = Reference(presets.spec("adagrad"), dict(lr=1.0, eps=0.0), [np.zeros(1)])
    ref.step([np.array([g1])])
    ref.step([np.array([g2])])
    expected = -(g1 / 3.0 + g2 / 5.0)  # sqrt(9) = 3, sqrt(9 + 16) = 5
    np.testing.assert_allclose(ref.params[0], [expected], rtol=1e-14)


def test_reference_adamax_is_running_max():
    ref = Reference(presets.spec("adamax"), dict(lr=1.0, mu=0.0, nu=0.5, eps=0.0), [np.zeros(1)])
    ref.step([np.array([4.0])])  # u = 4, m_hat = 4: step 1
    ref.step([np.array([1.0])])  # u = max(0.5 * 4, 1) = 2, m = 1: step 0.5
    np.testing.assert_allclose(ref.params[0], [-1.5], rtol=1e-14)


def test_reference_radam_early_steps_are_sgd_momentum():
    # rho_t <= 5 for the first steps with beta2 = 0.999: update = lr * m_hat
    ref = Reference(presets.spec("radam"), dict(lr=0.1, mu=0.9, nu=0.999, eps=1e-8), [np.zeros(1)])
    ref.step([np.array([2.0])])
    np.testing.assert_allclose(ref.params[0], [-0.2], rtol=1e-14)


def test_reference_nadam_first_step():
    b1, psi = 0.9, 4e-3
    mu1, mu2 = b1 * (1 - 0.5 * 0.96**psi), b1 * (1 - 0.5 * 0.96 ** (2 * psi))
    g = 2.0
    # m = (1 - b1) g, v_hat = g^2: step = lr/|g| ((1 - mu1)/(1 - mu1) g + mu2/(1 - mu1 mu2) (1 - b1) g)
    expected = -0.1 * (1.0 + mu2 / (1 - mu1 * mu2) * (1 - b1)) * math.copysign(1, g)
    ref = Reference(
        presets.spec("nadam"), dict(lr=0.1, mu=b1, nu=0.999, eps=0.0, momentum_decay=psi), [np.zeros(1)]
    )
    ref.step([np.array([g])])
    np.testing.assert_allclose(ref.params[0], [expected], rtol=1e-13)


# ---- bias corrections with a decay rate close to 1 ------------------------------------------
# 1 - beta^t written directly cancels: beta^t is rounded to 2^-53 and the difference keeps
# 2^-53 / (1 - beta^t) of relative error, 5e-10 at beta = 1 - 1e-9 and t = 2. The scalars the
# kernels get (fastopt.scalars) and the reference each compute it without that loss; both are
# checked here against exact rational arithmetic on the same float64 inputs.
NEAR_ONE = [0.0, 1e-300, 0.3, 0.5, 0.9, 0.999, 1.0 - 1e-7, 1.0 - 1e-9, 1.0 - 2.0**-40]
# expm1 and log1p (or log) are each within an ulp, and t * ln(beta) adds one rounding
ULPS_3 = 3 * 2.0**-52


def _exact_mass(base: float, k: int) -> Fraction:
    return 1 - Fraction(base) ** k


@pytest.mark.parametrize("base", NEAR_ONE)
def test_bias_correction_mass_is_exact_to_rounding(base):
    from fastopt.reference import unbiased_mass
    from fastopt.scalars import one_minus_power

    for k in (1, 2, 3, 10, 1000):
        exact = _exact_mass(base, k)
        device = one_minus_power(base, torch.tensor(float(k), dtype=torch.float64))
        for value in (one_minus_power(base, k), unbiased_mass(base, k), float(device)):
            assert abs(Fraction(value) - exact) <= ULPS_3 * exact, (base, k, value, float(exact))
    assert one_minus_power(base, 0) == unbiased_mass(base, 0) == 0.0
    assert math.copysign(1.0, one_minus_power(base, 0)) == math.copysign(1.0, unbiased_mass(base, 0)) == 1.0


def test_direct_bias_correction_loses_digits_near_one():
    """Why the tests above are needed: the direct form misses the bound by orders of magnitude."""
    base = 1.0 - 1e-9
    exact = _exact_mass(base, 2)
    assert abs(Fraction(1.0 - base**2) - exact) > 1e4 * ULPS_3 * exact


# the rules with a bias-corrected mean and no square root, so that exact arithmetic can
# follow them: Adam's denominator with the L1 norm, and Dozat's bias-corrected momentum
_L1_DENOMINATOR = Spec(denominator=2, norm=1, nu_schedule=Schedule.BIAS_CORRECTION)
_CORRECTED_MOMENTUM = Spec(momentum=1, momentum_input=0, mu_schedule=Schedule.BIAS_CORRECTION)


def _exact_steps(spec: Spec, decay: float, lr: float, grads: list[float]) -> tuple[Fraction, Fraction]:
    """The param after the steps from 0 and the sum of the steps' sizes, in exact arithmetic
    on the float64 inputs."""
    b, p, acc, moved = Fraction(decay), Fraction(0), Fraction(0), Fraction(0)
    for t, g in enumerate(grads, 1):
        g = Fraction(g)
        if spec.denominator:  # v = b v + (1 - b)|g|; p -= lr g / (v / (1 - b^t))
            acc = b * acc + (1 - b) * abs(g)
            update = Fraction(lr) * g * (1 - b**t) / acc
        else:  # m = b m + (1 - b) g; p -= lr m / (1 - b^t)
            acc = b * acc + (1 - b) * g
            update = Fraction(lr) * acc / (1 - b**t)
        p -= update
        moved += abs(update)
    return p, moved


@pytest.mark.parametrize("backend", ["reference", *cpu_backends()])
@pytest.mark.parametrize("spec", [_L1_DENOMINATOR, _CORRECTED_MOMENTUM], ids=["l1-denominator", "momentum"])
def test_float64_steps_with_decay_near_one_are_exact_to_rounding(backend, spec):
    """Three float64 steps with mu or nu = 1 - 1e-9 against exact arithmetic. Each step
    rounds about ten times, each relative to the step, and the param's sums round relative
    to its size: 64 ulps of the total movement bound that. With the direct 1 - beta^t the
    error is ~1e-10 of it."""
    decay, lr = 1.0 - 1e-9, 1e-3
    grads = [-2.7e-19, 2.2e9, 1.3]  # magnitudes far apart: the correction decides each step
    hyper = dict(lr=lr, mu=decay, nu=decay, eps=0.0)
    if backend == "reference":
        ref = Reference(spec, hyper, [np.zeros(1)])
        for g in grads:
            ref.step([np.array([g])])
        ours = float(ref.params[0][0])
    else:
        p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = fastopt.FusedOptimizer([p], spec=spec, backend=backend, **hyper)
        for g in grads:
            p.grad = torch.tensor([g], dtype=torch.float64)
            opt.step()
        ours = float(p.detach()[0])
    exact, moved = _exact_steps(spec, decay, lr, grads)
    assert abs(Fraction(ours) - exact) <= 64 * 2.0**-53 * moved, (ours, float(exact), float(moved))
