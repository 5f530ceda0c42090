"""Hyperparameters changed during a run, as torch's schedulers change them.

OneCycleLR and CyclicLR cycle Adam-family beta1 (``cycle_momentum``, on by default)
between steps. torch.optim.NAdam multiplies each step's mu_t, at that step's beta1, into
its 'mu_product' state and steps with that product; fastopt's NAdam steps with the
product it carries in the same state, on every backend and through skipped AMP steps and
checkpoints. (A product recomputed at the current beta1 differs from torch's by ~1e-4
relative after a few cycled steps.)

Tolerances: float64 against torch, 30 steps, the same algebra in another order: 1e-10
relative (tests/test_torch_parity.py). The Triton kernels in fp32: KERNEL_TOL.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import KERNEL_TOL, needs_triton, small_grads, small_params
from optim_db import cpu_backends

import fastopt
from fastopt import optim, scalars

F64_TOL = dict(rtol=1e-10, atol=1e-12)


def _cycled_pair(make_ours, steps: int, dtype: torch.dtype, device="cpu"):
    """fastopt.NAdam and torch.optim.NAdam under OneCycleLR with cycle_momentum."""
    ours = [p.detach().to(dtype).requires_grad_() for p in small_params(device)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_ours, opt_theirs = make_ours(ours), torch.optim.NAdam(theirs, lr=1e-2)
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=steps + 1, base_momentum=0.8)
        for o in (opt_ours, opt_theirs)
    ]
    seen = set()
    for step in range(steps):
        seen.add(opt_theirs.param_groups[0]["betas"][0])
        for a, b, g in zip(ours, theirs, small_grads(step, device)):
            a.grad, b.grad = g.to(dtype), g.to(dtype).clone()
        opt_ours.step()
        opt_theirs.step()
        for s in scheds:
            s.step()
    assert len(seen) > steps // 2  # it did cycle beta1
    return ours, theirs, opt_ours, opt_theirs


@pytest.mark.parametrize("backend", cpu_backends())
def test_nadam_follows_a_cycled_beta1_like_torch(backend, float64_default):
    ours, theirs, opt_ours, opt_theirs = _cycled_pair(
        lambda ps: fastopt.NAdam(ps, lr=1e-2, backend=backend), 30, torch.float64
    )
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **F64_TOL)
    for p, q in zip(ours, theirs):
        assert float(opt_ours.state[p]["mu_product"]) == pytest.approx(
            float(opt_theirs.state[q]["mu_product"]), rel=1e-12
        )


@needs_triton
def test_nadam_follows_a_cycled_beta1_on_triton(triton_device):
    ours, theirs, *_ = _cycled_pair(
        lambda ps: fastopt.NAdam(ps, lr=1e-2, backend="triton"), 12, torch.float32, triton_device
    )
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **KERNEL_TOL)


@needs_triton
@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
def test_skipped_steps_do_not_advance_the_carried_product(triton_device, capturable, monkeypatch):
    """beta1 changed at every step, found_inf set on some: the device path (the host's copy
    of the product put back after a skipped step; capturable: the device's product carried
    on through each change of beta1) equals the torch backend, which skips on the host.
    A capturable group makes its device scalars once: remaking them at each change would
    read the step count and product back to the host, a synchronization per step."""
    made = []

    class Counted(optim.DeviceScalars):
        def __init__(self, *args, **kwargs):
            made.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(optim, "DeviceScalars", Counted)
    flags = [0, 1, 0, 1, 1, 0, 0]
    results = []
    for backend in ("triton", "torch"):
        params = small_params(triton_device)
        kw = dict(capturable=True) if backend == "triton" and capturable else {}
        opt = fastopt.NAdam(params, lr=1e-2, backend=backend, **kw)
        for step, flag in enumerate(flags):
            opt.param_groups[0]["betas"] = (0.9 - 0.02 * step, 0.999)
            for p, g in zip(params, small_grads(step, triton_device, 512.0)):
                p.grad = g
            opt.grad_scale = torch.full((1,), 512.0, device=triton_device)
            opt.found_inf = torch.full((1,), float(flag), device=triton_device)
            opt.step()
            del opt.grad_scale, opt.found_inf
        results.append((params, opt))
    assert len(made) == (1 if capturable else 0)
    (ours, opt), (theirs, ref) = results
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **KERNEL_TOL)
    for p, q in zip(ours, theirs):
        # float32 state (torch's scalar dtype), seven roundings: the capturable path computes
        # mu_t in float32 on the device, the host path in float64
        torch.testing.assert_close(
            opt.state[p]["mu_product"].cpu(), ref.state[q]["mu_product"].cpu(), rtol=1e-6, atol=0
        )


def _continue_both(params, state, backend, steps, beta1=None):
    """fastopt.NAdam and torch.optim.NAdam loaded from one torch checkpoint and stepped on
    with the same gradients (and beta1 per step, if given): [(params, optimizer)] * 2."""
    runs = []
    for make in (
        lambda ps: fastopt.NAdam(ps, lr=1e-2, backend=backend),
        lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    ):
        ps = [p.detach().clone().requires_grad_() for p in params]
        opt = make(ps)
        opt.load_state_dict(copy.deepcopy(state))  # loading shares the tensors, as in torch
        for step in steps:
            if beta1 is not None:
                opt.param_groups[0]["betas"] = (beta1(step), 0.999)
            for p, g in zip(ps, small_grads(step, "cpu")):
                p.grad = g
            opt.step()
        runs.append((ps, opt))
    return runs


@pytest.mark.parametrize("backend", cpu_backends())
def test_nadam_continues_a_torch_checkpoint_with_a_beta1_history(backend, float64_default):
    """Ten torch steps at a different beta1 each, checkpointed; fastopt continues exactly as
    torch does from the same checkpoint (the product is read from the state)."""
    params = small_params("cpu")
    src = torch.optim.NAdam(params, lr=1e-2)
    for step in range(10):
        src.param_groups[0]["betas"] = (0.8 + 0.015 * step, 0.999)
        for p, g in zip(params, small_grads(step, "cpu")):
            p.grad = g
        src.step()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    (ours, _), (theirs, _) = _continue_both(
        params, torch.load(buf, weights_only=True), backend, range(10, 20)
    )
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **F64_TOL)


def test_nadam_resumes_bit_identically_from_float32_state():
    """float64 params under torch's float32 default dtype, in which NAdam keeps mu_product:
    a constant beta1's product is recognised in the rounded state, so a run resumed from a
    checkpoint steps with the same float64 scalars as the uninterrupted run (with the
    rounded product itself it would be off in the last bits)."""
    grads = [[g.double() for g in small_grads(step, "cpu")] for step in range(12)]

    def run(params, opt, steps):
        for step in steps:
            for p, g in zip(params, grads[step]):
                p.grad = g.clone()
            opt.step()

    def fresh():
        return [p.detach().double().requires_grad_() for p in small_params("cpu")]

    straight = fresh()
    run(straight, fastopt.NAdam(straight, lr=1e-2), range(12))
    params = fresh()
    opt = fastopt.NAdam(params, lr=1e-2)
    run(params, opt, range(6))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = fastopt.NAdam(params, lr=1e-2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert all(s["mu_product"].dtype == torch.float32 for s in resumed.state.values())
    run(params, resumed, range(6, 12))
    for a, b in zip(params, straight):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", cpu_backends())
def test_nadam_params_at_different_step_counts_keep_their_own_products(backend, float64_default):
    """A torch checkpoint whose params took 7, 4 and 1 steps (gradients on some params
    only), at a beta1 that changes every step: the group is stepped in three buckets, each
    param multiplying its own product as torch does. (A group at one step count updates the
    products of all its params at once; this is the other path.)"""
    params = small_params("cpu")
    src = torch.optim.NAdam(params, lr=1e-2)
    for step in range(7):
        src.param_groups[0]["betas"] = (0.8 + 0.015 * step, 0.999)
        for i, (p, g) in enumerate(zip(params, small_grads(step, "cpu"))):
            p.grad = g if step >= 3 * i else None
        src.step()
    state = src.state_dict()
    assert len({float(s["step"]) for s in state["state"].values()}) == 3
    runs = _continue_both(params, state, backend, range(7, 15), beta1=lambda step: 0.95 - 0.01 * step)
    (ours, opt), (theirs, ref) = runs
    ours_products = [float(opt.state[p]["mu_product"]) for p in ours]
    their_products = [float(ref.state[p]["mu_product"]) for p in theirs]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **F64_TOL)
    assert ours_products == pytest.approx(their_products, rel=1e-12)


def _set_beta1(group: dict, value: float) -> None:
    if "betas" in group:  # torch's name
        group["betas"] = (value, group["betas"][1])
    else:
        group["mu"] = value


def _alternating_histories(make, steps: int = 10):
    """Two params that reach each step count by different steps (a and b take turns for a
    while), at a beta1 changed before every step: their products differ at equal counts."""
    a, b = (torch.ones(4, requires_grad=True) for _ in range(2))
    opt = make([a, b])
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        _set_beta1(opt.param_groups[0], 0.9 - 0.05 * step)
        ga, gb = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
        a.grad = ga if (step < 3 or step >= 6) else None
        b.grad = gb if step >= 3 else None
        opt.step()
    return [a, b], opt


@pytest.mark.parametrize("backend", cpu_backends())
def test_params_at_one_count_with_other_histories_keep_their_own_products(backend, float64_default):
    """a steps at 0-2 and 6-9, b at 3-9: at step 9 both have taken 7 steps, at other beta1s.
    Each must step with its own product, as torch does (not the first param's)."""
    ours, opt = _alternating_histories(lambda ps: fastopt.NAdam(ps, lr=0.1, backend=backend))
    theirs, ref = _alternating_histories(lambda ps: torch.optim.NAdam(ps, lr=0.1))
    assert float(opt.state[ours[0]]["step"]) == float(opt.state[ours[1]]["step"]) == 7
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **F64_TOL)


@pytest.mark.parametrize("backend", cpu_backends())
def test_the_generic_optimizer_carries_the_nadam_product(backend, float64_default):
    """A FusedOptimizer with the NADAM schedule and mu changed mid-run keeps 'mu_product' in
    its state and steps as torch.optim.NAdam with the same beta1 history."""
    spec = fastopt.presets.spec("nadam")
    ours, opt = _alternating_histories(
        lambda ps: fastopt.FusedOptimizer(ps, spec=spec, lr=0.1, mu=0.9, nu=0.999, backend=backend)
    )
    theirs, ref = _alternating_histories(lambda ps: torch.optim.NAdam(ps, lr=0.1))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **F64_TOL)
    for p, q in zip(ours, theirs):
        assert float(opt.state[p]["mu_product"]) == pytest.approx(
            float(ref.state[q]["mu_product"]), rel=1e-12
        )


def test_the_nadam_product_continues_from_each_count_asked_for(monkeypatch):
    """Groups at far-apart step counts (one added mid-training) ask for products at both in
    turn; each continues from its own count rather than restarting from step 1."""
    calls = 0
    real = scalars.nadam_mu

    def counting(*args):
        nonlocal calls
        calls += 1
        return real(*args)

    monkeypatch.setattr(scalars, "nadam_mu", counting)
    expected = {}
    for t in (5000, 10):
        product = 1.0
        for i in range(1, t + 1):
            product *= real(i, 0.9, 4e-3)
        expected[t] = product
    for step in range(20):
        for t in (5000 + step, 10 + step):
            got = scalars.nadam_mu_product(t, 0.9, 4e-3)
            if step == 0:
                assert got == expected[t]  # the same product, multiplied in the same order
    assert calls < 5000 + 10 + 2 * 20 + 1  # one factor per new step after the first two
