"""Hostile input, fuzzed on every backend that runs here.

Each generated case either steps exactly as the NumPy reference does (NaN and Inf in the
same positions, finite values to the dtype's tolerance) or raises a clear error before
anything is modified. The number of cases per backend and outcome ("stepped"; "refused":
a broken input; "refused-hyper": mu or nu = 1 under a bias-correction schedule, 0 / 0) is
printed at the end of the module (and written as JSON to $FASTOPT_RELIABILITY_COUNTS), with
the number of elements compared and of those left out: where the rounding of their inputs
leaves even their sign open (see l2_relative_error), and where the reference's value lies
beyond the dtype's range (fp32 overflows; float64 does not).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from cuda_emulation import EMULATE, cuda_emulation
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_db import cpu_backends

import fastopt
from fastopt import backends, presets
from fastopt.reference import Reference
from fastopt.spec import WeightDecay

# every named rule the optimizer steps from gradients alone (egd needs a closure)
PRESET_NAMES = sorted(n for n in presets.PRESETS if n != "egd")
COUNTS: collections.Counter = collections.Counter()


HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def triton_interpreter():
    """Triton's CPU interpreter for the duration (its kernels are decorated at import, so
    they are reloaded if they were compiled ones), as tests/test_triton_backend.py does."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        from triton.runtime.interpreter import InterpretedFunction

        from fastopt.backends import triton_kernels

        if not isinstance(triton_kernels.step_kernel, InterpretedFunction):
            importlib.reload(triton_kernels)
        yield


def kernel_env(device: str, backend: str):
    """What a GPU backend needs to run on ``device``: on the CPU, Triton's interpreter or the
    CUDA C++ emulation build (tests/cuda_emulation.py); else nothing."""
    if device == "cpu" and backend == "triton":
        return triton_interpreter()
    if device == "cpu" and backend == "cuda":
        return cuda_emulation()
    return contextlib.nullcontext()


# (device, backend): CPU ones everywhere; where no GPU is present, Triton interpreted (on a
# GPU machine the interpreter would take over the compiled kernels in this process) and the
# CUDA C++ kernels emulated
TARGETS = [("cpu", b) for b in cpu_backends()]
if HAS_TRITON and not HAS_CUDA:
    TARGETS.append(("cpu", "triton"))
if EMULATE:
    TARGETS.append(("cpu", "cuda"))
if HAS_CUDA:
    TARGETS += [("cuda", b) for b in ("torch", "triton", "cuda") if backends.unavailable_reason(b) is None]


def _dtype(device: str, backend: str) -> torch.dtype:
    """float64 where the backend steps it (the reference's own rounding is then far below
    the tolerance), else fp32."""
    if backend in ("triton", "cuda"):  # fp32 kernels (and no GPU needed to say so)
        return torch.float32
    why = backends.get(backend).supports(presets.spec("adam"), torch.device(device), torch.float64)
    return torch.float64 if why is None else torch.float32


# fp32: a few steps of ~20 roundings each, the relative error of each below 2^-24 ~ 6e-8;
# cancellation (centered variance, p - step) is covered by measuring against |p| + |step|,
# that of the L2-decayed gradient by the error it can carry (l2_relative_error)
RTOL = {torch.float64: 1e-9, torch.float32: 2e-4}
# the decayed gradient enters a step twice (numerator, and the denominator's root), and its
# error stays in the state for the next steps: up to 3 steps, 8 times its relative error.
# From a relative error of 1 on, not even the sum's sign is known (nor whether it is 0, and
# a 0 / 0 step NaN): such an element is left out of the comparison from then on.
L2_ERROR_GROWTH = 8.0
EXAMPLES = settings().max_examples * 10

# hyperparameters at their edges, under fastopt's generic names
EDGE_HYPER = {
    "lr": (0.0, 1e-3, 0.1, 1e6),
    "mu": (0.0, 0.5, 0.9, 1.0 - 1e-7, 1.0),
    "nu": (0.0, 0.9, 0.999, 1.0 - 1e-9, 1.0),
    "eps": (0.0, 1e-8, 1.0),
    "weight_decay": (0.0, 0.1),
}
SPECIALS = (np.nan, np.inf, -np.inf, 0.0, -0.0)
LAYOUTS = ("contiguous", "empty", "zero_dim", "one", "transposed", "strided", "channels_last")
# structural faults, each with the error it must raise; "construct" faults at construction
FAULTS = {
    "sparse_grad": (RuntimeError, "sparse", "step"),
    "complex_param": (RuntimeError, "complex", "step"),
    "complex_grad": (RuntimeError, "complex", "step"),
    "mixed_dtype": (ValueError, "one dtype", "step"),
    "mixed_device": (ValueError, "one device", "step"),
    "grad_shape": (RuntimeError, "does not match", "step"),
    "grad_dtype": (RuntimeError, "does not match", "step"),
    "expanded_param": (ValueError, "overlap in memory", "step"),
    "duplicate_across_groups": (ValueError, "more than one parameter group", "construct"),
    "duplicate_in_group": (ValueError, "more than once", "construct"),
}


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    line = "hostile cases per backend: " + json.dumps(
        {f"{b}/{outcome}": n for (b, outcome), n in sorted(COUNTS.items())}
    )
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + line)
    out = os.environ.get("FASTOPT_RELIABILITY_COUNTS")
    if out:
        with open(out, "w") as f:
            json.dump({f"{b}/{o}": n for (b, o), n in COUNTS.items()}, f, indent=1)


# ---- building tensors ---------------------------------------------------------------------


def _values(rng: np.random.Generator, n: int, special_rate: float, huge: bool) -> np.ndarray:
    x = rng.standard_normal(n)
    if huge:  # finite values whose squares overflow float64 only in a few places
        x *= 10.0 ** rng.integers(-30, 30, n)
    hit = rng.random(n) < special_rate
    x[hit] = rng.choice(SPECIALS, int(hit.sum()))
    return x


def _shape(layout: str, rng: np.random.Generator) -> tuple[int, ...]:
    return {
        "empty": (0,) if rng.random() < 0.5 else (2, 0),
        "zero_dim": (),
        "one": (1,),
        "channels_last": tuple(int(s) for s in rng.integers(1, 4, 4)),
        "transposed": tuple(int(s) for s in rng.integers(1, 6, 2)),
    }.get(layout, tuple(int(s) for s in rng.integers(1, 6, rng.integers(1, 4))))


def _laid_out(
    values: np.ndarray, shape: tuple[int, ...], layout: str, dtype: torch.dtype, device
) -> torch.Tensor:
    """A tensor of ``shape`` holding ``values`` in C order, stored in ``layout``."""
    t = torch.tensor(values, dtype=dtype, device=device).reshape(shape)
    if layout == "transposed":
        return t.t().contiguous().t()  # same values, column-major storage
    if layout == "strided":
        wide = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype, device=device)
        wide[..., ::2] = t
        return wide[..., ::2]  # every other element of a wider buffer
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _snapshot(opt, params):
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state}
    return [p.detach().clone() for p in params], state


def _assert_untouched(opt, params, snap):
    values, states = snap
    for p, v in zip(params, values):
        torch.testing.assert_close(p.detach(), v, rtol=0, atol=0, equal_nan=True)
    now = {id(p): opt.state[p] for p in params if p in opt.state and opt.state[p]}
    assert set(now) == set(states), "the refused step created state"
    for key, before in states.items():
        assert set(now[key]) == set(before)
        for k, v in before.items():
            torch.testing.assert_close(now[key][k], v, rtol=0, atol=0, equal_nan=True)


def assert_same_as_reference(
    ours: np.ndarray, ref: np.ndarray, scale: np.ndarray, rtol: np.ndarray | float
) -> None:
    """NaN and +-Inf exactly where the reference has them; finite values close, measured
    against ``scale``: the largest param or change the element has seen (p - step cancels,
    and an earlier step's rounding stays as an absolute error). ``rtol``: per element, or
    one for all; an element whose rtol is inf is not compared (its sign is left open by its
    inputs' rounding, or its value lies beyond the dtype's range)."""
    rtol = np.broadcast_to(rtol, ref.shape)
    known = np.isfinite(rtol)
    ours, ref, scale, rtol = ours[known], ref[known], scale[known], rtol[known]
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg="NaN positions differ")
    np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(ref), err_msg="+Inf positions differ")
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref), err_msg="-Inf positions differ")
    fin = np.isfinite(ref)
    a, b = ours[fin], ref[fin]
    np.testing.assert_array_less(np.abs(a - b), rtol[fin] * scale[fin] + 1e-300, err_msg="values differ")


def l2_relative_error(
    grad: np.ndarray, param: np.ndarray, param_error: np.ndarray, weight_decay: float, unit: float
) -> np.ndarray:
    """The relative error the backends' g + weight_decay * p, the L2-decayed gradient, can
    carry: its terms rounded in the param's dtype (``unit``: its unit roundoff) and p's own
    difference from the reference so far (``param_error``), against the size of the sum.
    Where the two terms nearly cancel it exceeds the dtype's by far, and a step built from
    the sum (divided by a denominator built from it too, or times a large lr) carries it.
    0 where nothing is added, inf where the sum is 0."""
    if weight_decay == 0.0:
        return np.zeros_like(grad)
    with np.errstate(all="ignore"):
        spread = unit * (np.abs(grad) + weight_decay * np.abs(param)) + weight_decay * np.abs(param_error)
        rel = spread / np.abs(grad + weight_decay * param)
    return np.nan_to_num(rel, nan=0.0, posinf=np.inf)


# ---- the fuzzed case ----------------------------------------------------------------------


class Case:
    """Param groups of hostile tensors, their gradients per step and the expected outcome."""

    def __init__(self, data, device: str, backend: str):
        draw = data.draw
        self.device, self.backend = device, backend
        self.dtype = _dtype(device, backend)
        self.preset = draw(st.sampled_from(PRESET_NAMES), label="preset")
        self.hyper = {k: draw(st.sampled_from(v), label=k) for k, v in EDGE_HYPER.items()}
        self.steps = draw(st.integers(1, 3), label="steps")
        self.fault = draw(st.sampled_from([None] * 12 + sorted(FAULTS)), label="fault")
        self.rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
        self.special_rate = draw(st.sampled_from((0.0, 0.05, 0.3)), label="special_rate")
        # huge finite values only where the reference's float64 matches the dtype
        self.huge = self.dtype == torch.float64 and draw(st.booleans(), label="huge")
        n_groups = draw(st.integers(1, 2), label="groups")
        self.groups = []
        for _ in range(n_groups):
            layouts = draw(st.lists(st.sampled_from(LAYOUTS), min_size=1, max_size=4), label="layouts")
            self.groups.append([self._param(layout) for layout in layouts])
        # which params have a gradient at each step (None sometimes: left alone)
        self.has_grad = [
            [[self.rng.random() > 0.2 for _ in g] for g in self.groups] for _ in range(self.steps)
        ]
        if self.fault:  # the faulty param must meet good ones in its group
            self.has_grad[-1][-1] = [True] * len(self.groups[-1])
        self.grad_layouts = [
            [[self._grad_layout(layout) for _, layout, _ in g] for g in self.groups]
            for _ in range(self.steps)
        ]

    def _param(self, layout):
        shape = _shape(layout, self.rng)
        values = _values(self.rng, int(np.prod(shape)), self.special_rate / 3, self.huge)
        return _laid_out(values, shape, layout, self.dtype, self.device).requires_grad_(), layout, shape

    def _grad_layout(self, param_layout):
        if param_layout in ("empty", "zero_dim", "one"):
            return "contiguous"
        # autograd hands out grads laid out like the param, users do anything
        return self.rng.choice(["same", "contiguous", "expanded"])

    def grad(self, shape, layout, param):
        values = _values(self.rng, int(np.prod(shape)), self.special_rate, self.huge)
        if layout == "same":
            g = torch.empty_like(param)
            g.copy_(torch.tensor(values, dtype=self.dtype, device=self.device).reshape(shape))
            return g
        if layout == "expanded" and len(shape) >= 1 and shape[0] > 1:
            row = torch.tensor(values[: int(np.prod(shape[1:]))], dtype=self.dtype, device=self.device)
            row = row.reshape(1, *shape[1:])
            return row.expand(shape)  # every row the same memory: read-only use is fine
        return torch.tensor(values, dtype=self.dtype, device=self.device).reshape(shape)


def _build_params(case: Case) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """The optimizer's groups: the case's params plus the faulty extra param, if any (it
    gets a gradient only at the faulty step, so the earlier steps are good ones)."""
    groups = [[p for p, _, _ in g] for g in case.groups]
    extra = {
        "complex_param": lambda: torch.zeros(3, dtype=torch.complex128, device=case.device),
        "mixed_dtype": lambda: torch.zeros(
            3, dtype=torch.float32 if case.dtype == torch.float64 else torch.float64, device=case.device
        ),
        "mixed_device": lambda: torch.zeros(3, dtype=case.dtype, device="meta"),
        "expanded_param": lambda: torch.zeros(1, 3, dtype=case.dtype, device=case.device).expand(4, 3),
    }.get(case.fault)
    extras = [extra().requires_grad_()] if extra else []
    groups[-1].extend(extras)
    if case.fault == "duplicate_across_groups":
        groups.append([groups[0][0]])
    elif case.fault == "duplicate_in_group":
        groups[-1].append(groups[-1][0])
    return groups, extras


def _break_gradients(case: Case, extras: list[torch.Tensor]) -> None:
    """The faulty step's gradients: the extra param's, or a bad one for the last param."""
    for e in extras:
        e.grad = torch.zeros(e.shape, dtype=e.dtype, device=e.device)
    p = case.groups[-1][-1][0]
    if case.fault == "sparse_grad":
        p.grad = torch.zeros(p.shape, dtype=case.dtype, device=case.device).to_sparse()
        return
    bad = {
        "grad_shape": lambda: torch.zeros(p.numel() + 1, dtype=case.dtype, device=case.device),
        "grad_dtype": lambda: torch.zeros(p.shape, dtype=torch.float16, device=case.device),
        "complex_grad": lambda: torch.zeros(p.shape, dtype=torch.complex64, device=case.device),
    }.get(case.fault)
    if bad is not None:
        p.grad = torch.zeros_like(p)
        p.grad.data = bad()  # .data skips the setter's checks, as in-place user code can


def _no_first_step(spec, hyper) -> bool:
    """Whether the reference finds no first step (mu or nu = 1 under bias correction)."""
    try:
        Reference(spec, hyper, [np.zeros(1)]).step([np.ones(1)])
    except ArithmeticError:
        return True
    return False


def _run_case(case: Case) -> str:
    groups, extras = _build_params(case)
    exc, msg, when = FAULTS.get(case.fault, (None, None, None))

    def make():
        return presets.make(case.preset, [{"params": g} for g in groups], backend=case.backend, **case.hyper)

    spec = presets.spec(case.preset)
    if _no_first_step(spec, case.hyper):
        # refused as the group is added, before or after a construct-time fault is seen
        either = "define no step 1" + (f"|{msg}" if when == "construct" else "")
        with pytest.raises(ValueError, match=either):
            make()
        return "refused-hyper"
    if when == "construct":
        with pytest.raises(exc, match=msg):
            make()
        return "refused"
    opt = make()
    flat = [p for g in case.groups for p in g]
    refs = [Reference(spec, case.hyper, [p.detach().double().cpu().numpy().copy()]) for p, _, _ in flat]
    scales = [np.zeros(p.shape) for p, _, _ in flat]
    l2_errors = [np.zeros(p.shape) for p, _, _ in flat]  # the largest l2_relative_error so far
    # where the reference has left the dtype's range (an fp32 backend overflows to inf, and
    # inf - inf is NaN a step later): nothing to compare from then on
    largest = torch.finfo(case.dtype).max
    out_of_range = [np.zeros(p.shape, dtype=bool) for p, _, _ in flat]
    coupled_decay = spec.weight_decay == WeightDecay.L2
    for step in range(case.steps):
        for gi, g in enumerate(case.groups):
            for pi, (p, _, shape) in enumerate(g):
                has = case.has_grad[step][gi][pi]
                p.grad = case.grad(shape, case.grad_layouts[step][gi][pi], p) if has else None
        if when == "step" and step == case.steps - 1:
            _break_gradients(case, extras)
            everything = [p for p, _, _ in flat] + extras
            snap = _snapshot(opt, everything)
            with pytest.raises(exc, match=msg):
                opt.step()
            _assert_untouched(opt, everything, snap)
            return "refused"
        before = [p.detach().double().cpu().numpy().copy() for p, _, _ in flat]
        opt.step()
        for i, ((p, _, _), ref, start) in enumerate(zip(flat, refs, before)):
            if p.grad is None:
                np.testing.assert_array_equal(p.detach().double().cpu().numpy(), start)
                continue
            grad = p.grad.double().cpu().numpy()
            if coupled_decay:
                apart = np.nan_to_num(start - ref.params[0], nan=0.0, posinf=0.0, neginf=0.0)
                wd, unit = float(case.hyper["weight_decay"]), torch.finfo(case.dtype).eps / 2
                l2_errors[i] = np.maximum(l2_errors[i], l2_relative_error(grad, start, apart, wd, unit))
            ref.step([grad])
            b = ref.params[0]
            seen = np.nan_to_num(np.abs(start) + np.abs(b) + np.abs(b - start), nan=0.0, posinf=0.0)
            scales[i] = np.maximum(scales[i], seen)
            out_of_range[i] |= np.isfinite(b) & (np.abs(b) > largest)
            rtol = np.maximum(L2_ERROR_GROWTH * l2_errors[i], RTOL[case.dtype])
            rtol = np.where((l2_errors[i] >= 1.0) | out_of_range[i], np.inf, rtol)
            label = f"{case.device}-{case.backend}"
            COUNTS[(label, "elements-compared")] += int(np.isfinite(rtol).sum())
            COUNTS[(label, "elements-sign-open")] += int((l2_errors[i] >= 1.0).sum())
            COUNTS[(label, "elements-out-of-range")] += int(out_of_range[i].sum())
            assert_same_as_reference(p.detach().double().cpu().numpy(), b, scales[i], rtol)
    return "stepped"


@pytest.mark.parametrize("device,backend", TARGETS, ids=[f"{d}-{b}" for d, b in TARGETS])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_hostile_input_steps_like_the_reference_or_is_refused_untouched(device, backend, data):
    case = Case(data, device, backend)
    with kernel_env(device, backend), np.errstate(all="ignore"):  # NaN and Inf are the point here
        outcome = _run_case(case)
    COUNTS[(f"{device}-{backend}", outcome)] += 1


def test_fuzz_covers_every_available_backend():
    assert ("cpu", "torch") in TARGETS
    if backends.unavailable_reason("cpp") is None:
        assert ("cpu", "cpp") in TARGETS
    assert fastopt.Adam is presets.Adam


def test_reference_skips_zero_weight_decay_on_infinite_params():
    """torch.optim (and every backend) adds weight_decay * p only when weight_decay != 0, so
    an infinite param with a finite step stays infinite."""
    p = torch.tensor([np.inf, 1.0], dtype=torch.float64, requires_grad=True)
    p.grad = torch.ones(2, dtype=torch.float64)
    torch.optim.SGD([p], lr=0.1).step()
    ref = Reference(presets.spec("sgd"), {"lr": 0.1}, [np.array([np.inf, 1.0])])
    with np.errstate(invalid="ignore"):
        ref.step([np.ones(2)])
    np.testing.assert_array_equal(ref.params[0], p.detach().numpy())
