"""Run by tests/test_cuda_backend.py in a process with AddressSanitizer preloaded: the CUDA
C++ kernels, built for CPU emulation with ``--sanitize``, step tensors whose sizes end
inside and outside vector accesses and chunks, in every storage dtype, unaligned, with the
AMP hooks and the grad norm. Any access outside a tensor stops the process with ASan's
report; the results are checked against the torch backend as in the emulated tests.

Usage: python cuda_sanitized_worker.py PATH_OF_fastopt/_cuda_emulated*.so
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the tests' modules, and fastopt from this checkout

import test_triton_backend as shared  # noqa: E402

from fastopt.backends import cuda_backend  # noqa: E402
from fastopt.scalars import step_scalars  # noqa: E402

# ragged ends (1..3 past a multiple of 4), one element past a 16384-element chunk
SIZES = [1, 2, 3, 5, 6, 7, 4095, 16385, 16384 + 4 + 3]


def main(path: str) -> None:
    spec = importlib.util.spec_from_file_location("fastopt._cuda_emulated", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.EMULATED
    cuda_backend._ext = module
    cpu = torch.device("cpu")
    storages = [
        (torch.float32, torch.float32, False),
        (torch.bfloat16, torch.bfloat16, False),
        (torch.float16, torch.float32, False),
        (torch.float32, torch.bfloat16, False),
        (torch.bfloat16, torch.float32, True),
    ]
    for _, spec_, hyper, t0, _ in shared.SUBSET:
        for p_dtype, s_dtype, master in storages:
            shared.run_case(
                cuda_backend, spec_, hyper, SIZES, cpu, t0, p_dtype=p_dtype, s_dtype=s_dtype, master=master
            )
    # unaligned: every tensor a view one element into its own allocation
    _, spec_, hyper, t0, _ = shared.SUBSET[2]
    params = [torch.randn(n + 1)[1:] for n in SIZES]
    grads = [torch.randn(n + 1)[1:] for n in SIZES]
    state = {r: [torch.zeros(n + 1)[1:] for n in SIZES] for r in ("m", "v")}
    inv, found = torch.full((1,), 0.5), torch.zeros(1)
    cuda_backend.step(spec_, step_scalars(spec_, hyper, 1), params, grads, None, state,
                      grad_scale_ptr=inv, found_inf=found, unscale_grads=inv)  # fmt: skip
    # stochastically rounded bf16 state (the value tests round to nearest, to compare), with
    # host and with device scalars (the key then comes from the scalars tensor)
    for spec_ in (shared.SUBSET[2][1], shared.SUBSET[9][1]):
        for device_scalars in (False, True):
            sc = step_scalars(spec_, shared.SUBSET[2][2], 3)
            extra = {"scalars_tensor": cuda_backend._tables.scalars_tensor(sc, cpu)} if device_scalars else {}
            state = {r: [torch.zeros(n, dtype=torch.bfloat16) for n in SIZES] for r in spec_.state_roles}
            cuda_backend.step(spec_, sc, [torch.randn(n) for n in SIZES], [torch.randn(n) for n in SIZES], None,
                              state, stochastic_rounding=True, **extra)  # fmt: skip
    norm = cuda_backend.global_grad_norm(grads + [g.to(torch.bfloat16) for g in grads])
    assert norm.isfinite().all()
    print("sanitized emulation: clean")


if __name__ == "__main__":
    main(sys.argv[1])
