"""The torch backend's foreach program against the rule it is traced from.

:mod:`fastopt.backends.foreach_program` traces :func:`fastopt.rule.update`, fuses its ops
into addcmul, addcdiv and add-with-alpha and runs them in place. Here the program runs on
lists of float64 tensors and the rule runs as it is on the same tensors, for any setting
of the switches: the two must agree to float64 rounding, the gradient and H u must come
out untouched, and the arrays handed in must hold the results.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastopt import presets, rule
from fastopt.backends import foreach_program
from fastopt.scalars import step_scalars

# each switch of update() and the values it takes (the enums of fastopt.spec)
SWITCH_VALUES = {
    "MOMENTUM": (0, 1, 2),
    "MOMENTUM_INPUT": (0, 1, 2),
    "DENOMINATOR": (0, 1, 2),
    "NORM": (1, 2, 3),
}
SIZES = [5, 1, 0, 33]


def _switches() -> st.SearchStrategy[dict[str, int]]:
    names = [n for n in rule.SWITCHES if n not in SWITCH_VALUES]
    return st.fixed_dictionaries(
        {
            **{n: st.sampled_from(v) for n, v in SWITCH_VALUES.items()},
            **{n: st.sampled_from((0, 1)) for n in names},
        }
    )


def _arrays(seed: int) -> dict[str, list[torch.Tensor]]:
    """Float64 inputs a run could have: second moments positive and above the squared
    mean, so no subtraction cancels and the bound below holds for every element."""
    gen = torch.Generator().manual_seed(seed)

    def draw() -> list[torch.Tensor]:
        return [torch.randn(n, generator=gen, dtype=torch.float64) for n in SIZES]

    out = {name: draw() for name in ("p", "g", "h", "m")}
    out["v"] = [t.abs() + 1 for t in draw()]
    out["vmax"] = [t.abs() + 1.5 for t in draw()]
    out["gavg"] = [t.abs() * 0.1 for t in draw()]
    out["u"] = [t.abs() for t in draw()]
    return out


SCALARS = dict(
    lr=0.03, weight_decay=0.02, decay_factor=0.999, grad_scale=0.5, m_decay=0.9, m_weight=0.1,
    m_out=1.7, g_out=0.3, v_decay=0.99, v_weight=0.01, v_scale=1.3, eps=1e-3,
)  # fmt: skip


def _by_rule(arrays, switches):
    """update() run on each tensor as it is: one torch op per operator."""
    outs = [
        rule.update(*(arrays[n][i].clone() for n in foreach_program.LIST_INPUTS), **SCALARS, **switches)
        for i in range(len(SIZES))
    ]
    return {role: [o[k] for o in outs] for k, role in enumerate(foreach_program.OUTPUTS)}


def _by_program(arrays, switches, run=None):
    work = {n: [t.clone() for t in ts] for n, ts in arrays.items()}
    (run or foreach_program.program(switches).run)(*(work[n] for n in foreach_program.LIST_INPUTS), **SCALARS)
    return work


def _check(arrays, switches, run=None):
    expected = _by_rule(arrays, switches)
    got = _by_program(arrays, switches, run)
    for role in foreach_program.OUTPUTS:
        for a, b in zip(got[role], expected[role], strict=True):
            # float64: the fused ops round a handful of times in another order, ~1e-15
            # relative to the terms, which are at most a few times the result here
            bound = 1e-13 * (b.abs() + b.abs().max()) if b.numel() else b
            assert ((a - b).abs() <= bound).all(), (role, switches, foreach_program.source(switches))
    for name in ("g", "h"):
        for a, b in zip(got[name], arrays[name], strict=True):
            assert torch.equal(a, b), f"{name} was written"


@given(switches=_switches(), seed=st.integers(0, 2**16))
def test_program_equals_rule_for_any_switches(switches, seed):
    _check(_arrays(seed), switches)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_step_state_where_it_lives(name):
    """Every output of a named optimizer ends where it started: no copy back."""
    spec = presets.spec(name)
    hyper = dict(lr=0.01, mu=0.9, nu=0.999, eps=1e-8, weight_decay=0.01, rho=0.9, alpha=0.99)
    switches = rule.switches(spec, step_scalars(spec, hyper, 10))
    code = foreach_program.source(switches)
    assert "_foreach_copy_" not in code, code
    _check(_arrays(0), switches)


def test_adam_is_no_longer_than_torch_foreach_adam():
    """torch's foreach Adam takes 7-8 ops (lerp, mul, addcmul, sqrt, div, add, addcdiv):
    the traced program must not take more."""
    spec = presets.spec("adam")
    hyper = dict(lr=0.01, mu=0.9, nu=0.999, eps=1e-8)
    code = foreach_program.source(rule.switches(spec, step_scalars(spec, hyper, 3)))
    assert code.count("torch._foreach_") <= 8, code


@pytest.mark.parametrize("name", ["adam", "rmsprop_centered", "adadelta", "nadam"])
def test_program_that_writes_only_its_own_temporaries(name):
    """The plan without in-place writes to the inputs (taken if an output would end in
    another array's storage) copies every output back and gives the same step."""
    spec = presets.spec(name)
    hyper = dict(lr=0.01, mu=0.9, nu=0.999, eps=1e-8, weight_decay=0.01, rho=0.9, alpha=0.99)
    switches = rule.switches(spec, step_scalars(spec, hyper, 4))
    run, code = foreach_program.compile_program(switches, write_inputs=False)
    assert "_foreach_copy_(P," in code
    _check(_arrays(1), switches, run)
