"""The portable backend: the rule of :mod:`fastopt.rule` run with torch's multi-tensor
``_foreach`` ops, on any device torch supports, as the in-place program that
:mod:`fastopt.backends.foreach_program` makes of it. Low-precision params are stepped in
fp32."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from ..rule import switches
from ..scalars import StepScalars
from ..spec import Spec
from . import check_hvps, foreach_program
from . import triton_backend as _seeds  # the stochastic-rounding seeds every backend shares

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


# Bytes per array in one batch. The step's ops (fastopt/backends/foreach_program.py) run
# one batch at a time, so the arrays of a batch stay in cache from one op to the next: on
# the CPU that makes the step about twice as fast as torch's foreach Adam on one 16M
# tensor, which streams the whole tensor through memory for every op. 1 MiB measured
# best on one core (Adam, RMSprop and NAdam on 16M, 256 x 16k and 1000 x 4k, against
# 512 KiB and 2 MiB; at 2 MiB NAdam's two temporaries no longer fit and its step on 16M
# took three times as long). The few temporaries are bounded by the batch too. On CUDA
# the caching allocator reuses blocks whatever their size, and larger batches mean fewer
# launches.
_CPU_BATCH_BYTES = 1 << 20
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
    *,
    seed: int | None = None,
    stochastic_rounding: bool | None = None,
) -> None:
    """One step over the group, in place (see :mod:`fastopt.backends`; ``seed``: the
    stochastic rounding of bf16 state, which ``stochastic_rounding=False`` turns off)."""
    if seed is not None:
        seed = _seeds.check_seed(seed)
    if not params:
        return
    check_hvps("torch", spec, params, grads, hvps)
    roles = list(state)
    weights = state["master"][0].dtype if "master" in state else params[0].dtype
    rounded = [r for r in _ROLES if r in state and state[r][0].dtype == torch.bfloat16]
    if weights == torch.bfloat16 or not rounded or stochastic_rounding is False:
        rounding = None  # bf16 weights: their state rounds to nearest, as they do
    else:
        rounding = _Rounding(_seeds._next_seed() if seed is None else seed, rounded)
    program = foreach_program.program(switches(spec, scalars))
    # one op (plain SGD) reuses nothing from cache: slices would only add calls
    limit = _batch_elements(params[0]) if program.ops > 1 else sys.maxsize
    batch: list[list] = []
    size = 0
    for piece in _pieces(params, grads, hvps, state, roles, limit):
        batch.append(piece)
        size += piece[0].numel()
        if size >= limit:
            _step_batch(program.run, scalars, batch, roles, rounding)
            batch, size = [], 0
    if batch:
        _step_batch(program.run, scalars, batch, roles, rounding)


class _Rounding:
    """Stochastic rounding of a step's bf16 state: fp32 values plus 16 random low bits,
    truncated, round up with probability equal to the discarded fraction. The bits come
    from a generator seeded by (seed, batch, role): the same for the same step of the same
    tensors, so a run resumed from a checkpoint rounds as the original did."""

    def __init__(self, seed: int, roles: list[str]):
        self.seed, self.roles, self.batches = seed, roles, 0

    def store(self, dst: list[torch.Tensor], src: list[torch.Tensor], role: str) -> None:
        gen = torch.Generator(device=src[0].device)
        gen.manual_seed((self.seed * 0x9E3779B1 + self.batches * 0x85EBCA6B + _ROLES.index(role)) % 2**62)
        for d, s in zip(dst, src):
            noise = torch.randint(0, 1 << 16, s.shape, generator=gen, dtype=torch.int32, device=s.device)
            # & ~0xFFFF: the low 16 bits cleared, so that copying to bf16 is exact
            up = ((s.view(torch.int32) + noise) & ~0xFFFF).view(torch.float32)
            d.copy_(torch.where(s.isnan(), s, up))  # a NaN's bits plus noise could read as inf


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


def _wrap(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 copies of fp16/bf16 storage (params or state), rounded once when copied back;
    the list itself when it has none."""
    if not any(t.dtype in _LOW_PRECISION for t in ts):
        return ts
    return [t.float() if t.dtype in _LOW_PRECISION else t for t in ts]


def _step_batch(
    run: Callable[..., None],
    scalars: StepScalars,
    batch: list[list],
    roles: list[str],
    rounding: _Rounding | None,
) -> None:
    params, grads, hvps = [x[0] for x in batch], [x[1] for x in batch], [x[2] for x in batch]
    state = {r: [x[3 + j] for x in batch] for j, r in enumerate(roles)}
    # fp32 master weights, when kept, are the p the rule steps; the param gets them rounded
    master = state.get("master")
    work_p = master if master is not None else _wrap(params)
    work = {r: _wrap(state[r]) for r in _ROLES if r in state}
    run(
        work_p,
        _wrap(grads),
        _wrap(hvps) if hvps[0] is not None else None,
        *(work.get(r) for r in _ROLES),
        **{name: getattr(scalars, name) for name in foreach_program.SCALARS},
    )
    # the program updates the arrays it is given: copy back where they are fp32 copies
    if work_p is not params:
        torch._foreach_copy_(params, work_p)
    for role, values in work.items():
        if rounding is not None and role in rounding.roles:
            rounding.store(state[role], values, role)
        elif values is not state[role]:
            torch._foreach_copy_(state[role], values)
    if rounding is not None:
        rounding.batches += 1
