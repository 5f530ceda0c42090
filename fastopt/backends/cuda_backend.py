"""The CUDA C++ backend: ``fastopt._cuda`` (csrc/cuda_step.cu), one multi-tensor launch per group.

The extension is optional (built by build_cuda.py where nvcc and a CUDA torch exist) and
imported on first use. It reads the same device-side pointer and chunk table as the Triton
backend and takes the same optional hooks in :func:`step` (``grad_scale_ptr``, ``found_inf``,
``scalars_tensor``, ``stochastic_rounding``, ``seed``, ``unscale_grads``); see
:mod:`fastopt.backends.triton_backend`.

Kernels exist for canonical switch codes only: maximize, the gradient scale and decoupled
decay are folded into the scalars with exact arithmetic, and SUM and MEAN denominators
share a kernel, so a few hundred kernels cover the whole family.

A test build of the extension (``python build_cuda.py --emulate``, ``EMULATED`` true) runs
the same kernel source on the CPU (csrc/cuda_emulation.h); with it this backend steps CPU
tensors, on device 0 and stream 0, which is how CI checks the kernels without a GPU.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ..rule import switches
from ..scalars import StepScalars
from ..spec import Spec
from . import check_hvps
from . import triton_backend as _tables

name = "cuda"

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SLOTS = ("h", "m", "v", "vmax", "gavg", "u", "master")  # order of the kernel's slot array
# Elements per block: 16 iterations of 256 threads x 4 elements.
CHUNK = 16384

_ext: Any = None
_ext_error: str | None = None


def _module() -> Any | None:
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module("fastopt._cuda")
        except ImportError as exc:
            _ext_error = f"fastopt._cuda is not built ({exc}); see build_cuda.py"
    return _ext


def _emulated() -> bool:
    """Whether the extension in use is the CPU-emulation test build."""
    return bool(getattr(_ext, "EMULATED", False))


def unavailable_reason() -> str | None:
    """None when the extension is built and a CUDA device is present (or the extension is
    the emulation build, which needs none)."""
    if _emulated():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device"
    if _module() is None:
        return _ext_error
    return None


def _kernel_device() -> str:
    return "cpu" if _emulated() else "cuda"


def _device_and_stream(device: torch.device) -> tuple[int, int]:
    """The extension's device index and stream handle for tensors on ``device``."""
    if _emulated():
        return 0, 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(device).cuda_stream


def canonical_switches(spec: Spec, scalars: StepScalars, capturable: bool = False) -> dict[str, int]:
    """The switches of the compiled kernel that runs ``spec`` (see the module docstring).

    With ``capturable`` the switches must hold for every later step too: the denominator is
    always on (RAdam's kernel then reads whether to use it from the device scalars).
    """
    sw = switches(spec, scalars)
    sw["DENOMINATOR"] = min(sw["DENOMINATOR"], 1)
    sw["DECOUPLED"] = 1
    sw["MAXIMIZE"] = 0
    sw["SCALE_GRAD"] = 1
    if sw["DENOMINATOR"] == 0:
        sw["USE_DENOMINATOR"] = 0
    elif capturable:
        sw["USE_DENOMINATOR"] = 1
    return sw


def switch_code(sw: dict[str, int]) -> int:
    """Pack switches as csrc/update_math.h's SwitchShift does (shifts read from the module)."""
    shifts = _module().SWITCH_SHIFTS
    return sum(int(value) << shifts[key] for key, value in sw.items())


def supports(spec: Spec, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when this backend runs ``spec`` on ``device``/``dtype`` params."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if torch.device(device).type != _kernel_device():
        if _emulated():
            return f"the CUDA backend's emulation build runs on CPU tensors, not {device}"
        return f"the CUDA backend runs on CUDA tensors, not {device}"
    if dtype not in _PARAM_DTYPES:
        return f"the CUDA backend steps fp32, bf16 and fp16 params, not {dtype}"
    probe = StepScalars(1.0, 1.0, 1.0, 1.0, 0.9, 0.1, 1.0, 0.0, 0.9, 0.1, 1.0, 1e-8, True)
    for l2 in (0.0, 1.0):
        code = switch_code(canonical_switches(spec, probe._replace(weight_decay=l2)))
        if not _module().has_kernel(code):
            return "no CUDA kernel is compiled for this spec"
    return None


def step(
    spec: Spec,
    scalars: StepScalars,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    hvps: list[torch.Tensor] | None,
    state: dict[str, list[torch.Tensor]],
    *,
    grad_scale_ptr: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    scalars_tensor: torch.Tensor | None = None,
    stochastic_rounding: bool | None = None,
    seed: int | None = None,
    unscale_grads: torch.Tensor | None = None,
) -> None:
    """One fused step; arguments as :func:`fastopt.backends.triton_backend.step`.

    ``seed`` (an int in [0, 2**31), else ValueError; None: the shared process-wide counter)
    reaches the kernel as ``2 * seed + 1``: the extension's seed argument both switches
    stochastic rounding on (nonzero) and keys the hash, so the map must never give 0. An
    element's bits hash that key, its tensor's index in the table (shifted left 40), its
    state role (shifted left 58) and its index in its tensor. With ``scalars_tensor`` the
    kernel makes the key, the same way, from the tensor's seed field instead (the argument
    only switches rounding on), and passing ``seed`` too is a ValueError.
    """
    if seed is not None:
        seed = _tables.check_seed(seed)
        if scalars_tensor is not None:
            raise ValueError(
                "fastopt cuda: with scalars_tensor the rounding seed is read from that tensor: "
                "pass it to scalars_tensor(seed=), not to step()"
            )
    if not params:
        return
    device = params[0].device
    why = supports(spec, device, params[0].dtype)
    if why is not None:
        raise ValueError(why)
    check_hvps("cuda", spec, params, grads, hvps)
    ext = _module()
    p_dtype, g_dtype = params[0].dtype, grads[0].dtype
    roles = [r for r in ("m", "v", "vmax", "gavg", "u") if r in spec.state_roles]
    if any(r not in state for r in roles):
        raise ValueError(f"fastopt cuda: state roles {[r for r in roles if r not in state]} are missing")
    s_dtypes = {state[r][0].dtype for r in roles}
    if len(s_dtypes) > 1:
        raise ValueError("fastopt cuda: every state role of a group must have one dtype")
    s_dtype = s_dtypes.pop() if s_dtypes else p_dtype
    if s_dtype not in (p_dtype, torch.float32, torch.bfloat16) or g_dtype not in _PARAM_DTYPES:
        raise ValueError(f"fastopt cuda: state dtype {s_dtype} is not the param dtype, fp32 or bf16")
    master = state.get("master")
    if master is not None and (p_dtype == torch.float32 or master[0].dtype != torch.float32):
        raise ValueError("fastopt cuda: master weights are fp32 copies of fp16/bf16 params")
    for t, what in (
        (grad_scale_ptr, "grad_scale_ptr"),
        (found_inf, "found_inf"),
        (unscale_grads, "unscale_grads"),
    ):
        if t is not None and (t.dtype != torch.float32 or t.device != device):
            raise ValueError(f"fastopt cuda: {what} must be a float32 tensor on {device}")
    if scalars_tensor is not None and (
        scalars_tensor.dtype != torch.float64 or scalars_tensor.device != device
    ):
        raise ValueError("fastopt cuda: scalars_tensor must come from triton_backend.scalars_tensor()")
    if stochastic_rounding is None:
        weights_dtype = torch.float32 if master is not None else p_dtype
        stochastic_rounding = s_dtype == torch.bfloat16 and weights_dtype != torch.bfloat16
    sr = bool(stochastic_rounding) and s_dtype == torch.bfloat16

    arrays = [params, grads]
    slots = []
    by_role = {"h": hvps if spec.curvature == 1 else None, **{r: state[r] for r in roles}, "master": master}
    for role in _SLOTS:
        ts = by_role.get(role)
        slots.append(len(arrays) if ts is not None else -1)
        if ts is not None:
            arrays.append(ts)
    names = ["param", "grad"] + [r for r in _SLOTS if by_role.get(r) is not None]
    table = _tables.pointer_table(arrays, names, CHUNK, device)
    if table.n_chunks == 0:
        return

    sw = canonical_switches(spec, scalars, capturable=scalars_tensor is not None)
    host = list(scalars[:12])
    if spec.maximize:
        host[3] = -host[3]  # g * -s == -(g * s) exactly
    dt = ext.DTYPES
    index, stream = _device_and_stream(device)
    ext.step(
        code=switch_code(sw),
        device=index,
        stream=stream,
        ptrs=table.ptrs.data_ptr(),
        sizes=table.sizes.data_ptr(),
        chunks=table.chunks.data_ptr(),
        n_chunks=table.n_chunks,
        na=len(arrays),
        slots=slots,
        dtypes=[dt[str(d).removeprefix("torch.")] for d in (p_dtype, g_dtype, s_dtype)],
        aligned=table.aligned,
        chunk=CHUNK,
        scalars=[float(x) for x in host],
        device_scalars=scalars_tensor.data_ptr() if scalars_tensor is not None else 0,
        inv_scale=grad_scale_ptr.data_ptr() if grad_scale_ptr is not None else 0,
        found_inf=found_inf.data_ptr() if found_inf is not None else 0,
        unscale=unscale_grads.data_ptr() if unscale_grads is not None else 0,
        maximize=spec.maximize,
        decoupled=spec.weight_decay == 1,
        seed=_rounding_key(seed) if sr else 0,
    )


def _rounding_key(seed: int | None) -> int:
    """The extension's seed argument for a rounding seed in [0, 2**31) (None: the next of the
    shared counter): odd, so never the 0 that means round to nearest, and one to one."""
    return (_tables._next_seed() if seed is None else seed) * 2 + 1


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``grads`` together as a one-element fp32 device tensor: one launch
    per dtype present, deterministic, no host sync (see triton_backend.global_grad_norm)."""
    if not grads:
        raise ValueError("global_grad_norm needs at least one tensor")
    reason = unavailable_reason()
    if reason is not None:
        raise ValueError(reason)
    device = grads[0].device
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    norms = [_norm_one_dtype(ts, device) for ts in by_dtype.values()]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.cat(norms)).reshape(1)


def _norm_one_dtype(ts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    ext = _module()
    if ts[0].dtype not in _PARAM_DTYPES:
        raise ValueError(f"global_grad_norm: unsupported dtype {ts[0].dtype}")
    table = _tables.pointer_table([ts], ["grad"], CHUNK, device)
    if table.n_chunks == 0:
        return torch.zeros(1, dtype=torch.float32, device=device)
    out = torch.empty(1, dtype=torch.float32, device=device)
    partials, counter = _tables.norm_buffers(device, table.n_chunks)
    index, stream = _device_and_stream(device)
    ext.global_norm(
        device=index,
        stream=stream,
        ptrs=table.ptrs.data_ptr(),
        sizes=table.sizes.data_ptr(),
        chunks=table.chunks.data_ptr(),
        n_chunks=table.n_chunks,
        chunk=CHUNK,
        dtype=ext.DTYPES[str(ts[0].dtype).removeprefix("torch.")],
        partials=partials.data_ptr(),
        counter=counter.data_ptr(),
        out=out.data_ptr(),
    )
    return out
