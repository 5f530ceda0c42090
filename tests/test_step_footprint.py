"""What a step leaves behind on the host: no per-param garbage, no gradients kept.

Python's garbage collector runs a young-generation collection every few hundred container
objects allocated, and objects alive during two of them are promoted to the oldest
generation, whose growth triggers full collections over every object in the process. A
step that built a list of one tuple per param (the params' shapes, say) paid for that
with a full collection every few steps: a third of the step time at 10,000 params. The
first tests count the collections that steps over many small params set off: none may
come from work done per param.

The last ones check that the optimizer lets go of the gradients after a step: with
``zero_grad(set_to_none=True)`` torch.optim frees them before the next forward pass, and
a fused optimizer that kept them would hold one gradient's worth of memory more.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch

import fastopt

# enough params that one tracked object per param in a step would set off several
# collections per step (the young-generation threshold is 700 by default)
N_PARAMS = 4 * max(gc.get_threshold()[0], 100)
STEPS = 4


def _collections_per_step(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], n: int) -> float:
    params = [torch.zeros(8, requires_grad=True) for _ in range(n)]
    for p in params:
        p.grad = torch.full((8,), 0.5)
    opt = make(params)
    opt.step()  # state, plans and pointer tables are made here, once
    opt.step()
    started = [0]

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] += 1

    gc.collect()
    gc.callbacks.append(count)
    try:
        for _ in range(STEPS):
            for p in params:  # new gradient objects every step, as after zero_grad()
                p.grad = torch.full((8,), 0.5)
            opt.step()
    finally:
        gc.callbacks.remove(count)
    return started[0] / STEPS


def _collections_of_the_steps(make) -> float:
    """Collections per step over N_PARAMS params beyond those over a few params (making
    the new gradients allocates one tensor object per param: that is counted in both)."""
    many = _collections_per_step(make, N_PARAMS)
    params_alone = _collections_per_step(lambda ps: _NoStep(ps), N_PARAMS)
    return many - params_alone


class _NoStep:
    """Counts what refreshing the gradients alone sets off."""

    def __init__(self, params):
        self.params = params

    def step(self) -> None:
        pass


CPP_CASES = {
    "Adam": lambda ps: fastopt.Adam(ps, backend="cpp"),
    "AdamW amsgrad": lambda ps: fastopt.AdamW(ps, backend="cpp", amsgrad=True),
    "NAdam": lambda ps: fastopt.NAdam(ps, backend="cpp"),
    "SGD nesterov": lambda ps: fastopt.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, backend="cpp"),
    "RMSprop centered": lambda ps: fastopt.RMSprop(ps, centered=True, momentum=0.9, backend="cpp"),
    "Adam bf16 state": lambda ps: fastopt.Adam(ps, backend="cpp", state_dtype=torch.bfloat16),
    "Adam max_grad_norm": lambda ps: fastopt.Adam(ps, backend="cpp", max_grad_norm=1.0),
}


@pytest.mark.parametrize("case", sorted(CPP_CASES))
def test_cpp_step_makes_no_per_param_garbage(case):
    if fastopt.available_backends()["cpp"] is not None:
        pytest.skip(fastopt.available_backends()["cpp"])
    assert _collections_of_the_steps(CPP_CASES[case]) <= 0.5, case


def test_triton_host_path_makes_no_per_param_garbage(monkeypatch):
    """The GPU path's host work (plan, gradient checks, pointer table, launch arguments),
    with the kernel launch itself replaced by nothing: a step on the GPU runs this code."""
    pytest.importorskip("triton")
    from fastopt.backends import triton_backend as tb
    from fastopt.backends import triton_kernels as K

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tb, "_interpreted", lambda: False)
    monkeypatch.setattr(tb, "unavailable_reason", lambda: None)
    monkeypatch.setattr(tb, "_device_ok", lambda device: None)
    monkeypatch.setattr(K, "step_kernel", NoLaunch())
    tb.clear_cache()
    try:
        extra = _collections_of_the_steps(lambda ps: fastopt.Adam(ps, backend="triton"))
    finally:
        tb.clear_cache()  # the tables were built with the GPU launch configuration
    assert extra <= 0.5


def _backends_here() -> list[str]:
    ready = fastopt.available_backends()
    return [b for b in ("cpp", "torch") if ready[b] is None]


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_gradients_are_freed_after_the_step(backend, max_grad_norm):
    params = [torch.zeros(5, requires_grad=True), torch.zeros(3, 2, requires_grad=True)]
    opt = fastopt.Adam(params, backend=backend, max_grad_norm=max_grad_norm)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        held = [weakref.ref(p.grad) for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(ref() is None for ref in held)


def test_gradients_are_freed_after_a_refused_step():
    """A step refused by the validation of a later group keeps no earlier group's grads."""
    good, bad = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = fastopt.SGD([{"params": [good]}, {"params": [bad]}], lr=0.1, backend="torch")
    good.grad = torch.ones(4)
    bad.grad = torch.ones(4)
    bad.grad.data = torch.ones(6)  # bypasses the .grad setter's size check
    held = weakref.ref(good.grad)
    with pytest.raises(RuntimeError, match="does not match its parameter"):
        opt.step()
    assert torch.equal(good, torch.zeros(4))  # nothing stepped
    good.grad = None
    assert held() is None


def test_gradients_are_freed_after_a_triton_step(triton_device):
    params = [torch.zeros(70, device=triton_device, requires_grad=True)]
    opt = fastopt.Adam(params, backend="triton")
    params[0].grad = torch.ones_like(params[0])
    held = weakref.ref(params[0].grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert held() is None
