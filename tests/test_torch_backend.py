"""The torch backend's batches: many tensors stepped by one program call.

The backend steps a group in batches of tensors (and slices of tensors bigger than a
batch), each with one call of the rule's foreach program (fastopt/backends/torch_backend.py).
The rule is elementwise, so every element must come out exactly as when its tensor is
stepped on its own: these tests compare a step over many tensors with one call per tensor,
bit for bit, for the arrays each spec keeps, strided and empty tensors and low-precision
storage included.
"""

from __future__ import annotations

import pytest
import torch

from fastopt import presets
from fastopt.backends import torch_backend
from fastopt.scalars import step_scalars
from fastopt.spec import Curvature, Spec

# tiny, empty, strided (every other column of a matrix), and one bigger than a batch
# (torch_backend._CPU_BATCH_BYTES), split into pieces: whole tensors and slices in the same
# batches, and batches of several tensors
SIZES = [1, 0, 7, 300, 16384, 16385, 5000, 600_000, 3, 64]
SPECS = {
    "adam": presets.spec("adam"),
    "amsgrad": presets.spec("amsgrad"),
    "centered-rmsprop": presets.spec("rmsprop_centered"),
    "adadelta": presets.spec("adadelta"),
    "egd": Spec(curvature=Curvature.HVP, denominator=2),
}
HYPER = dict(lr=1e-2, mu=0.9, nu=0.99, eps=1e-6, weight_decay=0.1)


def _tensors(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(SIZES):
        if i == 3:  # a strided view: every other column of a (300, 2) matrix
            out.append(torch.randn(n, 2, generator=gen).to(dtype)[:, 0])
        else:
            out.append(torch.randn(n, generator=gen).to(dtype))
    return out


def _arrays(spec: Spec, p_dtype: torch.dtype, s_dtype: torch.dtype, master: bool, seed: int):
    params = _tensors(p_dtype, seed)
    grads = _tensors(p_dtype, seed + 1)
    hvps = _tensors(p_dtype, seed + 2) if spec.curvature == Curvature.HVP else None
    # a state a run could have: second moments positive, and above the squared mean
    state = {}
    for k, role in enumerate(spec.state_roles):
        values = [t.abs() for t in _tensors(s_dtype, seed + 3 + k)]
        if role == "v":
            values = [t + 1 for t in values]
        elif role == "gavg":
            values = [t * 0.1 for t in values]
        state[role] = values
    if master:
        state["master"] = [p.float() for p in params]
    return params, grads, hvps, state


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize(
    "p_dtype,s_dtype,master",
    [
        (torch.float32, torch.float32, False),
        (torch.bfloat16, torch.float32, True),
        (torch.float16, torch.bfloat16, False),
    ],
    ids=["fp32", "bf16-master", "fp16-bf16-state"],
)
def test_one_call_equals_one_call_per_tensor(name, p_dtype, s_dtype, master):
    spec = SPECS[name]
    together = _arrays(spec, p_dtype, s_dtype, master, seed=0)
    apart = _arrays(spec, p_dtype, s_dtype, master, seed=0)
    for t in (1, 2):
        scalars = step_scalars(spec, HYPER, t)
        # rounded to nearest: stochastic rounding of bf16 state draws its bits by batch,
        # on purpose (tests/test_stochastic_rounding.py)
        torch_backend.step(spec, scalars, *together, stochastic_rounding=False)
        params, grads, hvps, state = apart
        for i in range(len(params)):
            torch_backend.step(
                spec,
                scalars,
                [params[i]],
                [grads[i]],
                None if hvps is None else [hvps[i]],
                {role: [ts[i]] for role, ts in state.items()},
                stochastic_rounding=False,
            )
    for a, b in zip(together[0], apart[0], strict=True):
        assert torch.equal(a, b)
    for role in together[3]:
        for a, b in zip(together[3][role], apart[3][role], strict=True):
            assert torch.equal(a, b), role
    assert any(
        not torch.equal(a, b) for a, b in zip(together[0], _arrays(spec, p_dtype, s_dtype, master, 0)[0])
    )


def test_strided_views_are_stepped_in_place():
    """The program updates the arrays it is given where they live: a param that is a view
    (every other column of a matrix) gets its step, and the column beside it is untouched."""
    spec = SPECS["adam"]
    base = torch.randn(300, 2)
    other_column = base[:, 1].clone()
    params = [base[:, 0], torch.randn(5), torch.randn(6)]
    grads = [torch.ones(300), torch.ones(5), torch.ones(6)]
    state = {role: [torch.zeros_like(p) for p in params] for role in spec.state_roles}
    before = [p.clone() for p in params]
    torch_backend.step(spec, step_scalars(spec, HYPER, 1), params, grads, None, state)
    assert torch.equal(base[:, 1], other_column)
    for p, b in zip(params, before):
        assert (p < b).all()  # a positive gradient moves every element down
