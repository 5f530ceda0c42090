"""Property tests: random specs from the whole family, random shapes and hyperparameters,
1-30 steps, every CPU backend against the NumPy reference."""

from __future__ import annotations

import numpy as np
import torch
from helpers import max_rel_err, run_backend_vs_reference
from hypothesis import given
from hypothesis import strategies as st
from optim_db import cpu_backends

from fastopt.spec import Schedule, Spec, WeightDecay, family

FAMILY = list(family())

shapes = st.lists(
    st.one_of(
        st.just(()),  # 0-dim
        st.tuples(st.integers(0, 9)),  # includes 0-size and 1-element
        st.tuples(st.integers(1, 5), st.integers(1, 7)),
    ),
    min_size=1,
    max_size=4,
)


@st.composite
def specs(draw) -> Spec:
    spec = draw(st.sampled_from(FAMILY))
    return spec.replace(
        weight_decay=draw(st.sampled_from(list(WeightDecay))),
        maximize=draw(st.booleans()),
    )


@st.composite
def hyper(draw, spec: Spec) -> dict:
    h = dict(
        lr=draw(st.floats(1e-4, 0.5)),
        mu=draw(st.floats(0.0, 0.99)),
        nu=draw(st.floats(0.5, 0.9999)),
        eps=draw(st.floats(1e-8, 1e-2)),
        weight_decay=draw(st.sampled_from([0.0, draw(st.floats(0.0, 0.2))])),
        dampening=draw(st.floats(0.0, 0.5)),
        momentum_decay=draw(st.floats(1e-3, 0.2)),
        lr_decay=draw(st.sampled_from([0.0, 0.05])),
        initial_accumulator_value=draw(st.sampled_from([0.0, 0.1])),
    )
    if spec.mu_schedule == Schedule.INCREASING:
        h["mu_max"] = draw(st.floats(0.5, 0.999))
    if spec.nu_schedule == Schedule.INCREASING:
        h["nu_max"] = draw(st.floats(0.5, 0.999))
    return h


@given(data=st.data(), shape_list=shapes, steps=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_random_spec_float64_every_backend(data, shape_list, steps, seed):
    spec = data.draw(specs())
    h = data.draw(hyper(spec))
    for backend in cpu_backends():
        ours, ref = run_backend_vs_reference(spec, h, shape_list, steps, backend, seed=seed)
        # float64, at most 30 steps: rounding differences stay many orders below 1e-8,
        # except where a rule divides by a tiny vbar (eps 1e-8, v ~ 0), which the relative
        # measure (|a - b| / (1 + |b|)) keeps bounded
        assert max_rel_err(ours, ref) < 1e-8, (backend, spec.short(), h)


@given(data=st.data(), shape_list=shapes, steps=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_random_spec_float32_every_backend(data, shape_list, steps, seed):
    spec = data.draw(specs())
    h = data.draw(hyper(spec))
    h["eps"] = max(h["eps"], 1e-4)  # keep 1/vbar from amplifying fp32 rounding without bound
    for backend in cpu_backends():
        ours, ref = run_backend_vs_reference(
            spec, h, shape_list, steps, backend, dtype=torch.float32, seed=seed
        )
        # fp32: ~1e-7 relative rounding per operation, a few dozen operations per step,
        # errors amplified at most by 1/vbar <= 1/eps times lr; 10 steps
        moved = max((float(np.max(np.abs(r))) if r.size else 0.0) for r in ref)
        assert max_rel_err(ours, ref) < 1e-4 * max(1.0, moved), (backend, spec.short(), h)
