"""Every torch twin equals its torch.optim class, option for option, step by step.

float64: 50 steps to 1e-10 relative. The two compute the same algebra in a different
order, so rounding differs by a few ulps per operation (~1e-15); 50 steps of a rule that
divides by sqrt(v) + eps stay far inside 1e-10.
float32: the same, to 2e-5 relative of the total movement: about a dozen fp32 operations
per step at 6e-8 each, accumulated over 50 steps of random (parameter-independent)
gradients, where the errors add up rather than compound.
"""

from __future__ import annotations

import pytest
import torch
from optim_db import case_id, cpu_backends, matrix

import fastopt

STEPS = 50
CASES = matrix()


def _params(dtype: torch.dtype, seed: int = 0, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (5,), (1,), (2, 3, 2)]
    return [torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes]


def run_pair(info, kw, backend, dtype, steps=STEPS, seed=0, device="cpu"):
    p0 = _params(dtype, seed, device)
    ours = [p.clone().requires_grad_() for p in p0]
    theirs = [p.clone().requires_grad_() for p in p0]
    opt_ours = info.fastopt_cls(ours, **kw, backend=backend)
    opt_theirs = info.torch_cls(theirs, **kw, foreach=False)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=dtype).to(device)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    return p0, ours, theirs, opt_ours, opt_theirs


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("info,kw", CASES, ids=[case_id(i, k) for i, k in CASES])
def test_float64_matches_torch(info, kw, backend, float64_default):
    _, ours, theirs, opt_ours, opt_theirs = run_pair(info, kw, backend, torch.float64)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the state matches too, key for key
    s_ours, s_theirs = opt_ours.state_dict()["state"], opt_theirs.state_dict()["state"]
    assert s_ours.keys() == s_theirs.keys()
    for i in s_theirs:
        assert s_ours[i].keys() == s_theirs[i].keys()
        for key, value in s_theirs[i].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                torch.testing.assert_close(s_ours[i][key], value, rtol=1e-9, atol=1e-12)
            elif isinstance(value, torch.Tensor):
                assert float(s_ours[i][key]) == pytest.approx(float(value), rel=1e-9)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("info,kw", CASES[::3], ids=[case_id(i, k) for i, k in CASES[::3]])
def test_float32_matches_torch(info, kw, backend):
    p0, ours, theirs, *_ = run_pair(info, kw, backend, torch.float32)
    for start, a, b in zip(p0, ours, theirs):
        moved = (b - start).abs().max().item()
        assert (a - b).abs().max().item() <= 2e-5 * max(moved, 1.0)


def test_parity_test_detects_a_difference():
    """The comparison above is not vacuous: a different lr is caught."""
    info = next(i for i, _ in CASES if i.name == "Adam")
    p0 = _params(torch.float64)
    a = [p.clone().requires_grad_() for p in p0]
    b = [p.clone().requires_grad_() for p in p0]
    oa, ob = info.fastopt_cls(a, lr=0.01, backend="torch"), info.torch_cls(b, lr=0.0100001)
    for x, y in zip(a, b):
        x.grad = torch.ones_like(x)
        y.grad = torch.ones_like(y)
    oa.step()
    ob.step()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize(
    "name,kw", [("RMSprop", {}), ("Adadelta", {}), ("Adam", {}), ("AdamW", dict(amsgrad=True))], ids=str
)
def test_huge_gradients_are_squared_after_weighting_as_in_torch(name, kw, backend):
    """fp32 gradients of 5e19: g * g overflows fp32, (1 - alpha) g * g (torch's addcmul
    order, alpha 0.99 and rho 0.9 by default) does not; and Adam's v / (1 - beta2^t) at
    t = 1 (1000 v) overflows where torch's sqrt(v) / sqrt(1 - beta2^t) does not. torch
    takes a finite step; fastopt takes the same one."""
    ours, theirs = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt_ours = getattr(fastopt, name)([ours], lr=0.1, backend=backend, **kw)
    opt_theirs = getattr(torch.optim, name)([theirs], lr=0.1, **kw)
    for _ in range(3):
        g = torch.tensor([5e19, -3e19, 1.0])
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    assert torch.isfinite(theirs).all() and (theirs != 1.0).all()  # the case is the one meant
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)
