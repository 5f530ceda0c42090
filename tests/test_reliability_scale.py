"""Scale: 100,000 tiny tensors in one group, and one tensor of more than 2^31 elements.

Both are checked against a chunked reference. Every rule is elementwise, so the reference
can step the concatenation of all params (or one chunk of a huge one) as a single array.
The 2^31-element test needs ~9 GB of memory and 4 minutes per backend on 2 busy CPU cores:
it is marked slow and runs with ``-m slow`` (or FASTOPT_RUN_SLOW=1).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_reliability_hostile import TARGETS, _dtype, kernel_env

import fastopt
from fastopt import presets
from fastopt.backends import torch_backend
from fastopt.reference import Reference

HYPER = dict(lr=1e-2, mu=0.9, nu=0.999, eps=1e-8, weight_decay=0.01)


def _env(device: str, backend: str):
    return kernel_env(device, backend)


@pytest.mark.parametrize("device,backend", TARGETS, ids=[f"{d}-{b}" for d, b in TARGETS])
def test_a_hundred_thousand_tiny_tensors_in_one_group(device, backend):
    # the interpreter runs one program at a time in Python: fewer tensors, same code path
    count = 5_000 if device == "cpu" and backend == "triton" else 100_000
    dtype = _dtype(device, backend)
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 5, count)  # 0 to 4 elements, empty ones included
    total = int(sizes.sum())
    # torch's _foreach ops cost ~5 us per tensor and op on the CPU, ~15 s a step here: one
    # step for the torch backend, two (the state's second use) for the fused ones
    steps = 1 if (device, backend) == ("cpu", "torch") else 2
    p0, grads = rng.standard_normal(total), [rng.standard_normal(total) for _ in range(steps)]
    bounds = [int(b) for b in np.cumsum(sizes)[:-1]]
    flat = torch.tensor(p0, dtype=dtype)
    # separate allocations (not views of one buffer), as a model's params are
    params = [t.clone().to(device).requires_grad_() for t in torch.tensor_split(flat, bounds)]
    spec = presets.spec("adamw")
    ref = Reference(spec, HYPER, [flat.double().numpy()])
    with _env(device, backend):
        opt = fastopt.FusedOptimizer(params, spec=spec, backend=backend, **HYPER)
        for g in grads:
            g_t = torch.tensor(g, dtype=dtype)
            for p, piece in zip(params, torch.tensor_split(g_t, bounds)):
                p.grad = piece.to(device)
            opt.step()
            ref.step([g_t.double().numpy()])
    ours = torch.cat([p.detach().reshape(-1).cpu() for p in params]).double().numpy()
    # two fp32 steps: a few ulps of fp32 relative to |p| + lr; fp64: rounding only
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(ours, ref.params[0], rtol=rtol, atol=rtol * HYPER["lr"])


def test_torch_backend_batches_change_no_bit(monkeypatch):
    """The torch backend steps a bounded number of elements at a time, slicing bigger
    tensors: slices and batches must give exactly what one whole step gives."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3000,), (7, 300), (5,), (0,), (40, 60)]

    def run():
        params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        params[1] = params[1].detach().t().contiguous().t().requires_grad_()  # strided: kept whole
        opt = fastopt.Adam(params, lr=0.1, amsgrad=True, backend="torch")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach() for p in params]

    gen.manual_seed(0)
    whole = run()
    monkeypatch.setattr(torch_backend, "_CPU_BATCH_BYTES", 256 * 4)  # 256 fp32 elements
    gen.manual_seed(0)
    sliced = run()
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)


# ---- more than 2^31 elements ----------------------------------------------------------------

N_HUGE = 2**31 + 3 * 2**20 + 7  # past int32 indexing, with a ragged tail
CHUNK = 2**26


def _pattern(start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Param and gradient values of elements start..end: small integers (exact in bf16),
    different at every index mod 17 * 13, so a misplaced element shows."""
    i = torch.arange(start, end, device=device)
    return (i % 17 - 8).to(torch.bfloat16), (2 * ((i * 7) % 13) - 12).to(torch.bfloat16)


def _run_slow(request) -> bool:
    return "slow" in (request.config.getoption("markexpr") or "") or os.environ.get("FASTOPT_RUN_SLOW") == "1"


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", TARGETS, ids=[f"{d}-{b}" for d, b in TARGETS])
def test_a_tensor_of_more_than_2_31_elements(device, backend, request):
    """Plain SGD with lr 0.5 on bf16 values that make every result exact (p - g/2 of small
    integers): the stepped tensor must equal the pattern's reference exactly everywhere,
    the elements past index 2^31 included."""
    if not _run_slow(request):
        pytest.skip("minutes and ~9 GB: run with -m slow")
    if device == "cpu" and backend == "triton":
        pytest.skip("the interpreter runs 2^31 elements in Python for hours")
    dev = torch.device(device)
    p = torch.empty(N_HUGE, dtype=torch.bfloat16, device=dev)
    g = torch.empty_like(p)
    for a in range(0, N_HUGE, CHUNK):
        b = min(a + CHUNK, N_HUGE)
        p[a:b], g[a:b] = _pattern(a, b, dev)
    p.requires_grad_()
    p.grad = g
    opt = fastopt.SGD([p], lr=0.5, backend=backend)
    opt.step()
    del g
    p.grad = None
    for a in range(0, N_HUGE, CHUNK):  # the chunked reference
        b = min(a + CHUNK, N_HUGE)
        p0, g0 = _pattern(a, b, dev)
        want = (p0.double() - 0.5 * g0.double()).to(torch.bfloat16)
        assert torch.equal(p.detach()[a:b], want), f"elements {a}..{b} differ"
