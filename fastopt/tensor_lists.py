"""A step's per-tensor host work over lists of tensors: addresses, sizes, layout checks.

Each function answers for a whole list in one C++ pass where the extension
``fastopt._host`` is built (a few ns per tensor), else in Python (one attribute call per
tensor, 35 to 70 ns). The answers are the same either way; the extension also hands
anything it cannot read (tensor subclasses such as DTensor) back to the Python path. It
reads tensor internals through torch's inlined C++ accessors, so it is used only with the
torch version it was compiled against: after a torch upgrade, Python does the work until
fastopt is rebuilt.
"""

from __future__ import annotations

import operator
from itertools import repeat
from typing import Any

import numpy as np
import torch


def _usable(module: Any) -> Any:
    """``module`` if it was compiled against the running torch's version, else None (its
    inlined readers of tensor internals assume that version's layouts)."""
    built_for = getattr(module, "TORCH_VERSION", None)
    return module if built_for == torch.__version__.split("+")[0] else None


try:
    from . import _host as _built
except Exception:  # not built, or not loadable: Python does the work
    _built = None
_host = _usable(_built) if _built is not None else None

_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_is_contiguous = torch.Tensor.is_contiguous
_grad = operator.attrgetter("grad")
_layout, _dtype, _device, _shape = (operator.attrgetter(a) for a in ("layout", "dtype", "device", "shape"))


def native() -> bool:
    """Whether the C++ extension does the work here."""
    return _host is not None


def grads(params: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Each param's ``.grad`` if every param has one, else None."""
    if _host is not None and type(params) is list:
        found = _host.grads(params)
        if found is not None:
            return found
    found = list(map(_grad, params))
    return found if all(map(operator.is_not, found, repeat(None))) else None


def _int64_each(name: str, method: Any, tensors: list[torch.Tensor]) -> np.ndarray:
    """``method`` of each tensor as an int64 array: ``_host.<name>`` where it answers."""
    if _host is not None:
        raw = getattr(_host, name)(tensors)
        if raw is not None:
            return np.frombuffer(raw, dtype=np.int64)
    return np.fromiter(map(method, tensors), dtype=np.int64, count=len(tensors))


def addresses(tensors: list[torch.Tensor]) -> np.ndarray:
    """Each tensor's ``data_ptr()``, as an int64 array."""
    return _int64_each("addresses", _data_ptr, tensors)


def numels(tensors: list[torch.Tensor]) -> np.ndarray:
    """Each tensor's ``numel()``, as an int64 array."""
    return _int64_each("numels", _numel, tensors)


def cpu_addresses(tensors: list[torch.Tensor], sizes: np.ndarray | None) -> list[int] | None:
    """Each tensor's ``data_ptr()`` when every tensor is a contiguous CPU tensor with the
    first one's dtype and, unless ``sizes`` is None, ``sizes[i]`` elements; None when one is
    not, or where only Python could tell (the caller then looks at them one by one). The
    CPU backend's checks of one list in one C++ pass."""
    fast = getattr(_host, "cpu_addresses", None)
    if fast is None or type(tensors) is not list:
        return None
    return fast(tensors, None if sizes is None else sizes.tobytes())


def all_plain(lists: list[list[torch.Tensor]]) -> bool | None:
    """Whether every item of every list is a torch.Tensor or Parameter, no subclass (so no
    DTensor); None where only Python could tell (the caller then looks at the types)."""
    if _host is None:
        return None
    return all(map(_host.all_plain, lists))


def _all_same(name: str, key: Any, tensors: list[torch.Tensor]) -> bool:
    """Whether ``key`` is the same for every tensor: ``_host.<name>`` where it answers."""
    if _host is not None:
        answer = getattr(_host, name)(tensors)
        if answer is not None:
            return answer
    return len(set(map(key, tensors))) <= 1


def one_device(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is on the device of the first."""
    return _all_same("one_device", _device, tensors)


def one_dtype(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor has the dtype of the first."""
    return _all_same("one_dtype", _dtype, tensors)


def all_contiguous(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is contiguous."""
    if _host is not None:
        answer = _host.all_contiguous(tensors)
        if answer is not None:
            return answer
    return all(map(_is_contiguous, tensors))


def all_like(tensors: list[torch.Tensor], like: list[torch.Tensor]) -> bool:
    """Whether every tensor is strided with the dtype, device and shape of its twin in
    ``like`` (a gradient of its parameter)."""
    if len(tensors) != len(like):
        return False
    if _host is not None:
        index = _host.first_mismatch(tensors, like)
        if index is not None:
            return index < 0
    # shapes are compared one pair at a time: a list of them all would be thousands of
    # tuples alive at once, which the garbage collector promotes and later sweeps with a
    # full collection (a third of the step time at 10,000 params)
    return (
        set(map(_layout, tensors)) == {torch.strided}
        and all(map(operator.is_, map(_dtype, tensors), map(_dtype, like)))
        and all(map(operator.eq, map(_device, tensors), map(_device, like)))
        and all(map(operator.eq, map(_shape, tensors), map(_shape, like)))
    )


def disjoint(lists: list[list[torch.Tensor]]) -> bool:
    """Whether no two tensors of these lists share memory. The tensors must be contiguous,
    and each list's of one dtype (a group's gradients); empty tensors share nothing."""
    starts, ends = [], []
    for tensors in lists:
        if tensors:
            begin = addresses(tensors)
            starts.append(begin)
            ends.append(begin + numels(tensors) * tensors[0].element_size())
    if not starts:
        return True
    start, end = np.concatenate(starts), np.concatenate(ends)
    used = end > start
    start, end = start[used], end[used]
    order = np.argsort(start, kind="stable")
    start, end = start[order], end[order]
    # sorted by start, each range must begin at or after the end of every range before it
    return bool(np.all(start[1:] >= np.maximum.accumulate(end[:-1])))
