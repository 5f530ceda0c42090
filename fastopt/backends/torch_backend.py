"""The portable backend: the rule of :mod:`fastopt.rule` run with torch's multi-tensor
``_foreach`` ops, on any device torch supports. Low-precision params are stepped in fp32."""

from __future__ import annotations

import torch

from ..rule import TensorList, switches, update
from ..scalars import StepScalars
from ..spec import Spec

name = "torch"
# _foreach ops take any strides: the optimizer need not make contiguous copies for us
accepts_strided = True

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_ROLES = ("m", "v", "vmax", "gavg", "u")


def unavailable_reason() -> str | None:
    return None


def supports(spec: Spec, device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {dtype} is not a floating-point type fastopt steps"
    return None


# Bytes per array in one batch: update() makes ~20 temporary lists of the batch's size
# (fp32 for fp16/bf16 storage), so a step's extra memory is bounded by the batch, not by
# the model. On the CPU the batch stays small enough (512 KiB) that the temporaries come
# from the allocator's free lists and stay in cache: with 64 MiB batches every temporary
# was a fresh mmap, page-faulted in, and Adam's step on 16M elements took 9 times longer.
# On CUDA the caching allocator reuses blocks whatever their size, and larger batches
# mean fewer launches.
_CPU_BATCH_BYTES = 1 << 19
_CUDA_BATCH_BYTES = 1 << 27


def _batch_elements(t: torch.Tensor) -> int:
    per = _CPU_BATCH_BYTES if t.device.type == "cpu" else _CUDA_BATCH_BYTES
    return per // max(4, t.element_size())


def step(
    spec: Spec,
    scalars: StepScalars,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    hvps: list[torch.Tensor] | None,
    state: dict[str, list[torch.Tensor]],
) -> None:
    if not params:
        return
    roles = list(state)
    limit = _batch_elements(params[0])
    batch: list[list] = []
    size = 0
    for piece in _pieces(params, grads, hvps, state, roles, limit):
        batch.append(piece)
        size += piece[0].numel()
        if size >= limit:
            _step_batch(spec, scalars, batch, roles)
            batch, size = [], 0
    if batch:
        _step_batch(spec, scalars, batch, roles)


def _pieces(params, grads, hvps, state, roles, limit):
    """Per param [p, g, h, *state]; a tensor bigger than a batch as slices of its flat view
    (when every tensor of it is contiguous, else whole: slices of strided ones would not
    line up)."""
    for i, p in enumerate(params):
        ts = [p, grads[i], None if hvps is None else hvps[i], *(state[r][i] for r in roles)]
        n = p.numel()
        if n <= limit or not all(t is None or t.is_contiguous() for t in ts):
            yield ts
            continue
        flat = [None if t is None else t.view(-1) for t in ts]
        for a in range(0, n, limit):
            yield [None if t is None else t[a : a + limit] for t in flat]


def _wrap(ts: list[torch.Tensor]) -> TensorList:
    # fp32 math for fp16/bf16 storage (params or state); rounded once when copied back
    return TensorList([t.float() if t.dtype in _LOW_PRECISION else t for t in ts])


def _flattened(
    batch: list[list], small: int
) -> tuple[list[list], list[tuple[torch.Tensor, list[torch.Tensor]]]]:
    """The batch with its pieces of at most ``small`` elements replaced by one piece, whose
    tensors are copies of theirs laid end to end, and (copy, pieces) of the tensors the step
    writes, to be copied back after it.

    On the CPU each ``_foreach`` op is a loop of one op per tensor, and each op costs a few
    microseconds of dispatch: over many small tensors that, not the arithmetic, was most of
    the step. Adam fp32, this copy against none in interleaved rounds: 3.1-3.4x faster over
    10,000 x 100, 1.9x over 4000 x 1k, 1.6x over 2000 x 4k, 1.3x over 1000 x 8k, 1.0-1.1x
    over 1000 x 16k (the break-even). Larger pieces stay as they are: copying them costs
    more than the dispatch it saves."""
    few = [piece for piece in batch if piece[0].numel() <= small]
    if len(few) < 2:
        return batch, []
    columns = list(zip(*few))
    flat = [None if col[0] is None else torch.cat([t.reshape(-1) for t in col]) for col in columns]
    # the param (column 0) and the state (3 on); not the gradient and H u (1 and 2)
    written = [
        (flat[j], list(col)) for j, col in enumerate(columns) if j not in (1, 2) and flat[j] is not None
    ]
    return [piece for piece in batch if piece[0].numel() > small] + [flat], written


def _copy_back(written: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> None:
    for whole, pieces in written:
        parts = whole.split([t.numel() for t in pieces])
        torch._foreach_copy_(pieces, [part.view(t.shape) for part, t in zip(parts, pieces)])


def _step_batch(spec: Spec, scalars: StepScalars, batch: list[list], roles: list[str]) -> None:
    if len(batch) > 1 and batch[0][0].device.type == "cpu":
        batch, written = _flattened(batch, _batch_elements(batch[0][0]) // 8)
        if written:
            _step_batch(spec, scalars, batch, roles)
            _copy_back(written)
            return
    params, grads, hvps = [x[0] for x in batch], [x[1] for x in batch], [x[2] for x in batch]
    state = {r: [x[3 + j] for x in batch] for j, r in enumerate(roles)}
    # fp32 master weights, when kept, are the p the rule steps; the param gets them rounded
    master = state.get("master")
    p_in = TensorList(list(master)) if master is not None else _wrap(params)
    args = [_wrap(state[r]) if r in state else None for r in _ROLES]
    out = update(
        p_in,
        _wrap(grads),
        _wrap(hvps) if hvps[0] is not None else None,
        *args,
        scalars.lr,
        scalars.weight_decay,
        scalars.decay_factor,
        scalars.grad_scale,
        scalars.m_decay,
        scalars.m_weight,
        scalars.m_out,
        scalars.g_out,
        scalars.v_decay,
        scalars.v_weight,
        scalars.v_scale,
        scalars.eps,
        **switches(spec, scalars),
    )
    new_p, *new_state = out
    if master is not None:
        torch._foreach_copy_(master, new_p.ts)
    torch._foreach_copy_(params, new_p.ts)
    for role, value in zip(_ROLES, new_state):
        if role in state:
            torch._foreach_copy_(state[role], value.ts)
