"""The optimizer layer's device-side AMP and clipping path (Triton and CUDA backends).

With a GradScaler (``grad_scale``, ``found_inf``) or ``max_grad_norm``, groups stepped by a
backend with device hooks get the gradient multiplier and found_inf as device tensors:
nothing is read on the host during the step. The host learns whether a step was skipped
at the next step (or state_dict()), and puts its step counts back then; the state's own
'step' tensors (and NAdam's mu_product) live on the device and advance only where
found_inf is 0.

Where no GPU is present these run Triton's interpreter on CPU tensors, on which the same
code path runs (CPU tensors stand in for the device ones); the CUDA cases run on a GPU.
Tolerance: fp32 storage, a few steps, the kernels' fused multiply-adds against the torch
backend's separate roundings: 2e-5 relative, as in tests/test_triton_backend.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import (
    HAS_CUDA,
    HAS_TRITON,
    KERNEL_TOL,
    assert_bf16_state_resumes_bit_identically,
    small_grads,
    small_params,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reliability_hostile import kernel_env
from torch.utils._python_dispatch import TorchDispatchMode

import fastopt

TOL = KERNEL_TOL


@pytest.fixture
def device(device_hooks):
    """CUDA, or the CPU under Triton's interpreter or the CUDA C++ emulation (tests/conftest.py)."""
    return device_hooks[0]


@pytest.fixture
def backend(device_hooks):
    """triton or cuda: the backend stepped on ``device``."""
    return device_hooks[1]


def _run(cls, backend, device, flags, scale=1024.0, **kw):
    """Steps with the given found_inf flags, gradients scaled by ``scale`` and the scale
    lent to the optimizer as a GradScaler does (grad_scale, found_inf attributes)."""
    params = small_params(device)
    opt = cls(params, backend=backend, **kw)
    for step, flag in enumerate(flags):
        for p, g in zip(params, small_grads(step, device, scale)):
            p.grad = g
        opt.grad_scale = torch.full((1,), scale, device=device)
        opt.found_inf = torch.full((1,), float(flag), device=device)
        opt.step()
        del opt.grad_scale, opt.found_inf
    return params, opt


class _NoScalarReads(TorchDispatchMode):
    """Counts reads of tensor values on the host (item(), float(), bool() dispatch to
    aten._local_scalar_dense): with CUDA tensors each is a synchronization."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", [fastopt.Adam, fastopt.NAdam, fastopt.RAdam], ids=lambda c: c.__name__)
def test_skipped_steps_match_the_host_path(device, backend, cls):
    """found_inf set on the second and third steps: params, state and step counts equal the
    torch backend's, which reads found_inf on the host and skips outright."""
    flags = [0, 1, 1, 0, 0, 1, 0]
    ours, opt = _run(cls, backend, device, flags, lr=1e-2)
    theirs, ref = _run(cls, "torch", device, flags, lr=1e-2)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)
    taken = flags.count(0)
    for p, q in zip(ours, theirs):
        sa, sb = opt.state[p], ref.state[q]
        # read directly, before anything settled the host's count: the device tensors are exact
        assert float(sa["step"]) == taken
        for key, value in sb.items():
            torch.testing.assert_close(sa[key].cpu(), value.cpu(), **TOL)
    assert all(int(s["step"]) == taken for s in opt.state_dict()["state"].values())
    # the host's own count is right for the next step's scalars: one more step still agrees
    for params, o in ((ours, opt), (theirs, ref)):
        for p, g in zip(params, small_grads(99, device)):
            p.grad = g
        o.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


def test_step_reads_nothing_on_the_host(device, backend):
    """No value is read on the host during a step with a GradScaler's tensors and clipping;
    the next step reads the previous found_inf once, from its host copy."""
    params = small_params(device)
    opt = fastopt.AdamW(params, lr=1e-2, backend=backend, max_grad_norm=0.5)
    for step in range(3):
        for p, g in zip(params, small_grads(step, device, 8.0)):
            p.grad = g
        opt.grad_scale = torch.full((1,), 8.0, device=device)
        opt.found_inf = torch.zeros(1, device=device)
        with _NoScalarReads() as mode:
            opt.step()
        # the first step builds the plan, reading each param's saved step count (none yet)
        assert mode.reads == (0 if step == 0 else 1), (step, mode.reads)
    # the host path reads found_inf and the scale: the counter sees it
    ref = fastopt.AdamW(small_params(device), lr=1e-2, backend="torch")
    for p in ref.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    ref.grad_scale, ref.found_inf = torch.full((1,), 8.0, device=device), torch.zeros(1, device=device)
    ref.step()
    with _NoScalarReads() as mode:
        ref.step()
    assert mode.reads >= 2


@pytest.mark.parametrize("scale", [None, 64.0])
def test_device_clipping_matches_clip_grad_norm(device, backend, scale):
    """max_grad_norm on the device path equals clip_grad_norm_ (on the unscaled gradients)
    followed by the unclipped torch.optim.Adam."""
    ours, theirs = small_params(device), small_params(device)
    opt = fastopt.Adam(ours, lr=1e-2, backend=backend, max_grad_norm=0.3)
    ref = torch.optim.Adam(theirs, lr=1e-2)
    for step in range(4):
        grads = small_grads(step, device)
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g * scale if scale else g.clone()
            q.grad = g.clone()
        if scale:
            opt.grad_scale = torch.full((1,), scale, device=device)
            opt.found_inf = torch.zeros(1, device=device)
        opt.step()
        if scale:
            del opt.grad_scale, opt.found_inf
        torch.nn.utils.clip_grad_norm_(theirs, 0.3)
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


def test_non_finite_norm_poisons_like_clip_grad_norm(device, backend):
    """An inf gradient without a scaler: clip_grad_norm_ multiplies by max/(inf) = 0 and
    the inf itself stays: the params become nan where torch's do."""
    ours, theirs = small_params(device), small_params(device)
    opt = fastopt.SGD(ours, lr=0.1, backend=backend, max_grad_norm=1.0)
    ref = torch.optim.SGD(theirs, lr=0.1)
    for p, q, g in zip(ours, theirs, small_grads(0, device)):
        g[0] = float("inf")
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    ref.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), **TOL)


def test_grad_scaler_end_to_end(device, backend):
    """torch.amp.GradScaler drives the device path unchanged: an overflow is skipped, the
    scale backs off, and the run matches torch.optim.Adam under its own scaler."""
    torch.manual_seed(0)
    ours = torch.nn.Linear(6, 3).to(device)
    theirs = torch.nn.Linear(6, 3).to(device)
    theirs.load_state_dict(ours.state_dict())
    opt = fastopt.Adam(ours.parameters(), lr=1e-2, backend=backend)
    ref = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    scalers = [torch.amp.GradScaler(device.type, init_scale=2.0**10) for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        x = torch.randn(8, 6, generator=gen).to(device)
        if step == 2:
            x[0, 0] = float("inf")
        for model, o, scaler in zip((ours, theirs), (opt, ref), scalers):
            o.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            scaler.step(o)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, **TOL)
    assert int(opt.state_dict()["state"][0]["step"]) == 4


def test_bf16_state_resumes_bit_identically(device, backend, tmp_path):
    assert_bf16_state_resumes_bit_identically(backend, device, tmp_path)


def test_no_event_wait_while_a_graph_is_captured(monkeypatch):
    """The found_inf of the last eager step (warm-up before a CUDA-graph capture) is not
    waited for while a capture is under way (CUDA forbids it); it is settled afterwards."""
    params = [torch.zeros(3, requires_grad=True)]
    opt = fastopt.Adam(params, lr=0.1, backend="torch")
    waits = []

    class Event:  # stands in for the torch.cuda.Event of a step on a GPU
        def synchronize(self) -> None:
            waits.append(1)

    opt._skip_pending = (torch.zeros(1), Event(), [])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    opt._settle_skipped_step()
    assert waits == [] and opt._skip_pending is not None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    opt._settle_skipped_step()
    assert waits == [1] and opt._skip_pending is None


CAPTURABLE_TWINS = [
    fastopt.Adam,
    fastopt.AdamW,
    fastopt.NAdam,
    fastopt.RAdam,
    fastopt.Adamax,
    fastopt.RMSprop,
    fastopt.Adadelta,
]


@settings(max_examples=25 if HAS_CUDA else 12, deadline=None)
@given(
    flags=st.lists(st.integers(0, 1), min_size=1, max_size=7),
    cls=st.sampled_from(CAPTURABLE_TWINS),
    log2_scale=st.integers(0, 16),
    clip=st.sampled_from([None, 0.05, 10.0]),
    capturable=st.booleans(),
)
def test_random_scaler_sequences_match_the_host_path(flags, cls, log2_scale, clip, capturable):
    """Random sequences of skipped and taken steps, loss scales, clipping and capturable:
    the device path equals the torch backend, which reads everything on the host, the
    gradients left in p.grad included."""
    kw = dict(lr=1e-2, max_grad_norm=clip)
    for env, device, backend in _hook_targets():
        with env:
            ours, opt = _run(cls, backend, device, flags, 2.0**log2_scale, capturable=capturable, **kw)
        theirs, ref = _run(cls, "torch", device, flags, 2.0**log2_scale, **kw)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, **TOL)
            # the last step's gradient: unscaled (not clipped) by the kernel or apart, or as
            # it was if skipped; power-of-two scales make the unscaling exact on both sides
            assert torch.equal(p.grad, q.grad), backend
            # (a first step skipped on the host creates no state; on the device it creates zeros)
            assert float(opt.state[p]["step"]) == float(ref.state[q].get("step", 0)) == flags.count(0)


def _hook_targets():
    """(context, device, backend) of each device-hook backend that runs here (as the
    device_hooks fixture of tests/conftest.py, which hypothesis tests cannot take)."""
    if HAS_CUDA:
        return [
            (contextlib.nullcontext(), torch.device("cuda"), b)
            for b in ("triton", "cuda")
            if fastopt.backends.unavailable_reason(b) is None
        ]
    backends = ["cuda", "triton"] if HAS_TRITON else ["cuda"]
    return [(kernel_env("cpu", b), torch.device("cpu"), b) for b in backends]
