"""torch.distributed support: DTensor parameters (FSDP2, tensor parallel) in fused steps.

Every rule of the family is elementwise, so stepping a DTensor parameter is stepping its
local shard with the shards of its gradient and state, provided all of them are laid out
alike (same device mesh, same placements). :func:`local_tensors` checks that and unwraps
the DTensors, so that backends, which work on raw storage, only ever see plain tensors.
Under FSDP2 (gradients sharded like their params) that involves no collective, no copy
and no host sync.

The one global quantity, the gradient norm of ``max_grad_norm`` clipping, is computed by
:func:`grad_norm` from local squared norms summed over the mesh dimensions a gradient is
sharded on: one all-reduce per (mesh, sharded dims) group, as
``torch.nn.utils.clip_grad_norm_`` would get from DTensor arithmetic.

DDP and ``ZeroRedundancyOptimizer`` hand the optimizer plain tensors and need nothing here.
"""

from __future__ import annotations

import operator
import sys
from collections import defaultdict
from typing import Any

import torch

from . import tensor_lists

_DTENSOR_MODULE = "torch.distributed.tensor"


def _dtensor_cls() -> type | None:
    """The DTensor class if its module is loaded, else None.

    A DTensor cannot exist before torch.distributed.tensor has been imported, and importing
    it costs seconds; single-device programs therefore never pay for DTensor support.
    """
    module = sys.modules.get(_DTENSOR_MODULE)
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a :class:`torch.distributed.tensor.DTensor`."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def _same_layout(a: Any, b: Any) -> bool:
    mesh_a, mesh_b = a.device_mesh, b.device_mesh
    return (mesh_a is mesh_b or mesh_a == mesh_b) and tuple(a.placements) == tuple(b.placements)


def _describe(t: Any) -> str:
    if is_dtensor(t):
        return f"a DTensor with placements {tuple(t.placements)} on {t.device_mesh}"
    return "a plain tensor"


def local_tensors(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    hvps: list[torch.Tensor] | None,
    state: dict[str, list[torch.Tensor]],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None, dict[str, list[torch.Tensor]]]:
    """The backend's arguments with every DTensor replaced by its local shard.

    A gradient (or Hessian-vector product) whose placements differ from its parameter's
    (a Partial gradient of a replicated tensor-parallel weight) is first redistributed to
    the parameter's placements, as torch.optim's DTensor arithmetic would do implicitly.
    State must already share its parameter's layout (:func:`adopt_state` arranges that),
    since a mismatch would let a backend write past a shard.

    Raises:
        TypeError: a state tensor is laid out differently from its parameter, or a plain
            parameter has a DTensor gradient or state.
    """
    dtensor = _dtensor_cls()
    if dtensor is None:  # no DTensor can exist: nothing to unwrap
        return params, grads, hvps, state
    # the usual case, no DTensor anywhere: plain tensors (one C++ pass each), or seen from
    # the few distinct types alone
    lists = [params, grads, *state.values()] if hvps is None else [params, grads, hvps, *state.values()]
    if tensor_lists.all_plain(lists):
        return params, grads, hvps, state
    types = set().union(*(map(type, ts) for ts in lists))
    if not any(issubclass(tp, dtensor) for tp in types):
        return params, grads, hvps, state
    local_params = [p._local_tensor if isinstance(p, dtensor) else p for p in params]
    local_grads = _follow(params, grads, dtensor, "the gradient", True)
    local_hvps = None if hvps is None else _follow(params, hvps, dtensor, "the Hessian-vector product", True)
    local_state = {
        role: _follow(params, ts, dtensor, f"optimizer state {role!r}", False) for role, ts in state.items()
    }
    return local_params, local_grads, local_hvps, local_state


def _follow(
    params: list[torch.Tensor], ts: list[torch.Tensor], dtensor: type, what: str, movable: bool
) -> list[torch.Tensor]:
    """The local shards of ``ts``, each checked against its param's layout.

    This runs for every tensor of every step, so the common cases (both plain; both
    DTensors with one spec, or one mesh object and equal placements) only read attributes;
    ``_spec`` and ``_local_tensor`` are the attributes FSDP2 itself reads.
    """
    out = []
    for p, t in zip(params, ts):
        if isinstance(t, dtensor):
            if isinstance(p, dtensor):
                spec_t, spec_p = t._spec, p._spec
                if spec_t is spec_p or (
                    spec_t.mesh is spec_p.mesh and spec_t.placements == spec_p.placements
                ):
                    out.append(t._local_tensor)
                    continue
        elif not isinstance(p, dtensor):  # plain param, plain tensor (DDP, ZeRO)
            out.append(t)
            continue
        out.append(_follow_slow(p, t, dtensor, what, movable))
    return out


def _follow_slow(p: torch.Tensor, t: torch.Tensor, dtensor: type, what: str, movable: bool) -> torch.Tensor:
    if not isinstance(p, dtensor):
        if isinstance(t, dtensor):
            raise TypeError(f"{what} of a plain parameter is {_describe(t)}")
        return t
    if not isinstance(t, dtensor):
        raise TypeError(f"{what} of a DTensor parameter is a plain tensor")
    if not _same_layout(p, t):
        if not movable:
            raise TypeError(f"{what} is {_describe(t)} but its parameter is {_describe(p)}")
        t = t.redistribute(p.device_mesh, p.placements)
    return t._local_tensor


def adopt_state(p: torch.Tensor, state: dict[str, Any]) -> None:
    """Give a DTensor parameter's state tensors the parameter's layout, in place.

    Needed after ``load_state_dict`` of a checkpoint whose state is not laid out like the
    parameters: an unsharded one (saved from a single device, or by
    ``get_state_dict(..., options=StateDictOptions(full_state_dict=True))``) holds plain
    tensors of the full shape; each rank keeps its own shard of those, without
    communication. DTensor state on the same mesh with other placements is redistributed.
    Scalars (``step``) and tensors of any other shape are left alone.
    """
    if not is_dtensor(p):
        return
    from torch.distributed.tensor import distribute_tensor

    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape != p.shape:
            continue
        if not is_dtensor(value):
            # src_data_rank=None: every rank holds the full tensor and slices its own shard
            state[key] = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
        elif not _same_layout(value, p):
            state[key] = value.redistribute(p.device_mesh, p.placements)


def grad_norm(grads: list[torch.Tensor]) -> float:
    """The L2 norm of all ``grads`` together, as ``torch.nn.utils.clip_grad_norm_`` has it.

    Plain tensors count as they are (under DDP and ZeRO every rank holds the full, already
    averaged gradient). A DTensor counts as the full tensor it represents: the squared
    norms of the local shards are summed over the mesh dimensions it is sharded on, with
    one all-reduce per (mesh, sharded dimensions) group; a Partial gradient is reduced
    first. Every rank of a mesh must call this with the same list of DTensors. Sums are
    taken in float64; the result is read on the host once.
    """
    dtensor = _dtensor_cls()
    plain: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    sharded: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        if dtensor is None or not isinstance(g, dtensor):
            plain[g.device].append(g)
            continue
        if any(pl.is_partial() for pl in g.placements):
            from torch.distributed.tensor import Replicate

            g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
        dims = tuple(i for i, pl in enumerate(g.placements) if pl.is_shard())
        sharded[(g.device_mesh, dims)].append(g._local_tensor)

    parts = [_squared_sum(ts) for ts in plain.values()]
    for (mesh, dims), locals_ in sharded.items():
        total = _squared_sum(locals_)
        for dim in dims:
            torch.distributed.all_reduce(total, group=mesh.get_group(dim))
        parts.append(total)
    return sum(float(t) for t in parts) ** 0.5


def _squared_sum(ts: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squared L2 norms of tensors on one device, as a float64 device scalar."""
    if ts[0].device.type == "cpu":
        # one threaded C++ pass per dtype, summed in float64, where the extension is built
        from .backends import cpp_backend

        dtypes = set(map(operator.attrgetter("dtype"), ts))
        groups = [ts] if len(dtypes) == 1 else [[t for t in ts if t.dtype == d] for d in dtypes]
        sums = [cpp_backend.sum_of_squares(group) for group in groups]
        if None not in sums:
            return torch.tensor(sum(sums), dtype=torch.float64)
    norms = torch._foreach_norm(ts, 2.0)
    return torch.stack(norms).double().square().sum()
