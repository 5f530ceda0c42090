"""Backends: each runs one fused step of a spec over a (device, dtype) group of tensors.

A backend is a module-level object with:

``name``
    "torch", "cpp", "triton" or "cuda".
``unavailable_reason() -> str | None``
    None when it can run here, else why not (import failed, no GPU, ...).
``supports(spec, device, dtype) -> str | None``
    None when it can run this spec on tensors of this device and dtype, else why not.
``step(spec, scalars, params, grads, hvps, state) -> None``
    One step, in place, for every tensor of the group. ``params`` and ``grads`` are lists
    of dense tensors on one device with one dtype; ``hvps`` is a list like ``grads`` when
    the spec's curvature is HVP, else None; ``state`` maps each of ``spec.state_roles`` to
    a list of tensors shaped like the params (see :mod:`fastopt.spec`). ``scalars`` is the
    step's :class:`~fastopt.scalars.StepScalars`. The per-element rule is
    :func:`fastopt.rule.update`.

    Storage options (chosen by the optimizer, not the rule): state tensors may have a
    dtype other than the params (fp32 state for bf16/fp16 params, or bf16 state for fp32
    params); math is always fp32 (fp64 for fp64 params). When ``state`` holds the role
    "master" (fp32 copies of low-precision params), the rule reads and writes the master
    as p and the param receives the master rounded to its own dtype.

    Optional keywords: the cpp, triton and cuda backends take ``unscale_grads`` (a float
    for cpp, a one-element device tensor for the others), a factor each gradient is written
    back times once the step has read it: a GradScaler's unscaled ``p.grad`` without a
    second pass. The gradients must then not share memory. Every backend takes ``seed``,
    the stochastic-rounding seed of bf16 state (an int in [0, 2**31); None: a fresh one
    from a process-wide counter): bf16 state of fp32 or fp16 weights (the params, or the
    master) is rounded stochastically, as Adam's second moment needs (its per-step change
    is below bf16's resolution, so rounding to nearest stalls it); ``stochastic_rounding=
    False`` rounds it to nearest even instead. triton and cuda also
    take the device hooks described in :mod:`fastopt.backends.triton_backend`.

Backends are looked up by name through :func:`get`; "auto" picks the fastest one that
supports the group (:func:`choose`).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import torch

from .. import tensor_lists
from ..spec import Spec


def capturing(device: torch.device) -> bool:
    """Whether work queued now on ``device`` is being captured in a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_hvps(
    backend: str,
    spec: Spec,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    hvps: list[torch.Tensor] | None,
) -> None:
    """ValueError unless ``hvps`` is what ``step`` needs: None for a gradient-curvature
    spec, else one product per param, shaped, typed and placed as its gradient (the
    kernels read it as one; a narrower or wider dtype would be read as garbage or past its
    end). The usual case is one pass (C++ where fastopt._host is built)."""
    if spec.curvature != 1:
        return
    if hvps is None:
        raise ValueError(f"fastopt {backend}: {spec.short()} uses Hessian-vector products: pass hvps")
    if len(hvps) != len(params):
        raise ValueError(f"fastopt {backend}: {len(hvps)} Hessian-vector products for {len(params)} params")
    if tensor_lists.all_like(hvps, grads):
        return
    for i, (g, h) in enumerate(zip(grads, hvps)):
        if h.shape != g.shape or h.dtype != g.dtype or h.device != g.device or h.layout != torch.strided:
            raise ValueError(
                f"fastopt {backend}: Hessian-vector product {i} is {tuple(h.shape)} {h.dtype} {h.layout} on "
                f"{h.device}; its gradient is {tuple(g.shape)} {g.dtype} on {g.device}"
            )


# name -> module path; imported lazily so that a missing extension never breaks import.
_MODULES = {
    "torch": "fastopt.backends.torch_backend",
    "cpp": "fastopt.backends.cpp_backend",
    "triton": "fastopt.backends.triton_backend",
    "cuda": "fastopt.backends.cuda_backend",
}
# Preference order of "auto" per device type.
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}

_loaded: dict[str, Any] = {}
_load_errors: dict[str, str] = {}
_warned: set[str] = set()


def _load(name: str) -> Any | None:
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose from {['auto', *_MODULES]}")
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # a broken optional dependency must not break fastopt
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = module
    return module


def unavailable_reason(name: str) -> str | None:
    """None if backend ``name`` can run on this machine, else the reason it cannot."""
    module = _load(name)
    if module is None:
        return _load_errors[name]
    return module.unavailable_reason()


def backends() -> dict[str, str | None]:
    """Every backend with None (available) or the reason it is not available."""
    return {name: unavailable_reason(name) for name in _MODULES}


def get(name: str) -> Any:
    """The backend called ``name``; raises RuntimeError with the reason if unavailable."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"fastopt backend {name!r} is not available: {reason}")
    return _loaded[name]


def choose(requested: str, spec: Spec, device: torch.device, dtype: torch.dtype) -> Any:
    """The backend to run a group: ``requested`` itself, or for "auto" the first backend in
    the device's preference order that is available and supports the group."""
    if requested != "auto":
        backend = get(requested)
        why = backend.supports(spec, device, dtype)
        if why is not None:
            raise ValueError(f"fastopt backend {requested!r} cannot run this group: {why}")
        return backend
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        reason = unavailable_reason(name)
        if reason is not None:
            if name == "cpp" and name not in _warned:
                _warned.add(name)
                warnings.warn(
                    f"fastopt: the C++ backend is unavailable ({reason}); using the torch backend",
                    RuntimeWarning,
                    stacklevel=3,
                )
            continue
        backend = _loaded[name]
        if backend.supports(spec, device, dtype) is None:
            return backend
    return get("torch")
