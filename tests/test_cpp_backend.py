"""The C++ CPU backend (fastopt._C) against the torch backend, the reference and itself.

These tests never skip: CI builds the extension, so an unavailable backend is a failure
(the ``cpp`` fixture reports why it could not be imported).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import max_rel_err, run_backend_vs_reference

import fastopt
from fastopt import backends, presets
from fastopt import spec as spec_module
from fastopt.backends import torch_backend
from fastopt.rule import switches
from fastopt.scalars import StepScalars, step_scalars
from fastopt.spec import Curvature, Denominator, Momentum, MomentumInput, Spec, WeightDecay, family

FAMILY = list(family())
# the orthogonal switches of every spec: decoupled decay, maximize, both
ORTHOGONAL = [
    s.replace(weight_decay=wd, maximize=mx)
    for s in FAMILY
    for wd, mx in ((WeightDecay.DECOUPLED, False), (WeightDecay.L2, True), (WeightDecay.DECOUPLED, True))
]
HYPER = dict(
    lr=0.01, mu=0.9, nu=0.99, eps=1e-3, weight_decay=0.1, dampening=0.1, mu_max=0.95, nu_max=0.995,
    lr_decay=0.01, momentum_decay=0.1,
)  # fmt: skip
ADAM = presets.spec("adam")


@pytest.fixture(scope="module")
def cpp():
    reason = backends.unavailable_reason("cpp")
    if reason is not None:
        pytest.fail(f"the C++ backend must be built for these tests: {reason}")
    return backends.get("cpp")


@pytest.fixture(scope="module")
def ext(cpp):
    from fastopt import _C

    return _C


# ---- building cases ---------------------------------------------------------------------


def make_group(spec, sizes, dtype=torch.float64, state_dtype=None, master=False, seed=0):
    """Params and a plausible nonzero state: accumulators of squares positive, gavg small
    enough that the centered variance stays positive."""
    gen = torch.Generator().manual_seed(seed)
    state_dtype = state_dtype or dtype

    def randn(n, scale=1.0):
        return torch.randn(n, generator=gen, dtype=torch.float64) * scale

    params = [randn(n).to(dtype) for n in sizes]
    state = {}
    for role in spec.state_roles:
        if role in ("v", "vmax", "u"):
            ts = [(0.5 + torch.rand(n, generator=gen, dtype=torch.float64)) for n in sizes]
        else:
            ts = [randn(n, 0.1) for n in sizes]
        state[role] = [t.to(state_dtype) for t in ts]
    if master:
        masters = [randn(n) for n in sizes]
        state["master"] = [m.float() for m in masters]
        params = [m.to(dtype) for m in masters]
    return params, state


def make_grads(spec, sizes, dtype, step, seed=0):
    gen = torch.Generator().manual_seed(1000 * seed + step)
    grads = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes]
    hvps = None
    if spec.curvature == Curvature.HVP:
        hvps = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes]
    return grads, hvps


def clone_group(params, state):
    return [p.clone() for p in params], {k: [t.clone() for t in v] for k, v in state.items()}


def all_tensors(params, state):
    return list(params) + [t for role in sorted(state) for t in state[role]]


def assert_bitwise_equal(a_tensors, b_tensors, what):
    for i, (a, b) in enumerate(zip(a_tensors, b_tensors)):
        same = torch.equal(a, b) or (a.isnan().any() and torch.equal(a.isnan(), b.isnan()))
        if same and a.isnan().any():
            same = torch.equal(a[~a.isnan()], b[~b.isnan()])
        assert same, f"{what}: tensor {i} differs"


# ---- the two sides agree on every code ----------------------------------------------------


def test_enums_match_python(ext):
    for name, kind in spec_module._FIELD_TYPES.items():
        if kind is bool:
            continue
        assert ext.ENUMS[kind.__name__] == {m.name: int(m.value) for m in kind}, name
    assert set(ext.ENUMS) == {k.__name__ for k in spec_module._FIELD_TYPES.values() if k is not bool}


def test_switch_and_scalar_layout_match_python(ext):
    assert set(ext.SWITCH_SHIFTS) == set(switches(ADAM, step_scalars(ADAM, HYPER, 1)))
    assert ext.SCALAR_FIELDS == StepScalars._fields
    assert ext.ROLES == ("p", "g", "h", "m", "v", "vmax", "gavg", "u", "master")
    assert ext.DTYPES == {"float32": 0, "float64": 1, "bfloat16": 2, "float16": 3}


def test_every_spec_and_dtype_has_a_kernel(cpp, ext):
    """supports() is None for the whole family (orthogonal switches included)."""
    assert ext.kernel_count() > 300
    for spec in FAMILY + ORTHOGONAL:
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            assert cpp.supports(spec, torch.device("cpu"), dtype) is None, (spec.short(), dtype)


def test_supports_gives_reasons(cpp):
    assert "CPU" in cpp.supports(ADAM, torch.device("cuda"), torch.float32)
    assert cpp.supports(ADAM, torch.device("cpu"), torch.int32) is not None


# ---- (a) the whole family in float64 -----------------------------------------------------

SIZES = [3, 0, 5, 1]


def _family_vs_torch(cpp, specs, steps=3):
    """Both backends from the same nonzero state; per tensor |a - b| <= 1e-12 (|b| + max|b|).

    float64 rounding of ~20 ops is ~1e-15 relative; torch's CPU sqrt is not correctly
    rounded (about 1 ulp), which stays far below 1e-12 after three steps."""
    failures = []
    for spec in specs:
        ours, state = make_group(spec, SIZES)
        theirs, their_state = clone_group(ours, state)
        for t in range(1, steps + 1):
            grads, hvps = make_grads(spec, SIZES, torch.float64, t)
            scalars = step_scalars(spec, HYPER, t)
            cpp.step(spec, scalars, ours, grads, hvps, state)
            torch_backend.step(spec, scalars, theirs, grads, hvps, their_state)
        for a, b in zip(all_tensors(ours, state), all_tensors(theirs, their_state)):
            if b.numel() == 0:
                continue
            bound = 1e-12 * (b.abs() + b.abs().max())
            if not bool(((a - b).abs() <= bound).all()):
                failures.append(spec.short())
                break
    return failures


@pytest.mark.parametrize("momentum", list(Momentum))
@pytest.mark.parametrize("denominator", list(Denominator))
def test_every_spec_matches_torch_backend_float64(cpp, momentum, denominator):
    specs = [s for s in FAMILY if s.momentum == momentum and s.denominator == denominator]
    assert specs
    failures = _family_vs_torch(cpp, specs)
    assert not failures, failures[:10]


def test_orthogonal_switches_and_grad_scale_match_torch_backend(cpp):
    """Decoupled decay, maximize and a gradient scale (folded into scalars in C++)."""
    specs = [
        s for s in family(include_orthogonal=True) if s.weight_decay == WeightDecay.DECOUPLED or s.maximize
    ][::5]
    failures = _family_vs_torch(cpp, specs)
    assert not failures, failures[:10]
    spec = presets.spec("adamw").replace(maximize=True)
    ours, state = make_group(spec, SIZES)
    theirs, their_state = clone_group(ours, state)
    grads, _ = make_grads(spec, SIZES, torch.float64, 1)
    scalars = step_scalars(spec, HYPER, 1)._replace(grad_scale=0.37)
    cpp.step(spec, scalars, ours, grads, None, state)
    torch_backend.step(spec, scalars, theirs, grads, None, their_state)
    for a, b in zip(all_tensors(ours, state), all_tensors(theirs, their_state)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_spread_of_family_matches_reference(cpp):
    """Through the optimizer layer against the NumPy reference (the definition of correct)."""
    failures = []
    for spec in FAMILY[::23]:
        ours, ref = run_backend_vs_reference(spec, HYPER, [(3,), (2, 2), (0,), (1,)], steps=4, backend="cpp")
        if not max_rel_err(ours, ref) < 1e-10:
            failures.append(spec.short())
    assert not failures, failures[:10]


# ---- (b) dtypes ----------------------------------------------------------------------------

# (param dtype, state dtype, master weights)
DTYPE_CASES = [
    (torch.float32, torch.float32, False),
    (torch.float32, torch.bfloat16, False),
    (torch.bfloat16, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, False),
    (torch.float16, torch.float16, False),
    (torch.float16, torch.float32, False),
    (torch.bfloat16, torch.float32, True),
    (torch.float16, torch.float32, True),
    (torch.bfloat16, torch.bfloat16, True),
]
DTYPE_SPECS = sorted({presets.spec(n) for n in presets.PRESETS} | set(FAMILY[::97]), key=Spec.short)


def half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of dtype at |x| (float64): the storage rounding error."""
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    min_exp = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}[dtype]
    _, exp = torch.frexp(x.abs())
    return torch.ldexp(torch.full_like(x, 0.5), (exp - 1).clamp(min=min_exp) - mantissa_bits)


def check_one_rounding(ours, ref64, old, dtype, what, extra=0.0):
    """ours = storage rounding of the fp32-math result; ref64 = the float64 result.

    Allowed: half an ulp of the storage dtype (the one rounding per step) plus the fp32 math
    error. That error is ~20 ops of at most 2^-24 relative each, but cancellations (grad +
    wd * p, mu m + (1 - mu) g, p - step) amplify it relative to the result, so it is bounded
    by 1e-5 of the magnitudes involved: the new value, the old one and the change. For
    bf16/fp16 storage the ulp term (2^-9, 2^-12 relative) dominates and the check is sharp.
    ``extra``: an absolute allowance where the rule itself amplifies the fp32 error."""
    if ours.numel() == 0:
        return
    o = ours.double()
    old = old.double()
    ulp = torch.maximum(half_ulp(ref64, dtype), half_ulp(o, dtype))
    bound = ulp + 1e-5 * (ref64.abs() + old.abs() + (ref64 - old).abs()) + extra
    finite = ref64.isfinite()
    bad = ((o - ref64).abs() > bound) & finite
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} elements off, worst {float(((o - ref64).abs() - bound)[bad].max()):.3g}"
    )
    assert torch.equal(o.isfinite(), finite), f"{what}: inf/nan positions differ"


@pytest.mark.parametrize("param_dtype,state_dtype,master", DTYPE_CASES, ids=str)
def test_dtypes_round_once_per_step(cpp, param_dtype, state_dtype, master):
    sizes = [7, 0, 64, 1, 1000]
    for spec in DTYPE_SPECS:
        params, state = make_group(spec, sizes, param_dtype, state_dtype, master)
        for t in range(1, 4):
            grads, hvps = make_grads(spec, sizes, param_dtype, t)
            scalars = step_scalars(spec, HYPER, t)
            # the float64 computation from the same stored values
            ref_params = [(m if master else p).double() for p, m in zip(params, state.get("master", params))]
            ref_state = {k: [x.double() for x in v] for k, v in state.items() if k != "master"}
            h64 = None if hvps is None else [h.double() for h in hvps]
            old_params = [p.clone() for p in ref_params]
            old_state = {k: [x.clone() for x in v] for k, v in ref_state.items()}
            torch_backend.step(spec, scalars, ref_params, [g.double() for g in grads], h64, ref_state)
            # rounded to nearest: the stochastic rounding of bf16 state has its own tests
            # (tests/test_stochastic_rounding.py)
            cpp.step(spec, scalars, params, grads, hvps, state, stochastic_rounding=False)
            what = f"{spec.short()} step {t}"
            stepped = state["master"] if master else params
            p_dtype = torch.float32 if master else param_dtype
            for i, (o, r, old) in enumerate(zip(stepped, ref_params, old_params)):
                check_one_rounding(o, r, old, p_dtype, f"{what} param {i}")
            for role, ts in ref_state.items():
                for i, (o, r, old) in enumerate(zip(state[role], ts, old_state[role])):
                    extra = 0.0
                    if role == "m" and spec.momentum_input == MomentumInput.PRECONDITIONED:
                        # momentum of g / (vbar(g) + eps): its slope in g is up to 1 / eps, which
                        # multiplies the fp32 rounding of g + wd p (2^-23 of its terms) where
                        # they cancel
                        g_terms = grads[i].double().abs() + HYPER["weight_decay"] * old_params[i].abs()
                        extra = 2.0**-23 * g_terms / HYPER["eps"]
                    check_one_rounding(o, r, old, state_dtype, f"{what} {role} {i}", extra)
            if master:  # the param is the master rounded, exactly
                for p, m in zip(params, state["master"]):
                    assert torch.equal(p, m.to(param_dtype)), what


def test_fp64_params_reject_other_state_dtypes(cpp):
    params, state = make_group(ADAM, [4], torch.float64)
    state["m"] = [state["m"][0].float()]
    grads, _ = make_grads(ADAM, [4], torch.float64, 1)
    with pytest.raises(ValueError, match="fp64"):
        cpp.step(ADAM, step_scalars(ADAM, HYPER, 1), params, grads, None, state)


def test_mismatched_sizes_and_missing_roles_raise(cpp):
    params, state = make_group(ADAM, [4, 5], torch.float32)
    grads, _ = make_grads(ADAM, [4, 5], torch.float32, 1)
    bad = {"m": state["m"], "v": [state["v"][0], torch.zeros(4)]}
    with pytest.raises(ValueError, match="size"):
        cpp.step(ADAM, step_scalars(ADAM, HYPER, 1), params, grads, None, bad)
    with pytest.raises(KeyError):
        cpp.step(ADAM, step_scalars(ADAM, HYPER, 1), params, grads, None, {"m": state["m"]})


# ---- storage conversions -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widening_is_exact_for_every_bit_pattern(ext, dtype):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    src = bits.view(dtype)
    out = torch.empty(src.numel(), dtype=torch.float32)
    ext.to_float(ext.DTYPES[str(dtype)[6:]], src.data_ptr(), out.data_ptr(), src.numel())
    expected = src.float()
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int32), expected[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_matches_torch(ext, dtype):
    """Round to nearest even like torch: a spread of all 2^32 patterns, ties and edges."""
    spread = torch.arange(0, 2**32, 4093, dtype=torch.int64)
    specials = [0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e-8, 2.0**-24, 2.0**-25, 3 * 2.0**-26]
    specials += [float("inf"), -float("inf"), 6.1e-5, 3.4e38, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]
    # exact ties between neighbours of the target dtype, both parities
    width = 16 if dtype == torch.bfloat16 else 13
    ties = torch.arange(0x3F800000, 0x3F800000 + (64 << width), 1 << width, dtype=torch.int64) + (
        1 << (width - 1)
    )
    x = torch.cat([(spread - 2**31).to(torch.int32).view(torch.float32), torch.tensor(specials)])
    x = torch.cat([x, ties.to(torch.int32).view(torch.float32), -x])
    out = torch.empty(x.numel(), dtype=dtype)
    ext.from_float(ext.DTYPES[str(dtype)[6:]], x.data_ptr(), out.data_ptr(), x.numel())
    expected = x.to(dtype)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


# ---- (c) chunking: one call equals one call per tensor -----------------------------------

CHUNK_CASES = [
    (ADAM, torch.float32, None, False),
    (ADAM, torch.float32, torch.bfloat16, False),
    (presets.spec("adadelta"), torch.float64, None, False),
    (presets.spec("egd"), torch.float16, torch.float32, False),
    (presets.spec("adamax"), torch.bfloat16, torch.float32, True),
]


def _chunk_sizes(ext):
    c = ext.CHUNK
    return [0, 1, c - 1, c, c + 1, 0, 513, 2 * c + 3, 7, 3]


@pytest.mark.parametrize(
    "spec,dtype,state_dtype,master",
    CHUNK_CASES,
    ids=["adam-fp32", "adam-bf16-state", "adadelta-fp64", "egd-fp16-fp32-state", "adamax-bf16-master"],
)
def test_one_call_equals_one_call_per_tensor(cpp, ext, spec, dtype, state_dtype, master):
    sizes = _chunk_sizes(ext)
    together, state = make_group(spec, sizes, dtype, state_dtype, master)
    alone, alone_state = clone_group(together, state)
    for t in (1, 2):
        grads, hvps = make_grads(spec, sizes, dtype, t)
        scalars = step_scalars(spec, HYPER, t)
        # rounded to nearest: stochastic rounding draws its bits by the tensor's place in
        # the call, on purpose
        cpp.step(spec, scalars, together, grads, hvps, state, stochastic_rounding=False)
        for i in range(len(sizes)):
            cpp.step(
                spec,
                scalars,
                [alone[i]],
                [grads[i]],
                None if hvps is None else [hvps[i]],
                {k: [v[i]] for k, v in alone_state.items()},
                stochastic_rounding=False,
            )
    assert_bitwise_equal(all_tensors(together, state), all_tensors(alone, alone_state), spec.short())


def test_five_thousand_tiny_tensors_in_one_call(cpp):
    gen = torch.Generator().manual_seed(5)
    sizes = torch.randint(0, 20, (5000,), generator=gen).tolist()
    for spec, dtype, state_dtype in [
        (ADAM, torch.float32, None),
        (presets.spec("rmsprop"), torch.bfloat16, None),
    ]:
        together, state = make_group(spec, sizes, dtype, state_dtype)
        alone, alone_state = clone_group(together, state)
        grads, hvps = make_grads(spec, sizes, dtype, 1)
        scalars = step_scalars(spec, HYPER, 1)
        cpp.step(spec, scalars, together, grads, hvps, state)
        for i in range(len(sizes)):
            cpp.step(spec, scalars, [alone[i]], [grads[i]], None, {k: [v[i]] for k, v in alone_state.items()})
        assert_bitwise_equal(all_tensors(together, state), all_tensors(alone, alone_state), spec.short())


# ---- (c') the unscaled gradients written back in the step (AMP) ---------------------------

# not a power of two: the product is rounded, so the rounding is checked too
UNSCALE = 1.0 / 3.0


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize(
    "spec,dtype,state_dtype,master",
    CHUNK_CASES,
    ids=["adam-fp32", "adam-bf16-state", "adadelta-fp64", "egd-fp16-fp32-state", "adamax-bf16-master"],
)
def test_unscaled_gradients_are_written_back_in_the_step(
    cpp, ext, monkeypatch, threads, spec, dtype, state_dtype, master
):
    """With ``unscale_grads`` each gradient is left times the factor, rounded as torch's
    in-place multiply rounds it, and the step is the step without it, bit for bit (each
    piece's gradient is read before it is written), across chunks, the 4096-element pieces
    of the write-back and thread counts."""
    monkeypatch.setenv("FASTOPT_NUM_THREADS", threads)
    sizes = _chunk_sizes(ext) + [3 * 4096 + 5]
    fused, state = make_group(spec, sizes, dtype, state_dtype, master)
    apart, apart_state = clone_group(fused, state)
    grads, hvps = make_grads(spec, sizes, dtype, 1)
    expected = [g.clone().mul_(UNSCALE) for g in grads]
    scalars = step_scalars(spec, HYPER, 1)._replace(grad_scale=UNSCALE)
    cpp.step(spec, scalars, apart, [g.clone() for g in grads], hvps, apart_state, seed=7)
    cpp.step(spec, scalars, fused, grads, hvps, state, unscale_grads=UNSCALE, seed=7)
    assert_bitwise_equal(all_tensors(fused, state), all_tensors(apart, apart_state), spec.short())
    assert_bitwise_equal(grads, expected, "unscaled gradients")


def test_unscaled_gradients_reach_non_contiguous_gradients(cpp):
    param = torch.randn(6, 5)
    grad = torch.randn(5, 6).t()  # a transposed view: stepped through a contiguous copy
    expected = grad.clone().mul_(UNSCALE)
    state = {r: [torch.rand(6, 5) + 0.5] for r in ADAM.state_roles}
    cpp.step(ADAM, step_scalars(ADAM, HYPER, 1), [param], [grad], None, state, unscale_grads=UNSCALE)
    assert not grad.is_contiguous()
    assert torch.equal(grad, expected)


# ---- (d) determinism ----------------------------------------------------------------------


def _run_once(cpp, spec, dtype, state_dtype, sizes):
    """Two steps; bf16 state stochastically rounded with seeds fixed per step."""
    params, state = make_group(spec, sizes, dtype, state_dtype)
    for t in (1, 2):
        grads, hvps = make_grads(spec, sizes, dtype, t)
        cpp.step(spec, step_scalars(spec, HYPER, t), params, grads, hvps, state, seed=100 + t)
    return all_tensors(params, state)


@pytest.mark.parametrize(
    "spec,dtype,state_dtype",
    [
        (ADAM, torch.float32, None),
        (ADAM, torch.float32, torch.bfloat16),
        (presets.spec("nadam"), torch.float64, None),
    ],
    ids=["adam-fp32", "adam-bf16-state", "nadam-fp64"],
)
def test_bit_identical_across_thread_counts(cpp, ext, monkeypatch, spec, dtype, state_dtype):
    sizes = [5 * ext.CHUNK + 17, 3, ext.CHUNK // 2, 2 * ext.CHUNK]
    results = {}
    for threads in (1, 2, 3, 8):
        monkeypatch.setenv("FASTOPT_NUM_THREADS", str(threads))
        results[threads] = _run_once(cpp, spec, dtype, state_dtype, sizes)
    for threads, tensors in results.items():
        assert_bitwise_equal(tensors, results[1], f"{threads} threads")


def test_master_weights_round_bf16_state_as_fp32_params_do(cpp, ext):
    """bf16 state is rounded in registers for fp32 params, and through fp32 buffers for bf16
    params with fp32 master weights (run_blocks in csrc/cpu_step.cpp). Stepping the same
    values, both draw the same random bits: the same rounded state, and masters equal to
    the fp32 params."""
    spec = presets.spec("amsgrad")  # m, v, vmax: both halves of one hash, and a second hash
    sizes = [ext.CHUNK + 700, 5, 3 * 512 + 1]  # over a chunk's end, a tail, over blocks
    params, state = make_group(spec, sizes, torch.float32, torch.bfloat16)
    with_master = {r: [x.clone() for x in v] for r, v in state.items()}
    with_master["master"] = [p.clone() for p in params]
    low = [p.bfloat16() for p in params]
    for t in (1, 2):
        grads = [g.bfloat16() for g in make_grads(spec, sizes, torch.float32, t)[0]]  # fp32 exactly too
        scalars = step_scalars(spec, HYPER, t)
        cpp.step(spec, scalars, params, [g.float() for g in grads], None, state, seed=40 + t)
        cpp.step(spec, scalars, low, grads, None, with_master, seed=40 + t)
    for role in state:
        assert_bitwise_equal(state[role], with_master[role], role)
    assert_bitwise_equal(params, with_master["master"], "master")


@pytest.mark.parametrize("value", ["two", "0", "-3"])
def test_bad_thread_count_is_named(cpp, monkeypatch, value):
    monkeypatch.setenv("FASTOPT_NUM_THREADS", value)
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.ones(4)
    with pytest.raises(ValueError, match="FASTOPT_NUM_THREADS must be a positive integer"):
        fastopt.Adam([p], lr=0.1, backend="cpp").step()


def test_bit_identical_across_threading_backends(cpp, ext, monkeypatch):
    """OpenMP (shared with torch) and fastopt's own pool give the same bits."""
    monkeypatch.setenv("FASTOPT_NUM_THREADS", "2")
    sizes = [3 * ext.CHUNK + 5, 11]
    original = ext.threading()
    try:
        results = {}
        for name in ("openmp", "pool"):
            if ext.set_threading(name):
                results[name] = _run_once(cpp, ADAM, torch.float32, torch.bfloat16, sizes)
        assert "pool" in results
        for name, tensors in results.items():
            assert_bitwise_equal(tensors, results["pool"], name)
    finally:
        ext.set_threading(original)
    assert not ext.set_threading("no-such-threading")


def test_bit_identical_across_instruction_sets(cpp, ext):
    """Every ISA build this CPU runs (scalar tails, vector widths) gives the same bits."""
    sizes = [ext.CHUNK + 37, 5, 1]
    cases = [(ADAM, torch.float32, None), (ADAM, torch.float32, torch.bfloat16)]
    cases += [
        (presets.spec("adamax"), torch.float16, None),
        (presets.spec("rmsprop_centered"), torch.float64, None),
    ]
    original = ext.isa()
    try:
        for spec, dtype, state_dtype in cases:
            results = {}
            for isa in ext.available_isas():
                assert ext.set_isa(isa)
                results[isa] = _run_once(cpp, spec, dtype, state_dtype, sizes)
            for isa, tensors in results.items():
                assert_bitwise_equal(tensors, results[original], f"{spec.short()} on {isa}")
    finally:
        ext.set_isa(original)
    assert not ext.set_isa("no-such-isa")


def test_every_kernel_on_every_instruction_set(cpp, ext):
    """Each instruction-set build has a kernel table of its own, split over several objects
    (setup.py's KERNEL_SHARDS): every switch code the family reaches (RAdam's from t = 6 on
    too), in float64, float32 and float32 with bf16 state, steps to the same bits on every
    build this CPU runs. (The default build is checked against the torch backend above; a
    table entry that points at another code's kernel, or another shard's, differs here.)"""
    from fastopt.backends import cpp_backend

    cases = {}  # one (spec, t) per packed switch code
    for spec in FAMILY:
        for t in (1, 7):
            cases.setdefault(cpp_backend._pack(spec, step_scalars(spec, HYPER, t)), (spec, t))
    assert len(cases) > 200
    original = ext.isa()
    results: dict[str, list[torch.Tensor]] = {}
    try:
        for isa in ext.available_isas():
            assert ext.set_isa(isa)
            results[isa] = []
            for spec, t in cases.values():
                for dtype, state_dtype in (
                    (torch.float64, None),
                    (torch.float32, None),
                    (torch.float32, torch.bfloat16),
                ):
                    params, state = make_group(spec, [3], dtype, state_dtype)
                    grads, hvps = make_grads(spec, [3], dtype, t)
                    cpp.step(spec, step_scalars(spec, HYPER, t), params, grads, hvps, state, seed=7)
                    results[isa] += all_tensors(params, state)
    finally:
        ext.set_isa(original)
    for isa, tensors in results.items():
        assert_bitwise_equal(tensors, results[original], f"kernels of {isa}")


# ---- the sum of squares of gradient clipping -------------------------------------------------


def _sum_of_squares(ext, tensors: list[torch.Tensor], threads: int = 0) -> float:
    from fastopt.backends.cpp_backend import _DTYPE_CODES

    code = _DTYPE_CODES[tensors[0].dtype]
    return ext.sum_of_squares(code, [t.numel() for t in tensors], [t.data_ptr() for t in tensors], threads)


def _exact_sum_of_squares(tensors: list[torch.Tensor]) -> float:
    # squares of fp32/bf16/fp16 values are exact in float64 (at most 48 significant bits);
    # fsum adds them with one rounding
    return math.fsum(float(x) ** 2 for t in tensors for x in t.double().flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sum_of_squares_matches_an_exact_sum(ext, dtype):
    torch.manual_seed(3)
    sizes = [2 * ext.CHUNK + 333, 0, 7, ext.CHUNK - 1, 1, 5000]
    tensors = [(torch.randn(n) * 10.0 ** torch.randint(-3, 3, (1,))).to(dtype) for n in sizes]
    ours = _sum_of_squares(ext, tensors)
    exact = _exact_sum_of_squares(tensors)
    # chunked sums of at most CHUNK / 8 = 4096 positive terms in float64: a relative error
    # below 4096 * 2**-53 (about 5e-13) in each, and fewer than 100 chunk sums on top
    assert ours == pytest.approx(exact, rel=1e-12)


def test_sum_of_squares_is_independent_of_threads_and_handles_edges(ext):
    torch.manual_seed(4)
    tensors = [torch.randn(n) for n in (3 * ext.CHUNK + 5, 11, ext.CHUNK)]
    one = _sum_of_squares(ext, tensors, threads=1)
    assert all(_sum_of_squares(ext, tensors, threads=k) == one for k in (2, 3, 8))
    assert _sum_of_squares(ext, [torch.zeros(0)]) == 0.0
    assert ext.sum_of_squares(0, [], [], 1) == 0.0
    with_inf = [torch.ones(10), torch.tensor([float("inf")])]
    assert _sum_of_squares(ext, with_inf) == float("inf")
    assert math.isnan(_sum_of_squares(ext, [torch.tensor([1.0, float("nan")])]))
    with pytest.raises(ValueError, match="dtype"):
        ext.sum_of_squares(9, [1], [tensors[1].data_ptr()], 1)
    with pytest.raises(ValueError, match="one pointer per tensor"):
        ext.sum_of_squares(0, [1, 1], [tensors[1].data_ptr()], 1)


def test_clipping_sums_through_the_extension(cpp, monkeypatch):
    """max_grad_norm on CPU gradients takes the extension's one call (not torch's per-tensor
    norms), on contiguous ones of each dtype, and falls back for the others."""
    from fastopt import distributed
    from fastopt.backends import cpp_backend

    calls = []
    original = cpp_backend.sum_of_squares

    def counted(tensors):
        result = original(tensors)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(cpp_backend, "sum_of_squares", counted)
    grads = [torch.randn(100), torch.randn(3, 4), torch.randn(7, dtype=torch.float64)]
    expected = math.sqrt(_exact_sum_of_squares(grads))
    assert distributed.grad_norm(grads) == pytest.approx(expected, rel=1e-12)
    assert calls == [True, True]  # one call per dtype
    calls.clear()
    strided = [torch.randn(6, 4)[:, ::2], torch.randn(5)]
    assert distributed.grad_norm(strided) == pytest.approx(
        math.sqrt(_exact_sum_of_squares(strided)), rel=1e-6
    )
    assert calls == [False]


# ---- layouts, NaN, and the optimizer layer --------------------------------------------------


def test_non_contiguous_tensors_step_through_copies(cpp):
    base = torch.randn(6, 5, dtype=torch.float64)
    spec = ADAM
    params = [base.clone().t(), torch.randn(4, dtype=torch.float64)]  # a transposed view
    state = {r: [torch.rand_like(p) + 0.5 for p in params] for r in spec.state_roles}
    grads = [torch.randn_like(p) for p in params]
    contiguous = [p.contiguous() for p in params]
    cont_state = {k: [t.contiguous() for t in v] for k, v in state.items()}
    scalars = step_scalars(spec, HYPER, 1)
    cpp.step(spec, scalars, params, grads, None, state)
    cpp.step(spec, scalars, contiguous, [g.contiguous() for g in grads], None, cont_state)
    assert not params[0].is_contiguous()
    assert_bitwise_equal(all_tensors(params, state), all_tensors(contiguous, cont_state), "layout")


def test_nan_propagates_like_torch(cpp):
    for name in ("adam", "adamax", "amsgrad", "adagrad_linf"):
        spec = presets.spec(name)
        ours, state = make_group(spec, [8])
        theirs, their_state = clone_group(ours, state)
        grads, _ = make_grads(spec, [8], torch.float64, 1)
        grads[0][2] = float("nan")
        grads[0][5] = float("inf")
        scalars = step_scalars(spec, HYPER, 1)
        cpp.step(spec, scalars, ours, grads, None, state)
        torch_backend.step(spec, scalars, theirs, grads, None, their_state)
        for a, b in zip(all_tensors(ours, state), all_tensors(theirs, their_state)):
            assert torch.equal(a.isnan(), b.isnan()), name
            assert torch.equal(a.isinf(), b.isinf()), name
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0, equal_nan=True)


def test_fastopt_adam_on_cpp_matches_torch_adam():
    """End to end: fastopt.Adam(backend='cpp') and torch.optim.Adam, fp32, five steps.

    fp32 rounding of ~15 ops per step and a different evaluation order than torch's kernels:
    agreement to 1e-5 relative over five steps."""
    if backends.unavailable_reason("cpp") is not None:
        pytest.fail(backends.unavailable_reason("cpp"))
    torch.manual_seed(0)
    ours = [torch.randn(s, requires_grad=True) for s in [(10, 3), (7,), (0,)]]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = fastopt.Adam(ours, lr=1e-2, weight_decay=0.1, amsgrad=True, backend="cpp")
    ref = torch.optim.Adam(theirs, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dtype_and_master_weights_through_the_optimizer():
    """bf16 state for fp32 params and fp32 master weights for bf16 params, via FusedOptimizer."""
    if backends.unavailable_reason("cpp") is not None:
        pytest.fail(backends.unavailable_reason("cpp"))
    for dtype, options in [
        (torch.float32, dict(state_dtype=torch.bfloat16)),
        (torch.bfloat16, dict(master_weights=True)),
    ]:
        p = torch.randn(100).to(dtype).requires_grad_()
        opt = fastopt.FusedOptimizer([p], spec=ADAM, lr=1e-2, backend="cpp", **options)
        p.grad = torch.randn(100).to(dtype)
        before = p.detach().clone()
        opt.step()
        moved = (p.detach().float() - before.float()).abs()
        assert bool((moved > 0).any()) and bool((moved < 0.05).all()), options


def test_presets_combinations_cover_all_paths():
    """Sanity: the dtype specs exercise every kernel role at least once."""
    roles = set()
    for spec in DTYPE_SPECS:
        roles.update(spec.state_roles)
        if spec.curvature == Curvature.HVP:
            roles.add("h")
    assert roles == {"m", "v", "vmax", "gavg", "u", "h"}
    assert any(s.extra == 2 for s in DTYPE_SPECS)  # RAdam's unrectified steps
