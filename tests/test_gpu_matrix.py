"""The optimizer table and the property tests on the GPU backends (Triton and CUDA C++).

The same checks as tests/test_torch_parity.py (every torch twin and option combination
against torch.optim) and tests/test_properties.py (random specs of the whole family against
the NumPy reference), in fp32, the GPU kernels' precision. On a GPU machine: every
combination, on both backends, on CUDA tensors. Without a GPU (CI): the Triton kernels
under Triton's interpreter and the CUDA C++ kernels built for CPU emulation
(tests/cuda_emulation.py), on CPU tensors, on a spread of the table and a few random specs
(the interpreter runs each program in NumPy, about a thousand times slower).

Tolerances are those of the CPU backends' fp32 tests, whose comments justify them: the
kernels compute in fp32 like the foreach path, with fused multiply-adds rounding once where
torch rounds twice, which is within the same few ulps per operation.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from cuda_emulation import EMULATE
from helpers import max_rel_err, run_backend_vs_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_db import case_id, matrix
from test_properties import hyper, shapes, specs
from test_torch_parity import run_pair

from fastopt import backends

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
CASES = matrix()

if HAS_CUDA:
    TARGETS = [("cuda", b) for b in ("triton", "cuda") if backends.unavailable_reason(b) is None]
    EXAMPLES, STEPS = 200, 50
else:
    TARGETS = [("cpu", "triton")] if HAS_TRITON else []
    TARGETS += [("cpu", "cuda")] if EMULATE else []
    EXAMPLES, STEPS = 12, 20


def _table(device: str, backend: str) -> list:
    """Every combination, but every other one under Triton's interpreter (emulated CUDA C++
    kernels run at compiled C++ speed)."""
    return CASES[::2] if (device, backend) == ("cpu", "triton") else CASES


TABLE = [(info, kw, target) for target in TARGETS for info, kw in _table(*target)]


def _env(device: str, backend: str):
    from test_reliability_hostile import kernel_env

    return kernel_env(device, backend)


@pytest.mark.skipif(not TARGETS, reason="no GPU backend can run here")
@pytest.mark.parametrize("info,kw,target", TABLE, ids=[f"{case_id(i, k)}-{t[0]}-{t[1]}" for i, k, t in TABLE])
def test_float32_matches_torch(info, kw, target):
    device, backend = target
    with _env(device, backend):
        p0, ours, theirs, opt_ours, _ = run_pair(info, kw, backend, torch.float32, STEPS, device=device)
    assert all(g["params"] for g in opt_ours.param_groups)
    for start, a, b in zip(p0, ours, theirs):
        moved = (b - start).abs().max().item()
        assert (a - b).abs().max().item() <= 2e-5 * max(moved, 1.0)


@pytest.mark.skipif(not TARGETS, reason="no GPU backend can run here")
@settings(max_examples=EXAMPLES)
@given(data=st.data(), shape_list=shapes, steps=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_random_spec_float32_gpu_backends(data, shape_list, steps, seed):
    spec = data.draw(specs())
    h = data.draw(hyper(spec))
    h["eps"] = max(h["eps"], 1e-4)  # as in test_properties: 1/vbar bounded
    for device, backend in TARGETS:
        with _env(device, backend):
            ours, ref = run_backend_vs_reference(
                spec, h, shape_list, steps, backend, dtype=torch.float32, seed=seed, device=device
            )
        moved = max((float(np.max(np.abs(r))) if r.size else 0.0) for r in ref)
        assert max_rel_err(ours, ref) < 1e-4 * max(1.0, moved), (backend, spec.short(), h)
