"""The CUDA C++ backend (fastopt._cuda) against the float64 torch backend.

The GPU cases run where the extension is built and a GPU is present (the GPU machine; see
bench/results/GPU_TESTS.md). Where no GPU is present the same cases run "emulated": the
kernel source built for the CPU (tests/cuda_emulation.py), on CPU tensors, with one spec
per compiled kernel instead of the whole family. Where nvcc is on PATH and no GPU build is
installed (CI), the module is built with nvcc for sm_90 from every csrc/*.cu, linked and
loaded, and its kernel table checked against the whole family, so that CI catches CUDA
code that no longer builds or links, and a rule left without a kernel. Tolerances as in
test_triton_backend.py (same kernels' arithmetic: fp32 math, rounding to the storage dtype).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from cuda_emulation import EMULATE, build_script, cuda_emulation, nvcc_build

from fastopt.scalars import step_scalars
from fastopt.spec import Accumulation, Extra, Momentum, Spec, family

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
BUILT = importlib.util.find_spec("fastopt._cuda") is not None


needs_gpu = pytest.mark.skipif(
    not (BUILT and HAS_CUDA), reason="needs fastopt._cuda and a CUDA GPU (runs on the GPU machine)"
)


@pytest.fixture(scope="module")
def cuda_module():
    """fastopt._cuda: the installed one, else built here for sm_90 beside the CPU torch (the
    module links no torch and loads without a GPU; only its launches need one), and handed
    to the backend for the duration."""
    from fastopt.backends import cuda_backend

    if BUILT:
        yield cuda_backend._module()
        return
    reason = build_script().why_not_built(need_cuda_torch=False)
    if reason is not None:
        pytest.skip(f"cannot build fastopt._cuda here: {reason}")
    (path,) = (nvcc_build("90") / "fastopt").glob("_cuda*.so")
    spec = importlib.util.spec_from_file_location("fastopt._cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_backend, "_ext", module)
        yield module


def test_every_cuda_source_is_compiled_in_ci(cuda_module):
    """Every csrc/*.cu is a source of fastopt._cuda, which ``cuda_module`` builds with nvcc
    for sm_90 where no GPU (and so no installed build) is present, as in CI: every .cu
    file is compiled, linked and loaded there, so none can rot unseen."""
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*.cu")}
    assert on_disk and on_disk <= set(build_script().CU_SOURCES), on_disk
    assert cuda_module.kernel_count() > 0


def test_every_spec_has_a_kernel(cuda_module):
    from fastopt.backends import cuda_backend as cb

    probe = step_scalars(Spec(), dict(lr=0.1), 1)
    codes = set(cuda_module.kernel_codes())
    for spec in family(include_orthogonal=True):
        for l2 in (0.0, 0.1):
            for use in (True, False) if spec.extra == Extra.RADAM else (spec.denominator != 0,):
                sw = cb.canonical_switches(spec, probe._replace(weight_decay=l2, use_denominator=use))
                sw["HAS_L2"] = 0  # L2 is a run-time flag of every kernel
                assert cb.switch_code(sw) in codes, spec.short()
                assert cuda_module.has_kernel(cb.switch_code(sw)), spec.short()
    assert len(codes) == cuda_module.kernel_count() < 256
    assert not cuda_module.has_kernel(max(codes) + 1)


def test_module_tables_match_the_rule(cuda_module):
    """The module's switch shifts name the rule's switches, its dtype codes the three
    param dtypes, and a launch that cannot run (no GPU, or a bad device) is a Python
    error naming the module, not a crash."""
    from fastopt import rule

    names = set(rule.switches(Spec(), step_scalars(Spec(), dict(lr=0.1), 1)))
    assert set(cuda_module.SWITCH_SHIFTS) == names
    shifts = sorted(cuda_module.SWITCH_SHIFTS.values())
    assert len(set(shifts)) == len(shifts)
    assert set(cuda_module.DTYPES) == {"float32", "bfloat16", "float16"}
    device = torch.cuda.device_count() + 7  # no such device, GPU machine or not
    with pytest.raises(RuntimeError, match="fastopt._cuda: "):
        cuda_module.step(cuda_module.kernel_codes()[0], device, 0, 0, 0, 0, 1, 2, [-1] * 7, [0, 0, 0],
                         True, 16384, [0.0] * 12, 0, 0, 0, 0, False, False, 0)  # fmt: skip


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernels(request):
    """(the backend, the device of its tensors): the compiled kernels on a GPU; where none is
    present, the same kernel source built for CPU emulation, on CPU tensors (how CI runs
    them: tests/cuda_emulation.py)."""
    from fastopt.backends import cuda_backend

    if request.param == "cuda":
        if not (BUILT and HAS_CUDA):
            pytest.skip("needs fastopt._cuda and a CUDA GPU (runs on the GPU machine)")
        yield cuda_backend, torch.device("cuda")
        return
    if not EMULATE:
        pytest.skip("emulated cases run where no GPU is present (CI)")
    with cuda_emulation():
        yield cuda_backend, torch.device("cpu")


@pytest.fixture
def shared():
    """The fp64-reference machinery of the Triton tests (same contract, same checks)."""
    pytest.importorskip("triton")
    import test_triton_backend

    return test_triton_backend


FAMILY = list(family())
# on a GPU, slices of about 50 specs: a run cut short at its time limit still reports most
# of the family (bench/gpu_session.sh); emulated, one spec per kernel in fewer, larger slices
SLICES = 64 if HAS_CUDA else 16


def _hyper(shared, spec: Spec) -> dict:
    return dict(shared.HYPER, nu=0.999 if spec.extra == Extra.RADAM else 0.99)


def _one_spec_per_kernel(cb, shared) -> list[Spec]:
    """The first spec of the family for each kernel it runs at t = 5 and 6 and each way the
    backend folds maximize and decoupled decay into the scalars."""
    first: dict[tuple, Spec] = {}
    for spec in FAMILY:
        hyper = _hyper(shared, spec)
        codes = [cb.switch_code(cb.canonical_switches(spec, step_scalars(spec, hyper, t))) for t in (5, 6)]
        first.setdefault((*codes, spec.maximize, spec.weight_decay), spec)
    return list(first.values())


@pytest.mark.parametrize("part", range(SLICES))
def test_whole_family_matches_torch_backend(kernels, shared, part):
    """Every spec on a GPU (emulated: one spec per kernel), two steps from a warm state
    (t = 5, 6), fp32 (decoupled decay and maximize: the storage and AMP tests)."""
    cb, device = kernels
    specs = FAMILY if device.type == "cuda" else _one_spec_per_kernel(cb, shared)
    failures = []
    for spec in specs[part::SLICES]:
        try:
            shared.run_case(cb, spec, _hyper(shared, spec), shared.CUDA_SIZES, device, t0=5)
        except AssertionError as exc:
            failures.append(f"{spec.short()}: {str(exc).splitlines()[0]}")
    assert not failures, f"{len(failures)} specs differ:\n" + "\n".join(failures[:20])


def test_every_kernel_is_run_emulated(shared):
    """The emulated family test above runs every compiled kernel (L2 decay is a run-time
    flag of every kernel, taken by the L2 specs under the tests' weight_decay): a kernel
    that no spec of the family reaches would be dead code."""
    if not EMULATE:
        pytest.skip("emulated cases run where no GPU is present (CI)")
    with cuda_emulation() as module:
        from fastopt.backends import cuda_backend as cb

        run = set()
        for spec in _one_spec_per_kernel(cb, shared):
            hyper = _hyper(shared, spec)
            for t in (5, 6):
                run.add(
                    cb.switch_code(cb.canonical_switches(spec, step_scalars(spec, hyper, t)))
                    & ~(1 << module.SWITCH_SHIFTS["HAS_L2"])
                )
        assert run == set(module.kernel_codes())


@pytest.mark.parametrize("storage", [(torch.bfloat16, torch.bfloat16, False), (torch.float16, torch.float32, False),
                                     (torch.float32, torch.bfloat16, False), (torch.bfloat16, torch.float32, True),
                                     (torch.float16, torch.bfloat16, True)])  # fmt: skip
@pytest.mark.parametrize("which", [2, 4, 9, 12])  # adam, adamw+maximize, adadelta, l1-scaled
def test_storage_dtypes(kernels, shared, storage, which):
    cb, device = kernels
    _, spec, hyper, t0, _ = shared.SUBSET[which]
    p_dtype, s_dtype, master = storage
    shared.run_case(
        cb,
        spec,
        hyper,
        shared.CUDA_SIZES,
        device,
        t0,
        p_dtype=p_dtype,
        s_dtype=s_dtype,
        master=master,
    )


def test_amp_hooks_and_device_scalars(kernels, shared):
    cb, dev = kernels
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_unscale_grads_writes_the_unscaled_gradients_back(kernels, shared, dtype):
    """The Triton backend's test of the same hook, on this backend."""
    cb, device = kernels
    shared.test_unscale_grads_writes_the_unscaled_gradients_back(cb, device, dtype)


def test_stochastic_rounding_is_unbiased(kernels):
    cb, dev = kernels
    spec = Spec(momentum=Momentum.CLASSICAL, momentum_accumulation=Accumulation.SUM)
    n, x = 1 << 16, 1.0 + 0.25 * 2**-7
    m = [torch.zeros(n, dtype=torch.bfloat16, device=dev)]
    cb.step(spec, step_scalars(spec, dict(lr=1e-3, mu=0.5), 1), [torch.randn(n, device=dev)],
            [torch.full((n,), x, device=dev)], None, {"m": m}, stochastic_rounding=True)  # fmt: skip
    assert set(m[0].float().unique().tolist()) <= {1.0, 1.0 + 2**-7}
    assert abs(m[0].double().mean().item() - x) < 5 * 2**-7 * math.sqrt(0.25 * 0.75 / n)


def test_rounding_seed(kernels, shared):
    """The Triton tests' checks of the rounding seed (tests/test_triton_backend.py), on this
    backend: the same seeds round the same, a resumed run as the uninterrupted one, another
    seed otherwise, a capturable launch as an eager one with its seed; bad seeds refused."""
    cb, dev = kernels
    shared._check_same_seed_same_bits(cb, dev)
    shared._check_resumed_run_same_bits(cb, dev)
    shared._check_other_seed_other_bits(cb, dev)
    shared._check_scalars_tensor_seed_rounds_as_eager(cb, dev)
    shared._check_bad_seeds(cb, dev)


def test_global_grad_norm(kernels):
    cb, dev = kernels
    gen = torch.Generator(device=dev).manual_seed(0)
    grads = [torch.randn(n, device=dev, generator=gen) for n in (0, 1, 5, 70001, 1 << 20)]
    grads.append(torch.randn(300, device=dev, generator=gen).to(torch.bfloat16))
    expected = torch.linalg.vector_norm(torch.cat([g.double() for g in grads]))
    for _ in range(2):
        torch.testing.assert_close(cb.global_grad_norm(grads).double()[0], expected, rtol=1e-5, atol=0)


def test_a_failed_call_leaves_no_error_for_the_next_launch(kernels):
    """The CUDA runtime keeps a failed call's error as the thread's last error until read:
    a step refused for a bad device must not make the next good step or norm report it."""
    cb, dev = kernels
    ext = cb._module()
    bad = max(torch.cuda.device_count(), 1) + 7
    for _ in range(2):
        with pytest.raises(RuntimeError, match="fastopt._cuda: "):
            ext.step(ext.kernel_codes()[0], bad, 0, 0, 0, 0, 1, 2, [-1] * 7, [0, 0, 0],
                     True, 16384, [0.0] * 12, 0, 0, 0, 0, False, False, 0)  # fmt: skip
        p, g = torch.ones(3, device=dev), torch.full((3,), 2.0, device=dev)
        cb.step(Spec(), step_scalars(Spec(), dict(lr=0.5), 1), [p], [g], None, {})
        assert p.eq(0).all()
        torch.testing.assert_close(cb.global_grad_norm([g])[0], torch.tensor(12.0, device=dev).sqrt())


@pytest.mark.gpu
@needs_gpu
def test_tensor_over_2_31_elements():
    from fastopt.backends import cuda_backend as cb

    n = 2**31 + 3000
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g[-1000:] = 2.0
    cb.step(Spec(), step_scalars(Spec(), dict(lr=0.5), 1), [p], [g], None, {})
    assert p[: 2**20].eq(0.5).all() and p[-3000:-1000].eq(0.5).all() and p[-1000:].eq(0.0).all()
    del p, g
    torch.cuda.empty_cache()
