"""Drive a backend and the NumPy reference side by side on the same inputs."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest
import torch

import fastopt
from fastopt.reference import Reference
from fastopt.spec import Curvature, Spec

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# the Triton kernels' fused multiply-adds against the torch backend's separate roundings,
# fp32 storage over a few steps (tests/test_triton_backend.py)
KERNEL_TOL = dict(rtol=2e-5, atol=2e-6)


def run_backend_vs_reference(
    spec: Spec,
    hyper: dict[str, Any],
    shapes: list[tuple[int, ...]],
    steps: int,
    backend: str,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Step a FusedOptimizer and the reference with the same gradients (and H u for HVP
    curvature, fed to both); returns (ours, reference) params as float64 arrays."""
    rng = np.random.default_rng(seed)
    p0 = [rng.standard_normal(s) for s in shapes]
    params = [torch.tensor(p, dtype=dtype, device=device, requires_grad=True) for p in p0]
    opt = fastopt.FusedOptimizer(params, spec=spec, backend=backend, **hyper)
    # the reference starts from the same (possibly rounded) values
    ref = Reference(spec, hyper, [p.detach().cpu().double().numpy() for p in params])
    for _ in range(steps):
        grads = [rng.standard_normal(s) for s in shapes]
        hvps = [rng.standard_normal(s) for s in shapes] if spec.curvature == Curvature.HVP else None
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=dtype, device=device)
        if hvps is None:
            opt.step()
        else:
            # feed known H u, bypassing the closure: the closure path is tested in test_api
            _step_with_hvps(opt, params, hvps, dtype)
        rounded = [g.grad.cpu().double().numpy() for g in params]
        ref.step(rounded if dtype != torch.float64 else grads, hvps)
    return [p.detach().cpu().double().numpy() for p in params], ref.params


def _step_with_hvps(opt, params, hvps, dtype) -> None:
    opt.step_with_hvps({p: torch.tensor(h, dtype=dtype, device=p.device) for p, h in zip(params, hvps)})


def max_rel_err(ours: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return max(
        (float(np.max(np.abs(a - b) / (1.0 + np.abs(b)))) if a.size else 0.0) for a, b in zip(ours, ref)
    )


SMALL_SHAPES = [(3,), (130,), (17, 15), (1,)]  # uneven sizes, a 2-D and a one-element tensor


def small_params(device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Leaf params of SMALL_SHAPES, the same values for the same seed on every device."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device).requires_grad_() for s in SMALL_SHAPES]


def small_grads(step: int, device: torch.device, scale: float = 1.0) -> list[torch.Tensor]:
    """Gradients of SMALL_SHAPES for a step number (reproducible across runs)."""
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=gen) * scale).to(device) for s in SMALL_SHAPES]


def assert_bf16_state_resumes_bit_identically(backend: str, device: torch.device | str, tmp_path) -> None:
    """Adam with stochastically rounded bf16 state, 6 steps: a run saved at step 3 and
    resumed in a fresh optimizer equals the uninterrupted run bit for bit (the optimizer
    seeds each step's rounding from the step and the group, not from a counter)."""

    def make(params):
        return fastopt.Adam(params, lr=1e-2, backend=backend, state_dtype=torch.bfloat16)

    def run(params, opt, steps):
        for step in steps:
            for p, g in zip(params, small_grads(step, device)):
                p.grad = g
            opt.step()

    full = small_params(device)
    full_opt = make(full)
    run(full, full_opt, range(6))
    part = small_params(device)
    part_opt = make(part)
    run(part, part_opt, range(3))
    torch.save({"params": [p.detach() for p in part], "opt": part_opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt")
    resumed = [p.detach().clone().requires_grad_() for p in saved["params"]]
    opt = make(resumed)
    opt.load_state_dict(saved["opt"])
    run(resumed, opt, range(3, 6))
    for p, q in zip(full, resumed):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[q][key].dtype == torch.bfloat16
            assert torch.equal(full_opt.state[p][key], opt.state[q][key]), key
