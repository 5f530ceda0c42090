"""Determinism: the same inputs give bit-identical results, whatever the thread count.

Every rule is elementwise, so a backend's thread or launch configuration only changes
which worker computes an element, never how; the one reduction, the global gradient norm
of ``max_grad_norm``, must not depend on it either. Stochastic rounding of bf16 state (the
GPU kernels' default for bf16 state of fp32 params) is the documented exception: it draws
a fresh seed every launch, so it is checked to the bf16 rounding it promises instead.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_reliability_hostile import TARGETS, kernel_env

import fastopt
from fastopt import backends

# big enough for the C++ backend to split a tensor over threads, and for torch's norm and
# elementwise kernels to go parallel; the interpreter gets small ones
BIG_SHAPES = [(512, 1100), (70001,), (3, 5, 7), (0,), ()]
SMALL_SHAPES = [(40, 11), (301,), (3, 5, 7), (0,), ()]


def _env(device: str, backend: str):
    return kernel_env(device, backend)


def _run(device, backend, dtype, steps=4, **opt_kw):
    """Adam (AMSGrad, weight decay, clipping) on fixed data; the params and state after."""
    shapes = SMALL_SHAPES if backend in ("triton", "cuda") and device == "cpu" else BIG_SHAPES
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]
    grads = [
        [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes] for _ in range(steps)
    ]
    opt = fastopt.Adam(
        params, lr=1e-2, weight_decay=0.01, amsgrad=True, backend=backend, max_grad_norm=0.5, **opt_kw
    )
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    state = [t for p in params for t in opt.state[p].values()]
    return [p.detach().cpu().clone() for p in params] + [t.detach().cpu().clone() for t in state]


def _assert_bitwise(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype
        same = torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        assert same, f"tensor {i} ({x.dtype}, {tuple(x.shape)}) differs, by up to {diff:.3g}"


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _dtypes(device, backend):
    lows = [torch.float32, torch.bfloat16]
    if (
        backends.get(backend).supports(fastopt.presets.spec("adam"), torch.device(device), torch.float64)
        is None
    ):
        lows.append(torch.float64)
    return lows


@pytest.mark.parametrize("device,backend", TARGETS, ids=[f"{d}-{b}" for d, b in TARGETS])
def test_same_inputs_same_bits_whatever_the_threads(device, backend):
    with _env(device, backend):
        for dtype in _dtypes(device, backend):
            kw = {"master_weights": True, "state_dtype": torch.float32} if dtype == torch.bfloat16 else {}
            with _threads(1):
                first = _run(device, backend, dtype, **kw)
            with _threads(2):
                again = _run(device, backend, dtype, **kw)
            _assert_bitwise(first, again)
            _assert_bitwise(first, _run(device, backend, dtype, **kw))  # and run to run


@pytest.mark.skipif(backends.unavailable_reason("cpp") is not None, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpp_backend_thread_pool_size_changes_no_bit(dtype, monkeypatch):
    kw = {"master_weights": True, "state_dtype": torch.float32} if dtype == torch.bfloat16 else {}
    runs = []
    for n in (1, 2, 3, 8):  # 8 > cores: more chunks than workers
        monkeypatch.setenv("FASTOPT_NUM_THREADS", str(n))
        runs.append(_run("cpu", "cpp", dtype, **kw))
    for other in runs[1:]:
        _assert_bitwise(runs[0], other)


def test_launch_configuration_changes_no_bit():
    """Triton's chunking (elements per program and per block) decides only who computes an
    element; interpreted here with three configurations, on the GPU machine compiled."""
    if not any(b == "triton" for _, b in TARGETS):
        pytest.skip("Triton cannot run here")
    device = "cuda" if ("cuda", "triton") in TARGETS else "cpu"
    from fastopt.backends import triton_backend

    source = triton_backend._INTERPRETER_CONFIG if device == "cpu" else triton_backend._GPU_CONFIG
    saved = dict(source)
    runs = []
    try:
        with _env(device, "triton"):
            for block, chunk in ((64, 128), (32, 256), (128, 1024)):
                source.update(block=block, chunk=chunk)
                triton_backend.clear_cache()
                runs.append(_run(device, "triton", torch.float32))
    finally:
        source.clear()
        source.update(saved)
        triton_backend.clear_cache()
    for other in runs[1:]:
        _assert_bitwise(runs[0], other)


@pytest.mark.parametrize("device,backend", TARGETS, ids=[f"{d}-{b}" for d, b in TARGETS])
def test_stochastic_rounding_stays_within_bf16_rounding(device, backend):
    """bf16 state of fp32 (or master) weights is stochastically rounded on every backend,
    by default, with a seed drawn from the step number and the group: two runs are
    bit-identical (a resumed run too: tests/test_stochastic_rounding.py and
    tests/test_amp_device_hooks.py), and agree with fp32 state to the bf16 rounding of the
    state (2^-8 relative per step)."""
    with _env(device, backend):
        a = _run(device, backend, torch.float32, state_dtype=torch.bfloat16)
        b = _run(device, backend, torch.float32, state_dtype=torch.bfloat16)
        exact = _run(device, backend, torch.float32)
    n = len(BIG_SHAPES)
    for x, y, z in zip(a[:n], b[:n], exact[:n]):  # the params
        # 4 steps of about lr = 1e-2: stochastic rounding is off by up to one bf16 ulp
        # (2^-7 relative) in m and in v, so a step's size by up to 1.5 * 2^-7 of itself
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, rtol=0, atol=4 * 1e-2 * 2**-6)
