"""DeviceScalars (capturable steps) against the host's step_scalars: every spec of the
family at the steps where schedules switch, NAdam's carried product through skipped steps
and resumption, the rounding seed, and the absence of host synchronization."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from fastopt import presets, scalars
from fastopt.device_scalars import SCALAR_FIELDS, DeviceScalars
from fastopt.scalars import StepScalars, nadam_mu_product, rounding_seed, step_scalars
from fastopt.spec import Schedule, WeightDecay, family

# The whole family with both weight-decay modes (decoupled decay changes weight_decay and
# decay_factor); maximize only negates the gradient and changes no scalar, so it is left out.
# (Built from family() by replace, the same set as family(include_orthogonal=True) without
# maximize: enumerating that takes ~11 s, family() ~3 s.)
SPECS = [v for s in family() for v in (s, s.replace(weight_decay=WeightDecay.DECOUPLED))]
# every hyperparameter away from its neutral value, so every coefficient matters
HYPER = dict(
    mu=0.9, nu=0.99, eps=1e-3, weight_decay=0.1, dampening=0.1, mu_max=0.95, nu_max=0.995,
    lr_decay=0.01, momentum_decay=0.1,
)  # fmt: skip
# torch.optim's defaults: no lr decay, no dampening, no caps (mu_max/nu_max fall back to mu/nu)
DEFAULTS = dict(mu=0.9, nu=0.999, eps=1e-8, weight_decay=0.0)
LR = 0.01
# 1-7 straddle RAdam's switch (rho_t > 5 from t = 6 on for nu from 0.9 to 0.9999, see
# test_radam_switch_point); 249/250/251 and 500 the INCREASING schedule's steps; 1000 a late step
STEPS = (1, 2, 3, 5, 6, 7, 249, 250, 251, 500, 1000)
# Both sides compute in float64 with the same operations in the same order; only pow and
# log2 may round differently (libm against torch's kernels, within an ulp or two). The worst
# amplification is the cancellation in 1 - nu^t at t = 1 (1 / (1 - nu) = 1000 for nu = 0.999)
# and NAdam's product of t factors, so a few 1e-13 at most: 1e-12 leaves margin and still
# catches any wrong formula, which is off by far more (the largest difference seen is 2e-16).
# Zeros must be exact zeros.
RTOL = 1e-12


def host_values(spec, hyper, t, lr=LR, salt=0) -> list[float]:
    """step_scalars in the scalars tensor's layout (use_denominator as 1.0 / 0.0, then the seed)."""
    return [float(x) for x in step_scalars(spec, hyper, t, lr)] + [float(rounding_seed(t, salt))]


def mismatches(ours: torch.Tensor, ref: list[float], rtol: float = RTOL) -> list[tuple[str, float, float]]:
    got = ours.tolist()
    bad = []
    for name, a, b in zip(SCALAR_FIELDS, got, ref):
        exact = name in ("use_denominator", "seed")
        if not (a == b if exact else abs(a - b) <= rtol * abs(b)):
            bad.append((name, a, b))
    return bad


def step_tensor(t: int, k: int, device="cpu") -> torch.Tensor:
    # alternate the accepted forms of t: float32 / float64, 0-dim / 1-element
    dtype = torch.float32 if k % 2 else torch.float64
    shape = (1,) if k % 3 == 0 else ()
    return torch.full(shape, float(t), dtype=dtype, device=device)


def test_layout_matches_triton_kernels():
    assert SCALAR_FIELDS == (*StepScalars._fields, "seed")
    triton_kernels = pytest.importorskip("fastopt.backends.triton_kernels")
    assert SCALAR_FIELDS == triton_kernels.SCALAR_FIELDS


@pytest.mark.parametrize("hyper", [HYPER, DEFAULTS], ids=["hyper", "defaults"])
@pytest.mark.parametrize("chunk", range(4))
def test_every_spec_matches_step_scalars(hyper, chunk):
    """Every spec (both weight-decay modes) at every step of STEPS, float and tensor lr."""
    failures = []
    for i, spec in enumerate(SPECS[chunk::4]):
        for k, t in enumerate(STEPS):
            # start = t - 1: the state NAdam carries starts from the host's product, so
            # steps need not be taken one by one (the sequence is tested below)
            ds = DeviceScalars(spec, hyper, "cpu", salt=i % 5, start=t - 1)
            lr = torch.tensor(LR, dtype=torch.float64) if (i + k) % 4 >= 2 else LR  # independent of t's form
            bad = mismatches(ds.compute(step_tensor(t, i + k), lr), host_values(spec, hyper, t, salt=i % 5))
            if bad:
                failures.append((spec.short(), t, bad))
    assert not failures, failures[:5]


@given(
    spec=st.sampled_from(SPECS),
    t=st.integers(1, 3000),
    mu=st.floats(0.0, 0.99),
    nu=st.floats(0.5, 0.999),
    lr=st.floats(1e-6, 10.0),
    lr_decay=st.sampled_from([0.0, 1e-3, 0.5]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.3]),
    dampening=st.floats(0.0, 0.9),
    caps=st.sampled_from([{}, dict(mu_max=0.95, nu_max=0.9995), dict(mu_max=0.5, nu_max=0.6)]),
    momentum_decay=st.sampled_from([4e-3, 0.1, 1.0]),
)
def test_random_hyperparameters(spec, t, mu, nu, lr, lr_decay, weight_decay, dampening, caps, momentum_decay):
    hyper = dict(
        mu=mu, nu=nu, eps=1e-6, lr_decay=lr_decay, weight_decay=weight_decay, dampening=dampening,
        momentum_decay=momentum_decay, **caps,
    )  # fmt: skip
    ds = DeviceScalars(spec, hyper, "cpu", start=t - 1)
    out = ds.compute(torch.tensor(float(t)), torch.tensor(lr, dtype=torch.float64))
    # nu up to 0.999 and NAdam products of up to 3000 factors: as RTOL
    assert not mismatches(out, host_values(spec, hyper, t, lr=lr))


def test_radam_switch_point():
    # the steps of STEPS around 5-6 are where RAdam's rectification switches on
    for nu in (0.9, 0.95, 0.99, 0.999, 0.9999):
        ds = DeviceScalars(presets.spec("radam"), dict(mu=0.9, nu=nu, eps=1e-8), "cpu")
        used = [
            ds.compute(torch.tensor(float(t)), LR)[SCALAR_FIELDS.index("use_denominator")].item()
            for t in range(1, 9)
        ]
        assert used == [0.0] * 5 + [1.0] * 3, nu


def test_radam_unrectified_steps_compute_no_nan():
    """rho_t <= 5 would give sqrt of a negative: the unselected branch must be finite too
    (a NaN there is harmless to torch.where's value but trips anomaly checks)."""
    seen = []

    class Finite(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.is_floating_point():
                seen.append((str(func), bool(torch.isfinite(result).all())))
            return result

    ds = DeviceScalars(presets.spec("radam"), dict(mu=0.9, nu=0.999, eps=1e-8), "cpu")
    for t in range(1, 7):
        with Finite():
            ds.compute(torch.tensor(float(t), dtype=torch.float64), LR)
    assert seen and all(ok for _, ok in seen), [f for f, ok in seen if not ok]


# ---- NAdam's carried product ------------------------------------------------------------


NADAM = presets.spec("nadam")
NADAM_HYPER = dict(mu=0.9, nu=0.999, eps=1e-8, momentum_decay=4e-3)


def test_nadam_is_the_only_carried_state():
    # if another schedule grows state, the sequence tests below must cover it too
    stateful = {s.mu_schedule for s in SPECS if DeviceScalars(s, HYPER, "cpu")._nadam_prod is not None}
    assert stateful == {Schedule.NADAM}


def skipped_sequence(n: int) -> list[int]:
    """Steps 1..n with some repeated, as a GradScaler's skipped steps repeat t."""
    seq = []
    for t in range(1, n + 1):
        seq.append(t)
        if t % 7 == 3 or t in (1, 250):
            seq.extend([t] * (1 + t % 2))
    return seq


@pytest.mark.parametrize("momentum_decay", [4e-3, 0.1])
def test_nadam_product_through_skipped_steps(momentum_decay):
    hyper = dict(NADAM_HYPER, momentum_decay=momentum_decay)
    ds = DeviceScalars(NADAM, hyper, "cpu")
    t_dev = torch.zeros((), dtype=torch.float32)  # torch's capturable step counts are float32
    seq = skipped_sequence(300)
    assert len(seq) > 340  # the repeats are there
    failures = []
    last = 0
    for t in seq:
        if t > last:
            t_dev += 1  # the increment happens on the device; a skipped step leaves it
        last = t
        out = ds.compute(t_dev, LR)
        # the product itself (300 factors: rounding of pow only, as RTOL)
        prod = ds._nadam_prod.item()
        if not math.isclose(prod, nadam_mu_product(t, 0.9, momentum_decay), rel_tol=RTOL, abs_tol=0):
            failures.append((t, "product", prod))
        bad = mismatches(out, host_values(NADAM, hyper, t))
        if bad:
            failures.append((t, bad))
    assert not failures, failures[:5]


def test_nadam_skipped_step_retried_at_a_new_beta1():
    """beta1 changed before every try (a scheduler's cycle_momentum), steps 2 and 4 skipped
    and tried again: the product holds each taken step's factor at the beta1 it was taken
    with, as torch.optim.NAdam's 'mu_product' does (a skipped step multiplies nothing in)."""
    ds = DeviceScalars(NADAM, NADAM_HYPER, "cpu")
    tries = [1, 2, 2, 3, 4, 4, 4, 5]  # the step number of each try
    product = 1.0  # torch's: each taken step's mu_t at its beta1
    for k, t in enumerate(tries):
        beta1 = 0.9 - 0.01 * k
        hyper = dict(NADAM_HYPER, mu=beta1)
        ds.set_hyper(hyper)
        out = ds.compute(torch.tensor(float(t)), LR)
        # the host's scalars of this try: its factor at this beta1, the product before it
        assert not mismatches(
            out, list(step_scalars(NADAM, hyper, t, LR, mu_product=product)) + [float(rounding_seed(t, 0))]
        ), (k, t)
        taken = k + 1 == len(tries) or tries[k + 1] > t
        if taken:
            product *= scalars.nadam_mu(t, beta1, NADAM_HYPER["momentum_decay"])


@pytest.mark.parametrize("start", [1, 5, 249, 1000])
def test_nadam_resumes_from_start(start):
    ds = DeviceScalars(NADAM, NADAM_HYPER, "cpu", start=start)
    # the first call may repeat step `start` (its values), then steps go on from there
    for t in [start, start + 1, start + 1, *range(start + 2, start + 40)]:
        out = ds.compute(torch.tensor(float(t)), LR)
        assert not mismatches(out, host_values(NADAM, NADAM_HYPER, t)), t


def test_nadam_resumed_equals_uninterrupted():
    whole = DeviceScalars(NADAM, NADAM_HYPER, "cpu")
    for t in range(1, 31):
        expected = whole.compute(torch.tensor(float(t)), LR).clone()
    resumed = DeviceScalars(NADAM, NADAM_HYPER, "cpu", start=20)
    for t in range(21, 31):
        got = resumed.compute(torch.tensor(float(t)), LR)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=0)


def test_start_must_not_be_negative():
    with pytest.raises(ValueError):
        DeviceScalars(NADAM, NADAM_HYPER, "cpu", start=-1)


# ---- the seed ---------------------------------------------------------------------------


@pytest.mark.parametrize("salt", [0, 1, 7, 2**20 + 3, 2**40])
def test_seed_is_exact(salt):
    ds = DeviceScalars(presets.spec("adam"), DEFAULTS, "cpu", salt=salt)
    seed = SCALAR_FIELDS.index("seed")
    # float32 holds integers exactly up to 2**24; float64 beyond, past the point where
    # t * 0x9E3779B1 itself would overflow int64 (t > 3.4e9)
    small = [1, 2, 3, 1000, 10**7 - 1, 10**7, 10**7 + 1, 2**24 - 1, 2**24]
    large = [2**31 - 1, 2**31, 2**31 + 1, 3_500_000_000, 10**12, 2**52 + 1]
    for dtype, steps in ((torch.float32, small), (torch.float64, small + large)):
        for t in steps:
            got = ds.compute(torch.tensor(float(t), dtype=dtype), LR)[seed].item()
            assert got == rounding_seed(t, salt), (dtype, t)


# ---- capturability: no host synchronization, fixed addresses ------------------------------


class HostSync(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Fails on the ops that read a tensor's value on the host (item, float, bool, if,
    tolist all dispatch to _local_scalar_dense) or build a tensor from host data inside the
    step (torch.tensor: an implicit host-to-device copy). With ``device`` set, it also fails
    on any tensor elsewhere: a 0-dim CPU tensor is accepted by CUDA ops as a scalar, which
    would copy it to the device at every step."""

    FORBIDDEN = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.item.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.lift_fresh.default,
        torch.ops.aten.lift_fresh_copy.default,
    }

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise HostSync(f"{func} in a capturable step")
        result = func(*args, **(kwargs or {}))
        if self.device is not None:
            flat = [*args, *(kwargs or {}).values(), result]
            flat += [x for a in flat if isinstance(a, list | tuple) for x in a]
            for x in flat:
                if isinstance(x, torch.Tensor) and x.device.type != self.device:
                    raise HostSync(f"{func} touches a {x.device} tensor")
        return result


def test_no_host_sync_detector_works():
    # the guards of the next tests must be able to fail
    t = torch.tensor(3.0)
    for sync in (lambda: float(t), lambda: t.item(), lambda: bool(t > 1), lambda: int(t)):
        with pytest.raises(HostSync), NoHostSync():
            sync()
    with pytest.raises(HostSync), NoHostSync():
        torch.tensor(1.0)
    # tolist() and numpy() read the data without dispatching: on the meta device there is
    # no data, so they fail there
    tm = torch.zeros((), device="meta")
    for sync in (lambda: float(tm), lambda: tm.tolist(), lambda: tm.numpy(), lambda: tm.cpu()):
        with (
            pytest.raises((HostSync, RuntimeError, NotImplementedError, TypeError)),
            NoHostSync(device="meta"),
        ):
            sync()
    with pytest.raises(HostSync), NoHostSync(device="meta"):
        tm + torch.zeros(())  # a CPU scalar tensor mixed into a device op


DISTINCT = sorted({(s.momentum, s.momentum_accumulation, s.mu_schedule, s.denominator, s.norm, s.nu_schedule, s.extra, s.weight_decay): s for s in SPECS}.values(), key=lambda s: s.key())  # fmt: skip


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_compute_never_syncs(tensor_lr):
    """Every combination of the switches that scalars depend on, on CPU tensors."""
    for spec in DISTINCT:
        ds = DeviceScalars(spec, HYPER, "cpu", start=4)
        lr = torch.tensor(LR, dtype=torch.float64) if tensor_lr else LR
        for t in (5, 5, 6):
            t_dev = torch.tensor(float(t))
            with NoHostSync():
                ds.compute(t_dev, lr)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_compute_stays_on_the_device(tensor_lr):
    """On the meta device (no values at all) every tensor an op touches must be a device
    tensor: no CPU scalar tensor sneaks in."""
    for spec in DISTINCT:
        ds = DeviceScalars(spec, HYPER, "meta", start=4)
        lr = torch.tensor(LR, dtype=torch.float64, device="meta") if tensor_lr else LR
        t_dev = torch.tensor(5.0, device="meta")
        with NoHostSync(device="meta"):
            out = ds.compute(t_dev, lr)
        assert out.device.type == "meta" and out.dtype == torch.float64 and out.shape == (len(SCALAR_FIELDS),)


def test_out_keeps_its_address_and_every_field_is_written():
    for spec in (
        NADAM,
        presets.spec("radam"),
        presets.spec("adamw"),
        presets.spec("nesterov"),
        presets.spec("adamax"),
    ):
        hyper = dict(HYPER, nu=0.999)
        ds = DeviceScalars(spec, hyper, "cpu")
        ptr = ds.out.data_ptr()
        state_ptr = None if ds._nadam_prod is None else ds._nadam_prod.data_ptr()
        for t in (1, 2, 2, 3, 4, 5, 6, 7):
            ds.out.fill_(math.nan)  # whatever was there before is overwritten
            out = ds.compute(torch.tensor(float(t)), LR)
            assert out is ds.out and out.data_ptr() == ptr
            assert ds._nadam_prod is None or ds._nadam_prod.data_ptr() == state_ptr
            assert not mismatches(out, host_values(spec, hyper, t)), (spec.short(), t)


def test_matches_host_built_scalars_tensor():
    """The host-built tensor of triton_backend, which captured graphs read today."""
    triton_backend = pytest.importorskip("fastopt.backends.triton_backend")
    spec = presets.spec("adamw")
    ds = DeviceScalars(spec, HYPER, "cpu", salt=2)
    for t in (1, 2, 10):
        host = triton_backend.scalars_tensor(
            step_scalars(spec, HYPER, t, LR), "cpu", seed=rounding_seed(t, 2)
        )
        torch.testing.assert_close(ds.compute(torch.tensor(float(t)), LR), host, rtol=RTOL, atol=0)
