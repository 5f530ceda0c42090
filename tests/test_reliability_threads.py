"""Concurrency: optimizers stepping in threads give what they give one after another.

Two models, each with its own optimizer, step at the same time in two Python threads
(torch and the C++ extension release the GIL, so the steps really overlap; the C++
backend's thread pool, the launch-plan caches and Triton's pointer-table cache are shared
by both). The results must be bit-identical to running the two trainings serially.
"""

from __future__ import annotations

import threading

import pytest
import torch
from test_reliability_hostile import TARGETS, kernel_env

import fastopt

STEPS = 15


def _env(device: str, backend: str):
    return kernel_env(device, backend)


def _setup(seed: int, device: str, backend: str):
    small = device == "cpu" and backend in ("triton", "cuda")  # interpreted or emulated kernels
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 33), (500,), (7,)] if small else [(512, 700), (40001,), (7,)]
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(STEPS)]
    # different rules on the two sides, so that shared caches see different keys too
    if seed % 2:
        opt = fastopt.Adam(params, lr=1e-2, amsgrad=True, backend=backend, max_grad_norm=1.0)
    else:
        opt = fastopt.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, backend=backend)
    return params, grads, opt


def _train(params, grads, opt, barrier=None):
    for step_grads in grads:
        if barrier is not None:
            barrier.wait()  # both threads step at the same moment, every step
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("device,backend", TARGETS, ids=[f"{d}-{b}" for d, b in TARGETS])
def test_two_optimizers_in_two_threads_equal_serial(device, backend):
    if device == "cpu" and backend == "triton":
        # the interpreter swaps triton.language's functions for its own while a kernel
        # runs, process-wide: two kernels at once break each other. Compiled kernels have
        # no such state; they run this test on the GPU machine.
        pytest.skip("Triton's CPU interpreter is not thread-safe")
    with _env(device, backend):
        serial = [_setup(seed, device, backend) for seed in (1, 2)]
        for run in serial:
            _train(*run)
        parallel = [_setup(seed, device, backend) for seed in (1, 2)]
        barrier = threading.Barrier(2, timeout=120)
        errors = []

        def work(run):
            try:
                _train(*run, barrier=barrier)
            except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=work, args=(run,)) for run in parallel]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for (ps, _, opt_s), (pp, _, opt_p) in zip(serial, parallel):
            for a, b in zip(ps, pp):
                assert torch.equal(a, b)
            for a, b in zip(ps, pp):
                for key, value in opt_s.state[a].items():
                    assert torch.equal(value, opt_p.state[b][key]), key
