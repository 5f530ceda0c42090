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
    low = params[0].dtype in _LOW_PRECISION

    def wrap(ts: list[torch.Tensor]) -> TensorList:
        # fp32 math for fp16/bf16 storage; the result is rounded once when copied back
        return TensorList([t.float() for t in ts] if low else list(ts))

    p_in = wrap(params)
    args = [wrap(state[r]) if r in state else None for r in _ROLES]
    out = update(
        p_in,
        wrap(grads),
        wrap(hvps) if hvps is not None else None,
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
    torch._foreach_copy_(params, new_p.ts)
    for role, value in zip(_ROLES, new_state):
        if role in state:
            torch._foreach_copy_(state[role], value.ts)
