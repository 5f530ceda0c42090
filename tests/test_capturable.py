"""capturable=True: the step count and the step's scalars on the device (CUDA graphs).

A capturable group keeps 'step' on the device, advances it there, and computes the step's
scalars from it with fastopt.device_scalars, so that a step captured in a CUDA graph
replays with the right bias corrections, schedules and rounding seeds. Where no GPU is
present these run Triton's interpreter on CPU tensors (the same code path, without the
graph); the graph-replay cases run on a GPU.

Tolerance: fp32 storage over a few steps; the capturable and the eager runs differ only in
how the float64 scalars were computed (a few float64 ulps), and both differ from the
torch backend by the kernels' fused multiply-adds: 2e-5 relative (tests/test_triton_backend.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA, KERNEL_TOL, small_grads, small_params

import fastopt
from fastopt import presets
from fastopt.spec import Accumulation, Denominator, Momentum, Schedule, Spec

TOL = KERNEL_TOL


@pytest.fixture
def device(device_hooks):
    """CUDA, or the CPU under Triton's interpreter or the CUDA C++ emulation (tests/conftest.py)."""
    return device_hooks[0]


@pytest.fixture
def backend(device_hooks):
    """triton or cuda: the backend stepped on ``device``."""
    return device_hooks[1]


# (id, constructor, options): torch twins and family members whose scalars depend on t in
# the ways the family has (bias correction, NAdam's product, RAdam's switch at t = 6,
# Adagrad's lr decay, the increasing schedule, true means, SGD's undamped first step);
# tests/test_device_scalars.py checks every spec's scalars at far more step numbers
CASES = [
    ("adam", fastopt.Adam, dict(lr=1e-2)),
    ("adamw-amsgrad", fastopt.AdamW, dict(lr=1e-2, amsgrad=True)),
    ("nadam", fastopt.NAdam, dict(lr=1e-2)),
    ("radam", fastopt.RAdam, dict(lr=1e-2, weight_decay=0.1)),
    ("adamax", fastopt.Adamax, dict(lr=1e-2)),
    ("rmsprop-centered", fastopt.RMSprop, dict(lr=1e-3, momentum=0.9, centered=True)),
    ("adadelta", fastopt.Adadelta, dict(lr=0.5)),
    ("nadam_dozat", presets.PRESETS["nadam_dozat"], dict(lr=1e-2)),
    ("adam_linf", presets.PRESETS["adam_linf"], dict(lr=1e-2)),
    ("adagrad-lr-decay", presets.PRESETS["adagrad"].spec, dict(lr=1e-2, lr_decay=0.1, eps=1e-10)),
    (
        "nesterov-increasing-true-mean",
        Spec(
            momentum=Momentum.NESTEROV,
            mu_schedule=Schedule.INCREASING,
            denominator=Denominator.MEAN,
            nu_schedule=Schedule.TRUE_MEAN,
        ),
        dict(lr=1e-2, mu=0.99, mu_max=0.995),
    ),
    (
        "sgd-sum-dampening",  # the first step's buffer is the undamped gradient
        Spec(momentum=Momentum.CLASSICAL, momentum_accumulation=Accumulation.SUM),
        dict(lr=1e-2, mu=0.9, dampening=0.3, weight_decay=0.01),
    ),
]


def _make(case, params, **kw):
    _, ctor, options = case
    if isinstance(ctor, presets.Preset):
        return fastopt.FusedOptimizer(params, spec=ctor.spec, **{**ctor.defaults, **options, **kw})
    if isinstance(ctor, Spec):
        return fastopt.FusedOptimizer(params, spec=ctor, **options, **kw)
    return ctor(params, **options, **kw)


def _run(case, device, steps, flags=None, **kw):
    params = small_params(device)
    opt = _make(case, params, **kw)
    for step in range(steps):
        for p, g in zip(params, small_grads(step, device)):
            p.grad = g
        if flags is not None:
            opt.found_inf = torch.full((1,), float(flags[step]), device=device)
        opt.step()
        if flags is not None:
            del opt.found_inf
    return params, opt


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_capturable_equals_eager(device, backend, case):
    """7 steps (RAdam rectifies from the 6th), the 3rd and 4th skipped by found_inf: the
    capturable run equals the torch backend's, which skips on the host."""
    flags = [0, 0, 1, 1, 0, 0, 0]
    ours, opt = _run(case, device, 7, flags, backend=backend, capturable=True)
    theirs, ref = _run(case, device, 7, flags, backend="torch")
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **TOL)
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key].cpu().double(), value.cpu().double(), **TOL)
    assert all(float(opt.state[p]["step"]) == 5 for p in ours)


def test_tensor_lr_is_read_on_the_device(device, backend):
    """A device tensor lr changed in place between steps (as a captured graph would see it)
    steps like a float lr changed by hand."""
    lr = torch.tensor(1e-2, device=device)
    ours, theirs = small_params(device), small_params(device)
    opt = fastopt.Adam(ours, lr=lr, backend=backend, capturable=True)
    ref = fastopt.Adam(theirs, lr=1e-2, backend="torch")
    for step in range(4):
        for params in (ours, theirs):
            for p, g in zip(params, small_grads(step, device)):
                p.grad = g
        opt.step()
        ref.step()
        lr.mul_(0.5)
        ref.param_groups[0]["lr"] *= 0.5
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **TOL)


def test_checkpoint_moves_between_capturable_and_eager(device, backend):
    """A capturable run's state_dict continues in an eager optimizer (and back) as if
    nothing had changed; the NAdam product and step counts carry over."""
    case = CASES[2]  # NAdam: state carried from step to step on the device
    full, _ = _run(case, device, 6, backend=backend, capturable=True)
    params, opt = _run(case, device, 3, backend=backend, capturable=True)
    eager = _make(case, params, backend=backend)
    eager.load_state_dict(opt.state_dict())
    for step in range(3, 5):
        for p, g in zip(params, small_grads(step, device)):
            p.grad = g
        eager.step()
    again = _make(case, params, backend=backend, capturable=True)
    again.load_state_dict(eager.state_dict())
    for p, g in zip(params, small_grads(5, device)):
        p.grad = g
    again.step()
    for p, q in zip(full, params):
        torch.testing.assert_close(p, q, **TOL)
    assert all(float(again.state[p]["step"]) == 6 for p in params)


def test_capturable_needs_a_device_backend():
    """On the CPU backends there is nothing to capture: a clear error, nothing stepped."""
    params = [torch.ones(3, requires_grad=True)]
    params[0].grad = torch.ones(3)
    opt = fastopt.Adam(params, lr=0.1, backend="torch", capturable=True)
    with pytest.raises(ValueError, match="capturable=True needs the triton or cuda backend"):
        opt.step()
    assert torch.equal(params[0].detach(), torch.ones(3))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=["adam", "nadam", "radam"])
def test_cuda_graph_replays_the_step(backend, case):
    """A step captured in a CUDA graph, replayed with new gradients and a found_inf that
    skips one replay, equals the eager steps (bias corrections advance on the device)."""
    if fastopt.backends.unavailable_reason(backend) is not None:
        pytest.skip(f"{backend}: {fastopt.backends.unavailable_reason(backend)}")
    device = torch.device("cuda")
    flags = [0, 0, 0, 1, 0, 0, 0, 0]
    ours = small_params(device)
    opt = _make(case, ours, backend=backend, capturable=True)
    found_inf = torch.zeros(1, device=device)
    static = [torch.zeros_like(p) for p in ours]
    for p, g in zip(ours, static):
        p.grad = g
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up steps: plans, state, compiled kernels
        for step in range(2):
            torch._foreach_copy_(static, small_grads(step, device))
            opt.found_inf = found_inf
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.found_inf = found_inf
        opt.step()
    for step in range(2, 8):
        torch._foreach_copy_(static, small_grads(step, device))
        found_inf.fill_(flags[step])
        graph.replay()
    torch.cuda.synchronize()
    theirs, _ = _run(case, device, 8, flags, backend="torch")
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **TOL)
    assert all(float(opt.state[p]["step"]) == 7 for p in ours)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_after_its_buffers_leave_the_cache(backend):
    """What a captured step reads besides the params and the state (the pointer tables, the
    grad norm's partial sums and completion counter) belongs to the graph: replays after
    the table cache is cleared, an eager grad norm larger than any before has run, and the
    freed memory has been handed out again and filled with junk equal the eager steps."""
    if fastopt.backends.unavailable_reason(backend) is not None:
        pytest.skip(f"{backend}: {fastopt.backends.unavailable_reason(backend)}")
    from fastopt.backends import triton_backend

    device = torch.device("cuda")
    ours = small_params(device)
    opt = fastopt.Adam(ours, lr=1e-2, max_grad_norm=0.5, backend=backend, capturable=True)
    static = [torch.zeros_like(p) for p in ours]
    for p, g in zip(ours, static):
        p.grad = g
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up steps: plans, state, tables, compiled kernels
        for step in range(2):
            torch._foreach_copy_(static, small_grads(step, device))
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    triton_backend.clear_cache()
    with torch.cuda.stream(stream):  # where the warm-up's tables were allocated
        big = [torch.randn(2**24 + 7, device=device)]  # more chunks than the shared norm buffers held
        fastopt.backends.get(backend).global_grad_norm(big)
        junk = [torch.full((n,), -(2**40), dtype=torch.int64, device=device) for n in range(1, 4096, 3)]
    torch.cuda.current_stream().wait_stream(stream)
    for step in range(2, 7):
        torch._foreach_copy_(static, small_grads(step, device))
        graph.replay()
    torch.cuda.synchronize()
    del junk, big
    theirs = small_params(device)
    ref = fastopt.Adam(theirs, lr=1e-2, max_grad_norm=0.5, backend="torch")
    for step in range(7):
        for p, g in zip(theirs, small_grads(step, device)):
            p.grad = g
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_capturable_steps_do_not_synchronize(backend):
    """Eager capturable steps, as a GradScaler drives them (a scale, found_inf set on some),
    with a device lr and beta1 changed before each (OneCycleLR's cycle_momentum), make no
    implicit host synchronization once the plan is made: torch's sync debug mode raises on
    any (a device value read to the host, a blocking copy). Their values equal the torch
    backend's, which skips on the host."""
    if fastopt.backends.unavailable_reason(backend) is not None:
        pytest.skip(f"{backend}: {fastopt.backends.unavailable_reason(backend)}")
    device = torch.device("cuda")
    flags = [0, 0, 1, 0, 1, 1, 0, 0]
    grads = [small_grads(step, device, 64.0) for step in range(len(flags))]  # made before: copies
    scale = torch.full((1,), 64.0, device=device)
    found = [torch.full((1,), float(f), device=device) for f in flags]
    results = []
    for name in (backend, "torch"):
        params = small_params(device)
        lr = torch.tensor(1e-2, device=device) if name == backend else 1e-2
        kw = dict(capturable=True) if name == backend else {}
        opt = fastopt.NAdam(params, lr=lr, backend=name, **kw)
        for step in range(len(flags)):
            opt.param_groups[0]["betas"] = (0.9 - 0.02 * step, 0.999)
            for p, g in zip(params, grads[step]):
                p.grad = g.clone()
            opt.grad_scale, opt.found_inf = scale, found[step]
            checked = name == backend and step >= 2  # the plan, state and tables are made by then
            torch.cuda.set_sync_debug_mode("error" if checked else "default")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            del opt.grad_scale, opt.found_inf
        results.append(params)
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, **TOL)
