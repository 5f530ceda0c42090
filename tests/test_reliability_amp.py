"""Mixed precision: GradScaler skips, autocast training parity with torch.optim.

FusedOptimizer unscales inside the fused step (``_step_supports_amp_scaling``), so a
GradScaler hands it ``grad_scale`` and ``found_inf`` instead of unscaling the gradients
itself: an overflowing step must leave params and state untouched and make the scaler back
off, on every preset and backend. Fused optimizers elsewhere have trained worse than their
unfused twins under fp16 autocast; here the loss curves of fastopt and torch.optim are
compared against the seed-to-seed noise of torch.optim's own curve.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from cuda_emulation import EMULATE
from optim_db import OPTIM_DB, cpu_backends

import fastopt

# Triton's interpreter and the CUDA C++ emulation where no GPU is present (see
# test_reliability_hostile)
HAS_TRITON = importlib.util.find_spec("triton") is not None and not torch.cuda.is_available()
BACKENDS = cpu_backends() + (["triton"] if HAS_TRITON else []) + (["cuda"] if EMULATE else [])


def _backend_env(backend: str):
    from test_reliability_hostile import kernel_env

    return kernel_env("cpu", backend)


def _model(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPTIM_DB, ids=lambda i: i.name)
def test_scaler_skips_overflowing_steps_and_matches_torch(info, backend, float64_default):
    """Six steps under a GradScaler, the fourth overflowing: it changes nothing, the scale
    halves, and every step agrees with the torch.optim twin under its own scaler, the
    gradients left in p.grad included. (float64
    default dtype: torch keeps NAdam's mu_product in it.)"""
    dtype = torch.float32 if backend in ("triton", "cuda") else torch.float64
    # fp64: rounding apart; fp32: a few ulps per step of the fused vs unfused order
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    kw = dict(info.base)
    if info.name in ("SGD", "RMSprop"):
        kw["momentum"] = 0.9  # so that the skipped step has state to leave alone
    ours, theirs = _model(dtype), _model(dtype)
    with _backend_env(backend):
        opt_a = info.fastopt_cls(ours.parameters(), backend=backend, **kw)
        opt_b = info.torch_cls(theirs.parameters(), **kw)
        scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2)]
        gen = torch.Generator().manual_seed(1)
        for step in range(6):
            x = torch.randn(16, 5, generator=gen, dtype=dtype)
            if step == 3:
                x[2, 1] = math.inf
            before = [p.detach().clone() for p in ours.parameters()]
            state_before = {k: v.clone() for p in ours.parameters() for k, v in opt_a.state[p].items()}
            for model, opt, scaler in zip((ours, theirs), (opt_a, opt_b), scalers):
                opt.zero_grad()
                scaler.scale(model(x).pow(2).mean()).backward()
                scaler.step(opt)
                scaler.update()
            if step == 3:
                for p, b in zip(ours.parameters(), before):
                    assert torch.equal(p.detach(), b)
                after = {k: v for p in ours.parameters() for k, v in opt_a.state[p].items()}
                for k, v in state_before.items():
                    assert torch.equal(after[k], v), k
                assert scalers[0].get_scale() == 2.0**11
            for pa, pb in zip(ours.parameters(), theirs.parameters()):
                torch.testing.assert_close(pa, pb, **tol)
                if step != 3:  # a taken step leaves p.grad unscaled, as torch's scaler does
                    torch.testing.assert_close(pa.grad, pb.grad, **tol)
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert not hasattr(opt_a, "found_inf")  # the scaler removed what it lent us


FUSING_BACKENDS = [b for b in BACKENDS if b != "torch"]  # the torch backend unscales apart


@pytest.mark.parametrize("backend", FUSING_BACKENDS)
def test_the_step_itself_leaves_the_gradients_unscaled(backend, monkeypatch):
    """cpp (host path) and Triton (device hooks) write p.grad back unscaled in the step's own
    pass: the separate unscaling pass is handed no group, and p.grad is torch's."""
    apart: list[int] = []
    separate = fastopt.FusedOptimizer._unscale_grads

    def spy(self, plans, found_inf):
        apart.append(len(plans))
        separate(self, plans, found_inf)

    monkeypatch.setattr(fastopt.FusedOptimizer, "_unscale_grads", spy)
    ours, theirs = _model(torch.float32), _model(torch.float32)
    with _backend_env(backend):
        opt_a = fastopt.Adam(ours.parameters(), backend=backend)
        opt_b = torch.optim.Adam(theirs.parameters())
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(2))
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.step(opt)
    assert apart == [0]
    for pa, pb in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(pa.grad, pb.grad)  # one multiply by a power of two: exact
        torch.testing.assert_close(pa, pb, rtol=2e-5, atol=2e-6)  # fp32: a few ulps, one step


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_at_different_step_counts_are_each_unscaled_once(backend):
    """A group whose params have taken different numbers of steps is stepped bucket by
    bucket: each bucket writes back (or unscales apart) its own gradients, once."""
    with _backend_env(backend):
        p1, p2 = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(7))
        opt = fastopt.Adam([p1, p2], backend=backend)
        p1.grad = torch.ones(5)
        opt.step()  # p1 alone: its step count is now one ahead of p2's
        grads = [torch.linspace(-3.0, 3.0, 5), torch.linspace(1.0, 2.0, 7)]
        p1.grad, p2.grad = (g * 8.0 for g in grads)
        opt.grad_scale, opt.found_inf = torch.full((), 8.0), torch.zeros(())
        opt.step()
    assert [float(opt.state[p]["step"]) for p in (p1, p2)] == [2.0, 1.0]
    assert torch.equal(p1.grad, grads[0]) and torch.equal(p2.grad, grads[1])


def _shared_gradient_run(make_opt, aliasing: str, backend: str) -> list[torch.Tensor]:
    """Three GradScaler steps of two params whose loss gives both the same gradient. With
    ``aliasing`` their gradients share memory: one tensor ("same"), or overlapping views of
    one buffer ("overlap": the gradient repeats with period 2, so both views hold it)."""
    x = torch.tensor([0.5, -2.0] * 3)
    p1 = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 6))
    p2 = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 6))
    with _backend_env(backend):
        opt = make_opt([p1, p2])
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale((p1 * x).sum() + (p2 * x).sum()).backward()
            if aliasing == "same":
                p2.grad = p1.grad
            elif aliasing == "overlap":
                flat = torch.cat([p1.grad, p1.grad[:2]])
                p1.grad, p2.grad = flat[:6], flat[2:]
            scaler.step(opt)
            scaler.update()
    return [p1.detach().clone(), p2.detach().clone()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aliasing", ["same", "overlap"])
def test_gradients_sharing_memory_are_all_read_scaled(backend, aliasing):
    """A step that unscaled a shared gradient while stepping one param would hand the other
    param a gradient unscaled twice: params whose gradients share memory step as if each
    had its own copy (SGD with momentum: a twice-unscaled gradient would show at once)."""

    def make(params):
        return fastopt.SGD(params, lr=0.1, momentum=0.9, backend=backend)

    shared = _shared_gradient_run(make, aliasing, backend)
    own = _shared_gradient_run(make, "none", backend)
    reference = _shared_gradient_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "none", "torch")
    assert torch.equal(shared[0], own[0]) and torch.equal(shared[1], own[1])
    torch.testing.assert_close(own, reference, rtol=1e-6, atol=1e-7)  # fp32, three steps


# ---- training under autocast ----------------------------------------------------------------

STEPS, SEEDS, WINDOW = 80, 4, 20


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(512, 16, generator=gen)
    w = torch.randn(16, 4, generator=gen)
    return x, (x @ w + 0.3 * torch.randn(512, 4, generator=gen)).argmax(1)


def _train(make_opt, seed: int, amp_dtype: torch.dtype) -> list[float]:
    """Mini-batch training of an MLP classifier under CPU autocast and a GradScaler."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=20)
    x, y = _data(seed)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=amp_dtype):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    return losses


def _final(losses: list[float]) -> float:
    return sum(losses[-WINDOW:]) / WINDOW


def _autocast_dtypes() -> list[torch.dtype]:
    dtypes = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        dtypes.append(torch.float16)
    except RuntimeError:  # pragma: no cover - older torch: no fp16 autocast on the CPU
        pass
    return dtypes


@pytest.mark.parametrize("amp_dtype", _autocast_dtypes(), ids=str)
def test_autocast_training_loss_matches_torch_within_seed_noise(amp_dtype):
    """The same init and batches per seed for both; the paired difference of the final loss
    must be small against how much the final loss varies from seed to seed (the noise a
    user sees between runs), and the fastopt curve no worse on average."""
    backend = cpu_backends()[-1]
    ours = [
        _final(_train(lambda p: fastopt.AdamW(p, lr=3e-3, backend=backend), s, amp_dtype))
        for s in range(SEEDS)
    ]
    ref = [_final(_train(lambda p: torch.optim.AdamW(p, lr=3e-3), s, amp_dtype)) for s in range(SEEDS)]
    diffs = [a - b for a, b in zip(ours, ref)]
    mean_ref = sum(ref) / SEEDS
    noise = math.sqrt(sum((r - mean_ref) ** 2 for r in ref) / (SEEDS - 1))
    mean_diff = sum(diffs) / SEEDS
    assert noise > 0
    # fp32 master params and fp32 optimizer math on both sides: the curves differ only by
    # rounding, far below the seed noise; a fused step that lost precision (or unscaled
    # twice, or skipped too often) moves the mean difference by a good part of it
    assert abs(mean_diff) < 0.02 * noise, (ours, ref, noise)
    assert max(abs(d) for d in diffs) < 0.05 * noise, (ours, ref, noise)


def test_the_parity_check_can_fail():
    """A deliberately worse optimizer (a quarter of the lr) is caught by the same measure."""
    backend = cpu_backends()[-1]
    worse = [
        _final(_train(lambda p: fastopt.AdamW(p, lr=3e-3 / 4, backend=backend), s, torch.bfloat16))
        for s in range(3)
    ]
    ref = [_final(_train(lambda p: torch.optim.AdamW(p, lr=3e-3), s, torch.bfloat16)) for s in range(3)]
    mean_ref = sum(ref) / 3
    noise = math.sqrt(sum((r - mean_ref) ** 2 for r in ref) / 2)
    assert abs(sum(a - b for a, b in zip(worse, ref)) / 3) > 0.02 * noise


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_keep_updates_below_the_params_resolution(param_dtype, backend):
    """Steps of 1e-4 on params of 1.0 are below half a bf16/fp16 ulp: the params alone never
    move, the fp32 master weights add them up and the params follow, rounded."""
    with _backend_env(backend):
        p = torch.ones(8, dtype=param_dtype, requires_grad=True)
        opt = fastopt.SGD([p], lr=1e-4, master_weights=True, backend=backend)
        for _ in range(100):
            p.grad = torch.ones(8, dtype=param_dtype)
            opt.step()
    master = opt.state[p]["master_param"]
    assert master.dtype == torch.float32
    # 100 fp32 subtractions near 1.0, each rounded by at most 2^-24: under 1e-5 in all
    torch.testing.assert_close(master, torch.full((8,), 0.99), rtol=0, atol=1e-5)
    assert torch.equal(p.detach(), master.to(param_dtype))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_with_master_weights_train_like_fp32(param_dtype, backend):
    """bf16/fp16 params with fp32 master weights and state follow the fp32 run closely:
    the only difference is the params' rounding for the forward pass."""

    def run(dtype, **kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(
            dtype
        )
        opt = fastopt.Adam(model.parameters(), lr=1e-2, backend=backend, **kw)
        x, y = _data(0)
        losses = []
        for step in range(40):
            idx = slice((step * 64) % 512, (step * 64) % 512 + 64)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx].to(dtype)).float(), y[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return _final(losses)

    full = run(torch.float32)
    master = run(param_dtype, master_weights=True, state_dtype=torch.float32)
    plain = run(param_dtype)
    # the forward pass in bf16 (8 bits of mantissa) moves the loss by about 2^-8 relative
    assert abs(master - full) < 0.03 * full
    assert master <= plain + 0.01 * full  # master weights never hurt
