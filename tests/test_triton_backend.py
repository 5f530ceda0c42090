"""The Triton backend against the float64 torch backend (and the NumPy reference).

Two devices: "interpreted" runs Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors
where no GPU is present, which is how CI tests the kernels, on small tensors and a subset
of the family that takes every switch value; "cuda" runs the compiled kernels on a GPU,
on the whole family. Each runs where it can: CI has no GPU, the GPU machine runs the CUDA
cases (bench/results/GPU_TESTS.md records the last pass).

Tolerances: math is fp32 in the kernels and fp64 in the reference; both store to the same
dtype after every step. fp32 storage: a few ulps of fp32 per step (tol 2e-5). bf16/fp16
storage: rounding the same real value can land on neighbouring representable values, one
ulp apart, and such a flip carries into the next step with a factor up to 1 (m = mu m + ...),
where the value may have shrunk by cancellation: tol = 2 ulps of the storage, relative to
the element and to the largest element of the tensor. For fp32 weights the update
p_new - p_old is checked too (2e-4 of its size, plus 4 ulps of p): p itself hides a
small error in the step. Some rules are ill-conditioned on
some inputs (a Hessian-vector curvature unrelated to the gradient, centering's v - gavg^2,
a one-element tensor with no larger neighbour to scale by): there any fp32 evaluation
strays further, so the bound also allows 8 times the deviation of the torch backend's own
fp32 evaluation of the same step (the kernels' fused multiply-adds and 2-ulp division round
differently, by a few times that); a wrong formula misses by far more.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import inspect
import math
import os
import weakref

import pytest
import torch

from fastopt import rule
from fastopt.backends import torch_backend
from fastopt.scalars import StepScalars, rounding_seed, step_scalars
from fastopt.spec import (
    Accumulation,
    Curvature,
    Denominator,
    Eps,
    Extra,
    Momentum,
    MomentumInput,
    Norm,
    Schedule,
    Spec,
    WeightDecay,
    family,
)

HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a test dependency
    HAS_TRITON = False

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

ADAM = Spec(
    momentum=Momentum.CLASSICAL,
    mu_schedule=Schedule.BIAS_CORRECTION,
    denominator=Denominator.MEAN,
    nu_schedule=Schedule.BIAS_CORRECTION,
)
HYPER = dict(lr=1e-2, mu=0.9, nu=0.99, eps=1e-6, weight_decay=0.1, momentum_decay=4e-3, dampening=0.1)
NO_WD = dict(HYPER, weight_decay=0.0)

# A subset of the family that takes every value of every switch of rule.update (checked by
# test_subset_covers_every_switch), plus decoupled decay and maximize: (id, spec, hyper,
# first step, grad scale).
SUBSET = [
    ("sgd", Spec(), NO_WD, 2, 1.0),
    (
        "sgd-nesterov-sum",
        Spec(momentum=Momentum.NESTEROV, momentum_accumulation=Accumulation.SUM),
        HYPER,
        1,
        1.0,
    ),
    ("adam", ADAM, HYPER, 3, 1.0),
    ("adam-gradscale", ADAM, NO_WD, 3, 0.5),
    ("adamw-maximize", ADAM.replace(weight_decay=WeightDecay.DECOUPLED, maximize=True), HYPER, 3, 1.0),
    ("amsgrad", ADAM.replace(amsgrad=True), HYPER, 3, 1.0),
    ("adamax", ADAM.replace(norm=Norm.LINF, eps=Eps.INSIDE), HYPER, 3, 1.0),
    (
        "nadam",
        ADAM.replace(momentum=Momentum.NESTEROV, mu_schedule=Schedule.NADAM),
        HYPER,
        3,
        1.0,
    ),
    ("radam", ADAM.replace(extra=Extra.RADAM), dict(HYPER, nu=0.999), 5, 1.0),  # rectified from t=6
    ("adadelta", Spec(denominator=Denominator.MEAN, eps=Eps.INSIDE, extra=Extra.ADADELTA), HYPER, 3, 1.0),
    (
        "rmsprop-centered-momentum",
        Spec(
            momentum=Momentum.CLASSICAL,
            momentum_input=MomentumInput.PRECONDITIONED,
            momentum_accumulation=Accumulation.SUM,
            denominator=Denominator.MEAN,
            centered=True,
        ),
        HYPER,
        3,
        1.0,
    ),
    ("adagrad", Spec(denominator=Denominator.SUM), dict(HYPER, lr_decay=0.01), 3, 1.0),
    (
        "l1-scaled-increasing",
        Spec(
            momentum=Momentum.CLASSICAL,
            momentum_input=MomentumInput.SCALED,
            mu_schedule=Schedule.INCREASING,
            denominator=Denominator.MEAN,
            norm=Norm.L1,
            nu_schedule=Schedule.TRUE_MEAN,
        ),
        HYPER,
        3,
        1.0,
    ),
    ("esgd-hvp", Spec(denominator=Denominator.MEAN, curvature=Curvature.HVP), HYPER, 3, 1.0),
]
SIZES = [0, 1, 3, 130, 257]  # uneven, empty and one-element tensors; several 128-element chunks
CUDA_SIZES = [0, 1, 5, 1000, 4097, 70001]  # several 16384-element chunks, ragged tails

DEVICES = [
    pytest.param("interpreted", id="interpreted"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def _interpreter_kernels() -> None:
    """Make the kernels Triton interpreter functions (the env var must be set by now). The
    module may have been imported earlier without it; the knob is read at decoration."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastopt.backends import triton_kernels

    if not isinstance(triton_kernels.step_kernel, InterpretedFunction):
        importlib.reload(triton_kernels)


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> torch.device:
    """The device of one case; sets up Triton's interpreter for the CPU one."""
    if request.param == "cuda":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA GPU (runs on the GPU machine; see bench/results/GPU_TESTS.md)")
        return torch.device("cuda")
    if HAS_CUDA:
        # the interpreter would take over the compiled kernels of the CUDA cases in this process
        pytest.skip("interpreted cases run where no GPU is present (CI)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _interpreter_kernels()
    return torch.device("cpu")


@pytest.fixture
def tb():
    from fastopt.backends import triton_backend

    triton_backend.clear_cache()
    return triton_backend


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 2 * _eps(dtype)


def assert_near(
    ours: torch.Tensor, ref: torch.Tensor, torch32: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """|ours - ref| <= tol (|ref| + max |ref|) + 8 max |torch32 - ref|: see the module docstring."""
    ours = ours.double().cpu()
    tol = _tol(dtype)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    conditioning = 8 * float((torch32.double() - ref).abs().max()) if ref.numel() else 0.0
    atol = tol * scale + conditioning + 1e-30
    torch.testing.assert_close(ours, ref, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


class Case:
    """Params, grads and state of one spec, warmed up to step t0 - 1 by the fp64 torch
    backend (so the state is what a real run has at t0), stored in the test dtypes; and the
    same values in fp64 for the reference."""

    def __init__(
        self,
        spec: Spec,
        hyper: dict,
        sizes: list[int],
        device: torch.device,
        t0: int,
        p_dtype: torch.dtype = torch.float32,
        s_dtype: torch.dtype | None = None,
        master: bool = False,
        seed: int = 0,
    ):
        self.spec, self.hyper, self.sizes, self.device = spec, hyper, sizes, device
        self.p_dtype, self.s_dtype = p_dtype, s_dtype or p_dtype
        self.master = master
        self.gen = torch.Generator().manual_seed(seed)
        roles = spec.state_roles
        p = [torch.randn(n, generator=self.gen, dtype=torch.float64) for n in sizes]
        state = {r: [torch.zeros(n, dtype=torch.float64) for n in sizes] for r in roles}
        for t in range(1, t0):
            g, h = self.draw()
            torch_backend.step(spec, step_scalars(spec, hyper, t), p, g, h, state)
        w_dtype = torch.float32 if master else p_dtype
        # the reference starts from exactly the stored values
        self.ref_p = [x.to(w_dtype).double() for x in p]
        self.ref_state = {r: [x.to(self.s_dtype).double() for x in v] for r, v in state.items()}
        self.params = [x.to(p_dtype).to(device) for x in p]
        self.state = {r: [x.to(self.s_dtype).to(device) for x in v] for r, v in state.items()}
        if master:
            self.state["master"] = [x.float().to(device) for x in p]
        # the torch backend's own fp32 evaluation, on the CPU, as a measure of conditioning
        self.t32_p = [x.to(w_dtype) for x in p]
        self.t32_state = {r: [x.to(self.s_dtype) for x in v] for r, v in state.items()}

    def draw(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        g = [torch.randn(n, generator=self.gen, dtype=torch.float64) for n in self.sizes]
        h = None
        if self.spec.curvature == Curvature.HVP:
            h = [torch.randn(n, generator=self.gen, dtype=torch.float64) for n in self.sizes]
        return g, h

    def step(self, tb, scalars: StepScalars, **kwargs) -> None:
        """One step of the Triton backend and of the fp64 reference on the same inputs."""
        self.before = [
            [x.double().cpu() for x in (self.state["master"] if self.master else self.params)],
            [x.clone() for x in self.ref_p],
            [x.double() for x in self.t32_p],
        ]
        g, h = self.draw()
        g = [x.to(self.p_dtype) for x in g]
        h = None if h is None else [x.to(self.p_dtype) for x in h]
        tb.step(
            self.spec,
            scalars,
            self.params,
            [x.to(self.device) for x in g],
            None if h is None else [x.to(self.device) for x in h],
            self.state,
            **kwargs,
        )
        ref_scalars = scalars
        if "grad_scale_ptr" in kwargs:
            ref_scalars = scalars._replace(grad_scale=scalars.grad_scale * float(kwargs["grad_scale_ptr"]))
        torch_backend.step(
            self.spec,
            ref_scalars,
            self.ref_p,
            [x.double() for x in g],
            None if h is None else [x.double() for x in h],
            self.ref_state,
        )
        torch_backend.step(
            self.spec,
            ref_scalars,
            self.t32_p,
            [x.to(self.t32_p[0].dtype) for x in g] if self.t32_p else [],
            None if h is None else [x.to(self.t32_p[0].dtype) for x in h],
            self.t32_state,
        )
        # the reference stores what the kernel stores: the rounding is part of the algorithm
        w_dtype = torch.float32 if self.master else self.p_dtype
        self.ref_p = [x.to(w_dtype).double() for x in self.ref_p]
        self.ref_state = {r: [x.to(self.s_dtype).double() for x in v] for r, v in self.ref_state.items()}

    def check(self, what: str = "") -> None:
        w_dtype = torch.float32 if self.master else self.p_dtype
        ours = self.state["master"] if self.master else self.params
        for i, (a, b) in enumerate(zip(ours, self.ref_p, strict=True)):
            assert_near(a, b, self.t32_p[i], w_dtype, f"{what} p[{i}]")
        if w_dtype == torch.float32:
            # the update itself, much smaller than p: a slightly wrong step size shows here
            for i, (a, b, c) in enumerate(zip(ours, self.ref_p, self.t32_p, strict=True)):
                if not b.numel():
                    continue
                d_ours = a.double().cpu() - self.before[0][i]
                d_ref, d_t32 = b - self.before[1][i], c.double() - self.before[2][i]
                allowed = (
                    2e-4 * float(d_ref.abs().max())
                    + 4 * _eps(torch.float32) * float(self.before[1][i].abs().max())
                    + 8 * float((d_t32 - d_ref).abs().max())
                )
                err = float((d_ours - d_ref).abs().max())
                assert err <= allowed, f"{what} update of p[{i}]: error {err:.3g} > {allowed:.3g}"
        if self.master:  # the param is its master rounded once
            for p, w in zip(self.params, self.state["master"], strict=True):
                assert torch.equal(p, w.to(self.p_dtype))
        for role, ref in self.ref_state.items():
            for i, (a, b) in enumerate(zip(self.state[role], ref, strict=True)):
                assert_near(a, b, self.t32_state[role][i], self.s_dtype, f"{what} {role}[{i}]")


def run_case(tb, spec, hyper, sizes, device, t0, grad_scale=1.0, steps=2, **case_kwargs) -> Case:
    case = Case(spec, hyper, sizes, device, t0, **case_kwargs)
    for t in range(t0, t0 + steps):
        scalars = step_scalars(spec, hyper, t)._replace(grad_scale=grad_scale)
        case.step(tb, scalars, stochastic_rounding=False)
        case.check(f"{spec.short()} t={t}")
    return case


# ---- the rule is compiled from fastopt/rule.py's own source --------------------------------


def test_rule_is_compiled_from_its_source():
    from fastopt.backends import triton_kernels as K

    fn = K.update.fn
    assert fn.__code__ is rule.update.__code__  # the very same code object, not a copy
    # a compiled JITFunction keeps the source as .src, the interpreter's wrapper does not:
    # either way the source Triton parses is the rule's own
    src = getattr(K.update, "src", None) or inspect.getsource(K.update.fn)
    assert src.lstrip().startswith("def update(")
    for helper in ("sqrt", "maximum", "absolute"):
        bound = fn.__globals__[helper]
        assert bound is not getattr(rule, helper) and hasattr(bound, "fn")  # a Triton function


def test_kernel_takes_every_switch_of_the_rule():
    import inspect

    from fastopt.backends import triton_kernels as K

    rule_switches = [n for n in inspect.signature(rule.update).parameters if n.isupper()]
    assert list(K.SWITCHES) == rule_switches
    kernel_params = list(inspect.signature(K.step_kernel.fn).parameters)
    assert set(rule_switches) <= set(kernel_params)
    assert set(rule.switches(ADAM, step_scalars(ADAM, HYPER, 1))) == set(rule_switches)
    assert K.SCALAR_FIELDS[:-1] == StepScalars._fields


def test_subset_covers_every_switch():
    seen: dict[str, set[int]] = {}
    for _, spec, hyper, t0, gs in SUBSET:
        for t in (t0, t0 + 1):
            for name, value in rule.switches(
                spec, step_scalars(spec, hyper, t)._replace(grad_scale=gs)
            ).items():
                seen.setdefault(name, set()).add(value)
    expected = {
        "MOMENTUM": {0, 1, 2},
        "MOMENTUM_INPUT": {0, 1, 2},
        "DENOMINATOR": {0, 1, 2},
        "NORM": {1, 2, 3},
    }
    for name, values in seen.items():
        assert values == expected.get(name, {0, 1}), name


# ---- parity with the fp64 torch backend -----------------------------------------------------


@pytest.mark.parametrize("case", SUBSET, ids=[c[0] for c in SUBSET])
def test_subset_matches_torch_backend(tb, device, case):
    _, spec, hyper, t0, grad_scale = case
    sizes = SIZES if device.type == "cpu" else CUDA_SIZES
    run_case(tb, spec, hyper, sizes, device, t0, grad_scale=grad_scale)


STORAGE = [
    # (param dtype, state dtype, master weights)
    (torch.bfloat16, torch.bfloat16, False),
    (torch.float16, torch.float32, False),
    (torch.float32, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, True),
    (torch.float16, torch.bfloat16, True),
]
STORAGE_SPECS = [SUBSET[4], SUBSET[9]]  # AdamW + maximize; Adadelta (its u role)


@pytest.mark.parametrize(
    "storage", STORAGE, ids=lambda s: f"p{str(s[0])[6:]}-s{str(s[1])[6:]}{'-master' * s[2]}"
)
@pytest.mark.parametrize("case", STORAGE_SPECS, ids=[c[0] for c in STORAGE_SPECS])
def test_storage_dtypes_match_torch_backend(tb, device, case, storage):
    _, spec, hyper, t0, _ = case
    p_dtype, s_dtype, master = storage
    sizes = SIZES if device.type == "cpu" else CUDA_SIZES
    run_case(tb, spec, hyper, sizes, device, t0, p_dtype=p_dtype, s_dtype=s_dtype, master=master)


def test_public_optimizer_matches_reference(device):
    """fastopt.FusedOptimizer(backend="triton") against the NumPy reference, end to end."""
    from helpers import max_rel_err, run_backend_vs_reference

    if device.type == "cuda":
        pytest.skip("covered on CUDA by the full-family test")
    for spec in (ADAM, SUBSET[9][1], SUBSET[8][1]):
        ours, ref = run_backend_vs_reference(
            spec,
            dict(HYPER, nu=0.999),
            [(3,), (2, 5), (0,), (1,)],
            steps=3,
            backend="triton",
            dtype=torch.float32,
        )
        assert max_rel_err(ours, ref) < 1e-5, spec.short()


# ---- AMP hooks, capturable scalars ---------------------------------------------------------


def test_found_inf_leaves_everything_untouched(tb, device):
    case = Case(ADAM, HYPER, SIZES, device, t0=3)
    before = [p.clone() for p in case.params], {r: [x.clone() for x in v] for r, v in case.state.items()}
    grads = [torch.full((n,), float("inf"), device=device) for n in SIZES]
    flag = torch.ones(1, device=device)
    tb.step(ADAM, step_scalars(ADAM, HYPER, 3), case.params, grads, None, case.state, found_inf=flag)
    assert all(torch.equal(a, b) for a, b in zip(case.params, before[0], strict=True))
    for r, v in case.state.items():
        assert all(torch.equal(a, b) for a, b in zip(v, before[1][r], strict=True))
    # a zero flag steps as usual
    case.step(tb, step_scalars(ADAM, HYPER, 3), found_inf=torch.zeros(1, device=device))
    case.check("found_inf=0")


def test_grad_scale_tensor_multiplies_the_grads(tb, device):
    case = Case(ADAM, HYPER, SIZES, device, t0=3)
    inv = torch.full((1,), 0.25, device=device)
    for t in (3, 4):
        case.step(tb, step_scalars(ADAM, HYPER, t), grad_scale_ptr=inv)
        case.check(f"t={t}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unscale_grads_writes_the_unscaled_gradients_back(tb, device, dtype):
    """``unscale_grads``: each gradient is left times the factor, rounded as torch's in-place
    multiply rounds it, the step is the step without it bit for bit, and an overflowed
    step (found_inf set) leaves the gradients as they were."""
    factor = torch.full((1,), 1.0 / 3.0, device=device)  # not a power of two: rounded
    a = Case(ADAM, HYPER, SIZES, device, t0=3, p_dtype=dtype)
    b = Case(ADAM, HYPER, SIZES, device, t0=3, p_dtype=dtype)
    grads = [g.to(dtype).to(device) for g in a.draw()[0]]
    expected = [g.clone().mul_(factor) for g in grads]
    scalars = step_scalars(ADAM, HYPER, 3)
    tb.step(ADAM, scalars, b.params, [g.clone() for g in grads], None, b.state, grad_scale_ptr=factor)
    tb.step(ADAM, scalars, a.params, grads, None, a.state, grad_scale_ptr=factor, unscale_grads=factor)
    for x, y in zip(
        a.params + a.state["m"] + a.state["v"], b.params + b.state["m"] + b.state["v"], strict=True
    ):
        assert torch.equal(x, y)
    for g, e in zip(grads, expected, strict=True):
        assert torch.equal(g, e)
    flag = torch.ones(1, device=device)
    kept = [g.clone() for g in grads]
    tb.step(ADAM, scalars, a.params, grads, None, a.state, found_inf=flag, unscale_grads=factor)
    assert all(torch.equal(g, k) for g, k in zip(grads, kept, strict=True))


@pytest.mark.parametrize("case", [SUBSET[4], SUBSET[8]], ids=["adamw-maximize", "radam"])
def test_scalars_tensor_equals_host_scalars(tb, device, case):
    _, spec, hyper, t0, _ = case
    a = Case(spec, hyper, SIZES, device, t0)
    b = Case(spec, hyper, SIZES, device, t0)
    for t in range(t0, t0 + 2):  # RAdam: unrectified at t0 = 5, rectified at 6
        scalars = step_scalars(spec, hyper, t)
        a.step(tb, scalars)
        b.step(tb, scalars, scalars_tensor=tb.scalars_tensor(scalars, device, seed=t))
        for x, y in zip(a.params, b.params, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        b.check(f"t={t}")


# ---- multi-tensor layout -------------------------------------------------------------------


@pytest.mark.parametrize("passes", ["native", "python"])
def test_table_refuses_tensors_that_do_not_line_up(tb, monkeypatch, passes):
    """A new table checks its tensors in whole-list passes (C++ where fastopt._host is
    built, else Python): each refusal names what is wrong."""
    from fastopt import tensor_lists

    if passes == "python":
        monkeypatch.setattr(tensor_lists, "_host", None)
    params = [torch.zeros(5), torch.zeros(3)]

    def table(*others):
        return tb.pointer_table([params, *others], ["param", "grad"][: 1 + len(others)], 128, "cpu")

    assert table([torch.ones(5), torch.ones(3)]).sizes.tolist() == [5, 3]
    with pytest.raises(ValueError, match="one tensor per param"):
        table([torch.ones(5)])
    with pytest.raises(ValueError, match="one dtype"):
        table([torch.ones(5), torch.ones(3, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="contiguous"):
        table([torch.ones(5), torch.ones(6)[::2]])
    with pytest.raises(ValueError, match="size and device"):
        table([torch.ones(5), torch.ones(4)])
    with pytest.raises(ValueError, match="size and device"):
        table([torch.ones(5), torch.ones(3, device="meta")])


def test_table_is_cached_and_coalesces_flat_buffers(tb):
    flat = [torch.randn(1000) for _ in range(2)]
    views = [[f[0:10], f[10:10], f[10:11], f[11:500], f[500:]] for f in flat]  # back to back
    table = tb.pointer_table(views, ["param", "grad"], 128, "cpu")
    assert table.sizes.tolist() == [1000]  # one entry, as if the params were one flat tensor
    assert table.n_chunks == table.n_programs == 8
    assert tb.pointer_table(views, ["param", "grad"], 128, "cpu") is table  # same tensors: cached
    apart = [[torch.randn(n) for n in (5, 0, 300, 7, 64)] for _ in range(2)]
    table2 = tb.pointer_table(apart, ["param", "grad"], 128, "cpu", pack_below=64)
    assert table2.sizes.tolist() == [5, 300, 7, 64]  # empty tensors take no chunk
    assert table2.chunks.view(-1, 2).tolist() == [[1, 0], [1, 128], [1, 256], [3, 0]]
    # tensors under 64 elements share packed programs of 64 elements
    assert table2.packed_ids.tolist() == [0, 2] and table2.packed_offs.tolist() == [0, 5, 12]
    assert table2.n_programs == 4 + 1


def test_every_part_of_a_table_starts_16_byte_aligned(tb):
    """Triton compiles a kernel variant per pointer argument's 16-byte alignment: the
    table's parts (views of one buffer) must all be aligned whatever the tensor counts, or
    one spec compiles up to four variants."""
    for n_big, n_small in [(1, 0), (2, 1), (3, 2), (0, 3), (5, 5), (4, 7)]:
        arrays = [[torch.randn(n) for n in [300] * n_big + [5] * n_small] for _ in range(3)]
        table = tb.pointer_table(arrays, ["param", "grad", "m"], 128, "cpu", pack_below=64)
        parts = [table.ptrs, table.sizes, table.chunks, table.packed_ids, table.packed_offs]
        assert all(part.data_ptr() % 16 == 0 for part in parts), (n_big, n_small)
        assert table.sizes.tolist() == [300] * n_big + [5] * n_small
        assert table.packed_offs.tolist() == [5 * i for i in range(n_small + 1)]


def test_tables_a_graph_captured_outlive_the_cache(tb, monkeypatch):
    """A captured CUDA graph's replays read the pointer table at the address the capture
    saw, and nothing else refers to it: a table used while capturing (stood in for on the
    CPU) stays alive when the cache evicts or forgets it, where another is freed."""
    monkeypatch.setattr(tb, "_HELD_FOR_GRAPHS", [])
    alive = []  # the tensors stay alive, so that no address is reused within the test

    def table_buffer(n: int, captured: bool) -> weakref.ref:
        monkeypatch.setattr(tb, "capturing", lambda device: captured)
        arrays = [[torch.zeros(n)], [torch.zeros(n)]]
        alive.append(arrays)
        return weakref.ref(tb.pointer_table(arrays, ["param", "grad"], 128, torch.device("cpu")).buf)

    captured, plain = table_buffer(100, True), table_buffer(200, False)
    for i in range(tb._MAX_TABLES):  # evict both from the cache
        table_buffer(300 + i, False)
    assert captured() is not None and plain() is None
    tb.clear_cache()
    gc.collect()
    assert captured() is not None


def test_a_table_built_while_capturing_is_not_reused_eagerly(tb, monkeypatch):
    """A table first built while a graph is captured has its upload recorded in the graph,
    run only by replays: an eager step over the same tensors (before any replay) must build
    its own table rather than read that one's unfilled buffer. Capture stood in for."""
    monkeypatch.setattr(tb, "_HELD_FOR_GRAPHS", [])
    arrays = [[torch.zeros(100)], [torch.zeros(100)]]
    monkeypatch.setattr(tb, "capturing", lambda device: True)
    in_graph = tb.pointer_table(arrays, ["param", "grad"], 128, torch.device("cpu"))
    monkeypatch.setattr(tb, "capturing", lambda device: False)
    eager = tb.pointer_table(arrays, ["param", "grad"], 128, torch.device("cpu"))
    assert eager is not in_graph and any(h is in_graph for h in tb._HELD_FOR_GRAPHS)
    assert tb.pointer_table(arrays, ["param", "grad"], 128, torch.device("cpu")) is eager
    # a table built eagerly is the one a later capture uses (and keeps for its graph)
    monkeypatch.setattr(tb, "capturing", lambda device: True)
    assert tb.pointer_table(arrays, ["param", "grad"], 128, torch.device("cpu")) is eager
    assert any(h is eager for h in tb._HELD_FOR_GRAPHS)


def test_norm_buffers_of_a_captured_launch_are_its_own(tb, monkeypatch):
    """Eager grad-norm launches share one pair of buffers (partial sums, completion counter)
    per device and stream, replaced by a larger one when too small; a launch being captured
    gets a pair of its own, kept alive for the graph's replays."""
    monkeypatch.setattr(tb, "_HELD_FOR_GRAPHS", [])
    monkeypatch.setattr(tb, "_norm_buffers", {})
    cpu = torch.device("cpu")
    eager = tb.norm_buffers(cpu, 10)
    assert tb.norm_buffers(cpu, 1000) is eager  # large enough: reused
    monkeypatch.setattr(tb, "capturing", lambda device: True)
    graph1, graph2 = tb.norm_buffers(cpu, 10), tb.norm_buffers(cpu, 10)
    pointers = {t.data_ptr() for pair in (eager, graph1, graph2) for t in pair}
    assert len(pointers) == 6  # no graph shares a buffer with another or with eager launches
    assert graph1[0].numel() >= 10 and graph1[1].tolist() == [0] and graph1[1].dtype == torch.int32
    refs = [weakref.ref(t) for t in (*graph1, *eager)]
    del graph1, graph2
    monkeypatch.setattr(tb, "capturing", lambda device: False)
    bigger = tb.norm_buffers(cpu, 5000)
    assert bigger[0].numel() >= 5000 and bigger[1].tolist() == [0]
    del eager
    gc.collect()
    assert refs[0]() is not None and refs[1]() is not None  # the graph's pair is kept
    assert refs[2]() is None  # the eager pair it replaced is freed


def test_int64_offsets(tb, device):
    """Elements past 2**31 of a tensor: a hand-built table whose only chunks lie beyond 2**31
    of a base address placed so that they land in a small real buffer (int32 offsets would
    wrap and miss it). SGD: p -= lr * g."""
    cfg = tb.launch_config()
    n, guard = 3 * cfg["chunk"] // 2, 64
    off = 2**31 + cfg["chunk"]  # a chunk boundary past 2**31
    p_buf = torch.randn(n + 2 * guard, device=device)
    g = torch.randn(n, device=device)
    p = p_buf[guard : guard + n]
    before = p_buf.clone()
    base_p = p.data_ptr() - off * 4
    base_g = g.data_ptr() - off * 4
    starts = list(range(off, off + n, cfg["chunk"]))
    host = [base_p, base_g, off + n] + [x for s in starts for x in (0, s)]
    buf = torch.tensor(host, dtype=torch.int64, device=device)

    class Table:
        pass

    table = Table()
    table.buf, table.ptrs, table.sizes, table.chunks = buf, buf[:2], buf[2:3], buf[3:]
    table.packed_ids = table.packed_offs = buf
    table.n_chunks = table.n_programs = len(starts)
    table.n_packed = table.packed_elems = table.search = 0
    table.aligned = base_p % 16 == 0 and base_g % 16 == 0
    spec = Spec()
    scalars = step_scalars(spec, NO_WD, 1)
    tb._launch(
        table, spec, scalars, 2, {}, (torch.float32,) * 3, False, cfg, None, None, None
    )  # fmt: skip
    expected = before.clone()
    expected[guard : guard + n] = (
        before[guard : guard + n] - torch.tensor(scalars.lr, dtype=torch.float32) * g
    )
    torch.testing.assert_close(p_buf, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(p_buf[:guard], before[:guard]) and torch.equal(p_buf[-guard:], before[-guard:])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (8.6 GB of memory)")
def test_tensor_over_2_31_elements_cuda(tb):
    n = 2**31 + 3000
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g[-1000:] = 2.0
    spec = Spec()
    tb.step(spec, step_scalars(spec, dict(lr=0.5), 1), [p], [g], None, {})
    assert p[: 2**20].eq(0.5).all() and p[-3000:-1000].eq(0.5).all() and p[-1000:].eq(0.0).all()
    del p, g
    torch.cuda.empty_cache()


# ---- bf16 state: stochastic rounding ---------------------------------------------------------


def test_stochastic_rounding_is_unbiased(tb, device):
    """m = g exactly (SUM momentum at t=1); g lies a quarter of the way between two bf16
    values, so rounding to nearest always goes down while stochastic rounding goes up a
    quarter of the time and keeps the mean."""
    spec = Spec(momentum=Momentum.CLASSICAL, momentum_accumulation=Accumulation.SUM)
    n = 4096
    x = 1.0 + 0.25 * 2**-7  # bf16 neighbours: 1 and 1 + 2**-7
    scalars = step_scalars(spec, dict(lr=1e-3, mu=0.5), 1)
    means = {}
    for sr in (False, True):
        p = [torch.randn(n, device=device)]
        m = [torch.zeros(n, dtype=torch.bfloat16, device=device)]
        tb.step(
            spec, scalars, p, [torch.full((n,), x, device=device)], None, {"m": m}, stochastic_rounding=sr
        )
        values = set(m[0].float().unique().tolist())
        assert values <= {1.0, 1.0 + 2**-7}
        means[sr] = m[0].double().mean().item()
    assert means[False] == 1.0
    sigma = 2**-7 * math.sqrt(0.25 * 0.75 / n)
    assert abs(means[True] - x) < 5 * sigma


def test_stochastic_rounding_of_two_tensors_is_independent(tb, device):
    """Two tensors of one launch draw independent rounding bits, also at the element pairs
    where mixing offset and tensor index into one word (o ^ t * C, the kernel's earlier
    key) made them equal: element o of tensor 0 and element o ^ D of tensor 179, with
    D = 179 * C mod 2**32. A hand-built table places a 128-element chunk of each tensor at
    those offsets (on small real buffers, as test_int64_offsets does). m = g exactly, a
    quarter of a bf16 step above 1: each element rounds up with probability 1/4, so a pair
    agrees with probability 0.625 (standard deviation 0.043 over the interpreter's 128
    pairs); the old key made every pair agree."""
    cfg = tb.launch_config()
    n, other = cfg["chunk"], 179  # one chunk (a power of two) per tensor
    d = (other * 0x297A2D39) % 2**32
    starts = {0: 0, other: d & ~(n - 1)}  # chunk-aligned; o ^ d lands in the second one
    spec = Spec(momentum=Momentum.CLASSICAL, momentum_accumulation=Accumulation.SUM)
    x = 1.0 + 0.25 * 2**-7
    bufs = {
        t: (torch.zeros(n, device=device), torch.full((n,), x, device=device),
            torch.zeros(n, dtype=torch.bfloat16, device=device))
        for t in starts
    }  # fmt: skip
    ptrs = [[0, 0, 0] for _ in range(other + 1)]
    sizes = [0] * (other + 1)
    for t, start in starts.items():
        ptrs[t] = [b.data_ptr() - start * b.element_size() for b in bufs[t]]
        sizes[t] = start + n
    chunks = [v for t, start in starts.items() for v in (t, start)]
    buf = torch.tensor([v for row in ptrs for v in row] + sizes + chunks, dtype=torch.int64, device=device)

    class Table:
        pass

    table = Table()
    na = 3
    table.buf, table.ptrs = buf, buf[: na * (other + 1)]
    table.sizes = buf[na * (other + 1) : (na + 1) * (other + 1)]
    table.chunks = buf[(na + 1) * (other + 1) :]
    table.packed_ids = table.packed_offs = buf
    table.n_chunks = table.n_programs = len(starts)
    table.n_packed = table.packed_elems = table.search = 0
    table.aligned = False
    scalars = step_scalars(spec, dict(lr=1e-3, mu=0.5), 1)
    dtypes = (torch.float32, torch.float32, torch.bfloat16)
    tb._launch(table, spec, scalars, na, {"m": 2}, dtypes, True, cfg, None, None, None, seed=12345)
    up = {t: bufs[t][2].float().cpu() > 1.0 for t in starts}
    assert 0.05 < up[0].float().mean() < 0.5 and 0.05 < up[other].float().mean() < 0.5  # it rounded
    pairs = torch.arange(n) ^ (d & (n - 1))  # element i of tensor 0 and its old twin
    agree = (up[0] == up[other][pairs]).float().mean().item()
    assert agree < 0.625 + 5 * math.sqrt(0.625 * 0.375 / n), agree


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (a few thousand steps)")
def test_bf16_state_needs_stochastic_rounding_cuda(tb):
    """Adam (lr 1e-3) on a small least-squares problem, 6000 steps: bf16 state rounded to
    nearest stalls (v's per-step change 1e-3 is below bf16's resolution) and ends far above
    fp32's loss, stochastic rounding tracks fp32 state."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(512, 64, device="cuda", generator=gen)
    y = X @ torch.randn(64, device="cuda", generator=gen) + 0.01 * torch.randn(
        512, device="cuda", generator=gen
    )
    hyper = dict(lr=1e-3, mu=0.9, nu=0.999, eps=1e-8)

    def train(s_dtype, sr):
        w = torch.zeros(64, device="cuda")
        st = {r: [torch.zeros(64, dtype=s_dtype, device="cuda")] for r in ("m", "v")}
        batches = torch.Generator(device="cuda").manual_seed(1)
        for t in range(1, 6001):
            idx = torch.randint(0, 512, (64,), device="cuda", generator=batches)
            g = 2 * X[idx].T @ (X[idx] @ w - y[idx]) / 64
            tb.step(ADAM, step_scalars(ADAM, hyper, t), [w], [g], None, st, stochastic_rounding=sr)
        return ((X @ w - y) ** 2).mean().item()

    fp32, rne, sr = train(torch.float32, False), train(torch.bfloat16, False), train(torch.bfloat16, True)
    assert sr < 2 * fp32 + 1e-4
    assert rne > 10 * sr


# ---- bf16 state: the rounding seed -----------------------------------------------------------

# Odd sizes: no two tensors can lie back to back in memory (allocations are aligned), so the
# table never merges two of them and a tensor's index in the launch is its index here. Packed
# (1, 3) and chunked (131, 257: several 128-element chunks) tensors under the interpreter.
SR_SIZES = [1, 3, 131, 257]
SR_STEPS = 4


def _sr_run(backend, device):
    """fp32 Adam params with bf16 state (stochastic rounding by default), and the grads of
    SR_STEPS steps, the same for every call."""
    gen = torch.Generator().manual_seed(11)
    params = [torch.randn(n, generator=gen).to(device) for n in SR_SIZES]
    state = {
        r: [torch.zeros(n, dtype=torch.bfloat16, device=device) for n in SR_SIZES] for r in ADAM.state_roles
    }
    grads = [[torch.randn(n, generator=gen).to(device) for n in SR_SIZES] for _ in range(SR_STEPS)]
    return params, state, grads


def _sr_steps(backend, params, state, grads, steps, seed):
    """Steps ``steps`` (1-based) with seed(t)."""
    for t in steps:
        backend.step(ADAM, step_scalars(ADAM, HYPER, t), params, grads[t - 1], None, state, seed=seed(t))


def _bits(params, state) -> list[torch.Tensor]:
    """Every tensor's bits (bitwise comparison: -0.0 is not 0.0)."""
    views = [p.view(torch.int32) for p in params]
    views += [x.view(torch.int16) for r in sorted(state) for x in state[r]]
    return [v.cpu() for v in views]


def _same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _move_the_counter(backend, device) -> None:
    """A launch without a seed: advances the process-wide counter that seeded runs must ignore."""
    params, state, grads = _sr_run(backend, device)
    backend.step(ADAM, step_scalars(ADAM, HYPER, 1), params, grads[0], None, state)


def _check_same_seed_same_bits(backend, device) -> None:
    runs = []
    for _ in range(2):
        params, state, grads = _sr_run(backend, device)
        _sr_steps(backend, params, state, grads, range(1, SR_STEPS + 1), lambda t: 12345 + t)
        runs.append(_bits(params, state))
        _move_the_counter(backend, device)
    assert _same_bits(runs[0], runs[1])


def _check_resumed_run_same_bits(backend, device, k: int = 2) -> None:
    """Steps 1..k, a checkpoint (clones: new addresses), steps k+1..n on the clones: bit for
    bit the uninterrupted run, both seeded with scalars.rounding_seed(t, 0)."""
    params, state, grads = _sr_run(backend, device)
    _sr_steps(backend, params, state, grads, range(1, SR_STEPS + 1), lambda t: rounding_seed(t, 0))
    whole = _bits(params, state)

    params, state, grads = _sr_run(backend, device)
    _sr_steps(backend, params, state, grads, range(1, k + 1), lambda t: rounding_seed(t, 0))
    ckpt = [p.clone() for p in params], {r: [x.clone() for x in v] for r, v in state.items()}
    del params, state
    _move_the_counter(backend, device)
    params, state = ckpt
    _sr_steps(backend, params, state, grads, range(k + 1, SR_STEPS + 1), lambda t: rounding_seed(t, 0))
    assert _same_bits(_bits(params, state), whole)


def _check_other_seed_other_bits(backend, device) -> None:
    results = {}
    for seed in (7, 8, 7 + 2**30):
        params, state, grads = _sr_run(backend, device)
        _sr_steps(backend, params, state, grads, [1], lambda t, seed=seed: seed)
        results[seed] = [x.view(torch.int16).cpu() for r in sorted(state) for x in state[r]]
    assert not _same_bits(results[7], results[8])
    assert not _same_bits(results[7], results[7 + 2**30])


def _check_scalars_tensor_seed_rounds_as_eager(backend, device) -> None:
    """A capturable launch, its seed read from the scalars tensor, rounds as an eager launch
    given that seed: a group's bits do not depend on capturable=True."""
    from fastopt.backends import triton_backend  # (the scalars tensor of both GPU backends)

    runs = []
    for capturable in (False, True):
        params, state, grads = _sr_run(backend, device)
        for t in range(1, SR_STEPS + 1):
            sc, seed = step_scalars(ADAM, HYPER, t), rounding_seed(t, 0)
            if capturable:
                st = triton_backend.scalars_tensor(sc, device, seed=seed)
                backend.step(ADAM, sc, params, grads[t - 1], None, state, scalars_tensor=st)
            else:
                backend.step(ADAM, sc, params, grads[t - 1], None, state, seed=seed)
        runs.append(_bits(params, state))
    assert _same_bits(runs[0], runs[1])


def _check_bad_seeds(backend, device) -> None:
    params, state, grads = _sr_run(backend, device)
    before = _bits(params, state)
    scalars = step_scalars(ADAM, HYPER, 1)
    for bad in (-1, 2**31, 2**32 + 1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="seed"):
            backend.step(ADAM, scalars, params, grads[0], None, state, seed=bad)
    with pytest.raises(ValueError, match="seed"):
        backend.step(ADAM, scalars, [], [], None, {}, seed=2**31)  # even with nothing to step
    from fastopt.backends import triton_backend

    sc = triton_backend.scalars_tensor(scalars, device, seed=5)
    with pytest.raises(ValueError, match="scalars_tensor"):  # the tensor holds the seed
        backend.step(ADAM, scalars, params, grads[0], None, state, scalars_tensor=sc, seed=5)
    with pytest.raises(ValueError, match="seed"):
        triton_backend.scalars_tensor(scalars, device, seed=2**31)
    assert _same_bits(_bits(params, state), before)
    for good in (0, 2**31 - 1):
        backend.step(ADAM, scalars, params, grads[0], None, state, seed=good)


def test_same_seed_rounds_the_same(tb, device):
    """Two runs of several steps with the same seeds: bit-identical bf16 state and weights,
    whatever the process-wide seed counter did in between."""
    _check_same_seed_same_bits(tb, device)


def test_resumed_run_rounds_as_the_uninterrupted_one(tb, device):
    _check_resumed_run_same_bits(tb, device)


def test_other_seed_rounds_otherwise(tb, device):
    _check_other_seed_other_bits(tb, device)


def test_scalars_tensor_seed_rounds_as_eager(tb, device):
    _check_scalars_tensor_seed_rounds_as_eager(tb, device)


def test_seed_out_of_range_is_refused(tb, device):
    _check_bad_seeds(tb, device)


def test_one_launch_draws_independently_per_tensor(tb, device):
    """Two identical tensors in one launch (m = g exactly, as in the unbiasedness test) round
    up in different places: the tensor's index enters the hash. Independent draws agree on
    an element with probability 0.25**2 + 0.75**2."""
    spec = Spec(momentum=Momentum.CLASSICAL, momentum_accumulation=Accumulation.SUM)
    n = 512
    x = 1.0 + 0.25 * 2**-7
    m = [torch.zeros(n, dtype=torch.bfloat16, device=device) for _ in range(2)]
    p = [torch.zeros(n, device=device) for _ in range(2)]
    g = [torch.full((n,), x, device=device) for _ in range(2)]
    tb.step(spec, step_scalars(spec, dict(lr=1e-3, mu=0.5), 1), p, g, None, {"m": m}, seed=99)
    up = [mi.float() > 1.0 for mi in m]
    agree = (up[0] == up[1]).double().mean().item()
    assert abs(agree - 0.625) < 5 * math.sqrt(0.625 * 0.375 / n)
    assert 0.1 < up[0].double().mean().item() < 0.4


# ---- global gradient norm --------------------------------------------------------------------


def test_global_grad_norm(tb, device):
    gen = torch.Generator().manual_seed(3)
    sizes = SIZES if device.type == "cpu" else CUDA_SIZES
    grads = [torch.randn(n, generator=gen).to(device) for n in sizes]
    grads += [torch.randn(n, generator=gen).to(torch.bfloat16).to(device) for n in (7, 300)]
    expected = torch.linalg.vector_norm(torch.cat([g.double().cpu() for g in grads]))
    for _ in range(2):  # the completion counter resets itself
        norm = tb.global_grad_norm(grads)
        assert norm.shape == (1,) and norm.device.type == device.type
        torch.testing.assert_close(norm.double().cpu()[0], expected, rtol=1e-5, atol=0)
    assert tb.global_grad_norm([torch.empty(0, device=device)]).item() == 0.0
    grads[3][5] = float("nan")
    assert math.isnan(tb.global_grad_norm(grads[:4]).item())


# ---- the whole family on the GPU -------------------------------------------------------------

FAMILY = list(family())
# slices of about 50 specs: a run cut short at its time limit still reports most of the
# family (bench/gpu_session.sh)
SLICES = 64


@pytest.mark.gpu
@pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU (runs on the GPU machine; see bench/results/GPU_TESTS.md)"
)
@pytest.mark.parametrize("part", range(SLICES))
def test_whole_family_cuda(tb, part):
    """Every spec of the family, two steps from a warm state (t = 5, 6), fp32."""
    failures = []
    for spec in FAMILY[part::SLICES]:
        hyper = dict(HYPER, nu=0.999 if spec.extra == Extra.RADAM else 0.99)
        try:
            run_case(tb, spec, hyper, CUDA_SIZES, torch.device("cuda"), t0=5)
        except AssertionError as exc:
            failures.append(f"{spec.short()}: {str(exc).splitlines()[0]}")
    assert not failures, f"{len(failures)} specs differ:\n" + "\n".join(failures[:20])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_capture_replays_new_scalars(tb):
    """A step captured with scalars_tensor, replayed after writing the next step's values
    into that tensor, equals eager steps (found_inf and grad_scale_ptr captured too)."""
    spec, hyper = SUBSET[8][1], SUBSET[8][2]  # RAdam: its switch flips between t=5 and 6
    eager = Case(spec, hyper, CUDA_SIZES, torch.device("cuda"), t0=4)
    graphed = Case(spec, hyper, CUDA_SIZES, torch.device("cuda"), t0=4)
    grads = [torch.zeros(n, device="cuda") for n in CUDA_SIZES]
    sc = tb.scalars_tensor(step_scalars(spec, hyper, 4), "cuda")
    inv, flag = torch.ones(1, device="cuda"), torch.zeros(1, device="cuda")
    kwargs = dict(scalars_tensor=sc, grad_scale_ptr=inv, found_inf=flag)
    tb.step(spec, step_scalars(spec, hyper, 4), [g.clone() for g in graphed.params], grads, None,
            {r: [x.clone() for x in v] for r, v in graphed.state.items()}, **kwargs)  # fmt: skip
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tb.step(spec, step_scalars(spec, hyper, 4), graphed.params, grads, None, graphed.state, **kwargs)
    for t in (4, 5, 6):
        g, _ = eager.draw()
        eager_g = [x.float().cuda() for x in g]
        tb.step(spec, step_scalars(spec, hyper, t), eager.params, eager_g, None, eager.state)
        for dst, src in zip(grads, eager_g, strict=True):
            dst.copy_(src)
        tb.scalars_tensor(step_scalars(spec, hyper, t), "cuda", out=sc)
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(graphed.params, eager.params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_table_uploaded_on_a_busy_stream_is_waited_for(tb):
    """A step on one stream over tensors whose table was built (and its upload queued) on
    another, still busy, stream must wait for that upload, and keep the table's buffer in
    use on its own stream once the cache lets it go."""
    n = 1 << 20
    p, g = torch.ones(n, device="cuda"), torch.full((n,), 2.0, device="cuda")
    cfg = tb.launch_config()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time ahead of the upload
        table = tb.pointer_table([[p], [g]], ["param", "grad"], cfg["chunk"], p.device, cfg["block"])
    count = len(tb._TABLES)
    tb.step(Spec(), step_scalars(Spec(), dict(lr=0.25), 1), [p], [g], None, {})
    assert len(tb._TABLES) == count and torch.cuda.current_stream().cuda_stream in table.streams
    torch.cuda.synchronize()
    assert p.eq(0.5).all()


# ---- errors ------------------------------------------------------------------------------------


def test_rejects_what_it_cannot_run(tb, device):
    assert tb.supports(ADAM, device, torch.float64) is not None
    p = [torch.randn(4, device=device)]
    state = {"m": [torch.zeros(4, device=device)], "v": [torch.zeros(4, dtype=torch.bfloat16, device=device)]}
    with pytest.raises(ValueError, match="one dtype"):
        tb.step(ADAM, step_scalars(ADAM, HYPER, 1), p, [torch.randn(4, device=device)], None, state)
    other = "cuda" if device.type == "cpu" else "cpu"
    if other == "cpu" or HAS_CUDA:
        assert tb.supports(ADAM, torch.device(other), torch.float32) is not None


def test_unavailable_without_gpu_or_interpreter(monkeypatch):
    from fastopt.backends import triton_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if HAS_CUDA:
        assert triton_backend.unavailable_reason() is None
    else:
        assert "CUDA" in triton_backend.unavailable_reason()
    assert os.environ.get("TRITON_INTERPRET") is None
