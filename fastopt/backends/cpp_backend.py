"""The C++ CPU backend: one fused multi-threaded call to ``fastopt._C`` per group and step.

The extension works on raw addresses, so this module's per-step work is collecting each
role's ``data_ptr()``s and checking sizes, dtypes and layout (a wrong size would make the
kernel write out of bounds). Non-contiguous tensors are stepped through contiguous copies.
"""

from __future__ import annotations

import operator
import os

import numpy as np
import torch

from .. import tensor_lists
from ..rule import switches
from ..scalars import StepScalars
from ..spec import Spec
from . import check_hvps
from . import triton_backend as _seeds  # the stochastic-rounding seeds every backend shares

name = "cpp"
# Non-contiguous tensors are handled here (through contiguous copies), so the optimizer
# layer need not check every tensor's layout a second time.
accepts_strided = True

try:
    from .. import _C
except Exception as exc:  # the extension is optional: report why, never fail the import
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None

# Order of the roles in a _C.step call, and where each comes from.
_STATE_ROLES = ("m", "v", "vmax", "gavg", "u")
_DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
}
_dtype = operator.attrgetter("dtype")
_switch_cache: dict[tuple, int] = {}
_support_cache: dict[tuple[Spec, torch.dtype], str | None] = {}


def unavailable_reason() -> str | None:
    if _C is None:
        return (
            f"the extension fastopt._C could not be imported ({_IMPORT_ERROR}); "
            "build it with `python -m pip install --no-build-isolation -e .`"
        )
    return None


def _pack(spec: Spec, scalars: StepScalars) -> int:
    """rule.switches() packed into the integer the kernels are templated on."""
    key = (
        spec,
        scalars.use_denominator,
        scalars.weight_decay != 0.0,
        scalars.decay_factor != 1.0,
        scalars.grad_scale != 1.0,
    )
    code = _switch_cache.get(key)
    if code is None:
        shifts = _C.SWITCH_SHIFTS
        code = sum(int(value) << shifts[key_] for key_, value in switches(spec, scalars).items())
        _switch_cache[key] = code
    return code


def supports(spec: Spec, device: torch.device, dtype: torch.dtype) -> str | None:
    if _C is None:
        return unavailable_reason()
    if device.type != "cpu":
        return f"the C++ backend runs on CPU tensors, not {device.type}"
    if dtype not in _DTYPE_CODES:
        return f"dtype {dtype} is not one of {sorted(str(d) for d in _DTYPE_CODES)}"
    key = (spec, dtype)
    if key not in _support_cache:
        _support_cache[key] = _kernel_missing(spec, dtype)
    return _support_cache[key]


def _kernel_missing(spec: Spec, dtype: torch.dtype) -> str | None:
    # every variant a step of this spec can ask for: with/without L2 decay, the gradient
    # scale, decoupled decay, and RAdam's steps without the denominator
    uses = (True, False) if spec.extra == 2 else (spec.denominator != 0,)
    for use in uses:
        for wd in (0.0, 0.1):
            scalars = StepScalars(1.0, wd, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, use)
            if not _C.has_kernel(_pack(spec, scalars), dtype == torch.float64):
                return f"no C++ kernel is compiled for {spec.short()}"
    return None


def _num_threads() -> int:
    # FASTOPT_NUM_THREADS overrides torch's intra-op thread count
    env = os.environ.get("FASTOPT_NUM_THREADS")
    if not env:
        return torch.get_num_threads()
    try:
        threads = int(env)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"FASTOPT_NUM_THREADS must be a positive integer, got {env!r}")
    return threads


class _Role:
    """One role's tensors as the extension sees them, via contiguous copies if needed."""

    __slots__ = ("ptrs", "code", "copies", "written")

    def __init__(
        self, role: str, tensors: list[torch.Tensor], sizes: np.ndarray | None, written: bool = True
    ) -> None:
        # sizes is None for the params, whose sizes these are
        if sizes is not None and len(tensors) != len(sizes):
            raise ValueError(
                f"fastopt cpp backend: {len(tensors)} tensors of role {role!r} for {len(sizes)} params"
            )
        self.written = written
        # (original, contiguous copy): the copies must outlive the call, the kernel only
        # sees their addresses
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        # the usual case (contiguous CPU tensors of one dtype, the params' sizes) in one C++ pass
        dtype = tensors[0].dtype if tensors else None
        fast = tensor_lists.cpu_addresses(tensors, sizes) if dtype in _DTYPE_CODES else None
        if fast is not None:
            self.code, self.ptrs = _DTYPE_CODES[dtype], fast
            return
        # else whole-list passes (C++ where fastopt._host is built) that find what is wrong
        if sizes is not None and not np.array_equal(tensor_lists.numels(tensors), sizes):
            raise ValueError(f"fastopt cpp backend: tensors of role {role!r} differ in size from the params")
        dtypes = set(map(_dtype, tensors))
        dtype = next(iter(dtypes))
        if len(dtypes) != 1 or dtype not in _DTYPE_CODES:
            raise ValueError(f"fastopt cpp backend: role {role!r} needs one supported dtype, got {dtypes}")
        if tensors[0].device.type != "cpu" or not tensor_lists.one_device(tensors):
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(f"fastopt cpp backend: role {role!r} is on {', '.join(devices)}, not the CPU")
        self.code = _DTYPE_CODES[dtype]
        if not tensor_lists.all_contiguous(tensors):
            stepped = []
            for t in tensors:
                if not t.is_contiguous():
                    c = t.contiguous()
                    self.copies.append((t, c))
                    t = c
                stepped.append(t)
            tensors = stepped
        self.ptrs = tensor_lists.addresses(tensors).tolist()

    def write_back(self) -> None:
        if self.written:
            for original, copy in self.copies:
                original.copy_(copy)


def step(
    spec: Spec,
    scalars: StepScalars,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    hvps: list[torch.Tensor] | None,
    state: dict[str, list[torch.Tensor]],
    *,
    unscale_grads: float | None = None,
    seed: int | None = None,
    stochastic_rounding: bool | None = None,
) -> None:
    """One fused step of ``spec`` over the group, in place (see :mod:`fastopt.backends`).

    ``unscale_grads``: a factor (AMP's inverse loss scale) that each gradient is written back
    times once the step has read it, in the same pass; the gradients must not share memory.
    ``seed``: the stochastic rounding of bf16 state (see :mod:`fastopt.backends`); the
    random bits depend on the seed, the tensor's place in the list, the role and the
    element only, not on the threads. ``stochastic_rounding=False`` rounds bf16 state to
    nearest even instead (as the GPU backends' flag).
    """
    if not params:
        return
    if _C is None:
        raise RuntimeError(unavailable_reason())
    check_hvps("cpp backend", spec, params, grads, hvps)
    missing = [r for r in spec.state_roles if r not in state]
    if missing:
        raise KeyError(f"fastopt cpp backend: state roles {missing} missing for {spec.short()}")
    sizes = tensor_lists.numels(params)
    written = unscale_grads is not None
    roles = [_Role("params", params, None), _Role("grads", grads, sizes, written=written)]
    roles.append(_Role("hvps", hvps, sizes, written=False) if hvps is not None else None)
    roles += [_Role(r, state[r], sizes) if r in state else None for r in _STATE_ROLES]
    roles.append(_Role("master", state["master"], sizes) if "master" in state else None)
    _C.step(
        _pack(spec, scalars),
        scalars,
        sizes.tolist(),
        [r.ptrs if r is not None else None for r in roles],
        [r.code if r is not None else 0 for r in roles],
        _num_threads(),
        None if unscale_grads is None else float(unscale_grads),
        _rounding_key(seed, state) if stochastic_rounding is not False else 0,
    )
    for r in roles:
        if r is not None and r.copies:
            r.write_back()


def _rounding_key(seed: int | None, state: dict[str, list[torch.Tensor]]) -> int:
    """The extension's rounding seed: odd (never 0, which rounds to nearest) where some
    state is bf16, else 0 (no seed is drawn from the counter for nothing)."""
    if seed is not None:
        seed = _seeds.check_seed(seed)
    if not any(ts and ts[0].dtype == torch.bfloat16 for r, ts in state.items() if r != "master"):
        return 0
    return (_seeds._next_seed() if seed is None else seed) * 2 + 1


def sum_of_squares(tensors: list[torch.Tensor]) -> float | None:
    """The sum of the squares of every element of ``tensors``, in float64, in one threaded
    call (the global norm of gradient clipping); the result does not depend on the thread
    count. None where the extension cannot take them: not built, not all contiguous CPU
    tensors of one supported dtype (the caller then sums another way)."""
    if _C is None or not tensors:
        return None
    dtypes = set(map(_dtype, tensors))
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPE_CODES:
        return None
    if tensors[0].device.type != "cpu" or not tensor_lists.one_device(tensors):
        return None
    if not tensor_lists.all_contiguous(tensors):
        return None
    code = _DTYPE_CODES[tensors[0].dtype]
    sizes, ptrs = tensor_lists.numels(tensors).tolist(), tensor_lists.addresses(tensors).tolist()
    return _C.sum_of_squares(code, sizes, ptrs, _num_threads())
