"""The CUDA C++ backend (fastopt._cuda) against the float64 torch backend.

The GPU cases run where the extension is built and a GPU is present (the GPU machine; see
bench/results/GPU_TESTS.md); the compile-only check of csrc/*.cu runs wherever nvcc is on
PATH, GPU or not, so that CI catches CUDA code that no longer builds. Tolerances as in
test_triton_backend.py (same kernels' arithmetic: fp32 math, rounding to the storage dtype).
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastopt.scalars import step_scalars
from fastopt.spec import Accumulation, Extra, Momentum, Spec, family

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
BUILT = importlib.util.find_spec("fastopt._cuda") is not None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile():
    """Every csrc/*.cu compiles (nvcc, sm_90, compile only): .ci/compile_cuda.sh."""
    done = subprocess.run(
        ["bash", str(ROOT / ".ci" / "compile_cuda.sh")], capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for cu in sorted((ROOT / "csrc").glob("*.cu")):
        assert f"compiled: csrc/{cu.name}" in done.stdout


def test_compile_script_fails_on_broken_code(tmp_path):
    """The script's exit status reports a failure (a stand-in nvcc that fails)."""
    fake = tmp_path / "nvcc"
    fake.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo fake; exit 0; fi\necho broken >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    done = subprocess.run(
        ["bash", str(ROOT / ".ci" / "compile_cuda.sh")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "NVCC": str(fake), "JOBS": "2"},
    )
    assert done.returncode != 0
    assert "FAILED: " in done.stderr and "broken" in done.stderr


needs_ext = pytest.mark.skipif(
    not BUILT, reason="fastopt._cuda is not built (build_cuda.py needs nvcc and CUDA torch)"
)
needs_gpu = pytest.mark.skipif(
    not (BUILT and HAS_CUDA), reason="needs fastopt._cuda and a CUDA GPU (runs on the GPU machine)"
)


@needs_ext
def test_every_spec_has_a_kernel():
    from fastopt.backends import cuda_backend as cb

    probe = step_scalars(Spec(), dict(lr=0.1), 1)
    codes = set(cb._module().kernel_codes())
    for spec in family(include_orthogonal=True):
        for l2 in (0.0, 0.1):
            for use in (True, False) if spec.extra == Extra.RADAM else (spec.denominator != 0,):
                sw = cb.canonical_switches(spec, probe._replace(weight_decay=l2, use_denominator=use))
                sw["HAS_L2"] = 0  # L2 is a run-time flag of every kernel
                assert cb.switch_code(sw) in codes, spec.short()
    assert len(codes) == cb._module().kernel_count() < 256


@pytest.fixture
def cb():
    from fastopt.backends import cuda_backend

    return cuda_backend


@pytest.fixture
def shared():
    """The fp64-reference machinery of the Triton tests (same contract, same checks)."""
    pytest.importorskip("triton")
    import test_triton_backend

    return test_triton_backend


FAMILY = list(family())
SLICES = 16


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("part", range(SLICES))
def test_whole_family_matches_torch_backend(cb, shared, part):
    """Every spec, two steps from a warm state (t = 5, 6), fp32 (decoupled decay and maximize:
    the storage and AMP tests)."""
    failures = []
    for spec in FAMILY[part::SLICES]:
        hyper = dict(shared.HYPER, nu=0.999 if spec.extra == Extra.RADAM else 0.99)
        try:
            shared.run_case(cb, spec, hyper, shared.CUDA_SIZES, torch.device("cuda"), t0=5)
        except AssertionError as exc:
            failures.append(f"{spec.short()}: {str(exc).splitlines()[0]}")
    assert not failures, f"{len(failures)} specs differ:\n" + "\n".join(failures[:20])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("storage", [(torch.bfloat16, torch.bfloat16, False), (torch.float16, torch.float32, False),
                                     (torch.float32, torch.bfloat16, False), (torch.bfloat16, torch.float32, True),
                                     (torch.float16, torch.bfloat16, True)])  # fmt: skip
@pytest.mark.parametrize("which", [2, 4, 9, 12])  # adam, adamw+maximize, adadelta, l1-scaled
def test_storage_dtypes(cb, shared, storage, which):
    _, spec, hyper, t0, _ = shared.SUBSET[which]
    p_dtype, s_dtype, master = storage
    shared.run_case(
        cb,
        spec,
        hyper,
        shared.CUDA_SIZES,
        torch.device("cuda"),
        t0,
        p_dtype=p_dtype,
        s_dtype=s_dtype,
        master=master,
    )


@pytest.mark.gpu
@needs_gpu
def test_amp_hooks_and_device_scalars(cb, shared):
    dev = torch.device("cuda")
    spec, hyper = shared.SUBSET[8][1], shared.SUBSET[8][2]  # RAdam: unrectified at 5, rectified at 6
    case = shared.Case(spec, hyper, shared.CUDA_SIZES, dev, t0=5)
    before = [p.clone() for p in case.params]
    grads = [torch.full((n,), float("nan"), device=dev) for n in shared.CUDA_SIZES]
    cb.step(spec, step_scalars(spec, hyper, 5), case.params, grads, None, case.state,
            found_inf=torch.ones(1, device=dev))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(case.params, before, strict=True))
    inv = torch.full((1,), 0.5, device=dev)
    for t in (5, 6):
        sc = step_scalars(spec, hyper, t)
        case.step(cb, sc, grad_scale_ptr=inv, found_inf=torch.zeros(1, device=dev),
                  scalars_tensor=cb._tables.scalars_tensor(sc, dev))  # fmt: skip
        case.check(f"t={t}")


@pytest.mark.gpu
@needs_gpu
def test_stochastic_rounding_is_unbiased(cb):
    spec = Spec(momentum=Momentum.CLASSICAL, momentum_accumulation=Accumulation.SUM)
    n, x = 1 << 16, 1.0 + 0.25 * 2**-7
    m = [torch.zeros(n, dtype=torch.bfloat16, device="cuda")]
    cb.step(spec, step_scalars(spec, dict(lr=1e-3, mu=0.5), 1), [torch.randn(n, device="cuda")],
            [torch.full((n,), x, device="cuda")], None, {"m": m}, stochastic_rounding=True)  # fmt: skip
    assert set(m[0].float().unique().tolist()) <= {1.0, 1.0 + 2**-7}
    assert abs(m[0].double().mean().item() - x) < 5 * 2**-7 * math.sqrt(0.25 * 0.75 / n)


@pytest.mark.gpu
@needs_gpu
def test_global_grad_norm(cb):
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(n, device="cuda", generator=gen) for n in (0, 1, 5, 70001, 1 << 20)]
    grads.append(torch.randn(300, device="cuda", generator=gen).to(torch.bfloat16))
    expected = torch.linalg.vector_norm(torch.cat([g.double() for g in grads]))
    for _ in range(2):
        torch.testing.assert_close(cb.global_grad_norm(grads).double()[0], expected, rtol=1e-5, atol=0)


@pytest.mark.gpu
@needs_gpu
def test_tensor_over_2_31_elements(cb):
    n = 2**31 + 3000
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g[-1000:] = 2.0
    cb.step(Spec(), step_scalars(Spec(), dict(lr=0.5), 1), [p], [g], None, {})
    assert p[: 2**20].eq(0.5).all() and p[-3000:-1000].eq(0.5).all() and p[-1000:].eq(0.0).all()
    del p, g
    torch.cuda.empty_cache()
