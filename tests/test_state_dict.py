"""Checkpoints move between torch.optim and fastopt and continue the same trajectory."""

from __future__ import annotations

import io

import pytest
import torch
from optim_db import OPTIM_DB, case_id

import fastopt

CASES = [(info, info.option_grid()[-1]) for info in OPTIM_DB]  # the most-switched option set each


def _train(opt, params, gen, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def _fresh(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in [(3, 4), (6,)]]


@pytest.mark.parametrize("direction", ["torch_to_fastopt", "fastopt_to_torch"])
@pytest.mark.parametrize("info,kw", CASES, ids=[case_id(i, k) for i, k in CASES])
def test_checkpoint_round_trip_continues_trajectory(info, kw, direction, float64_default):
    src_cls, dst_cls = (info.torch_cls, info.fastopt_cls)
    if direction == "fastopt_to_torch":
        src_cls, dst_cls = dst_cls, src_cls
    # an uninterrupted run of the destination class
    straight = _fresh()
    opt = dst_cls(straight, **kw)
    gen = torch.Generator().manual_seed(5)
    _train(opt, straight, gen, 20)
    # 10 steps in the source class, checkpoint through bytes, 10 more in the destination
    params = _fresh()
    src = src_cls(params, **kw)
    gen = torch.Generator().manual_seed(5)
    _train(src, params, gen, 10)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = dst_cls(params, **kw)
    dst.load_state_dict(torch.load(buf, weights_only=True))
    _train(dst, params, gen, 10)
    for a, b in zip(params, straight):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_generic_optimizer_checkpoint_loads_weights_only():
    params = _fresh()
    opt = fastopt.presets.make("nadam_linf", params)
    _train(opt, params, torch.Generator().manual_seed(0), 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = fastopt.presets.make("nadam_linf", [p.detach().clone().requires_grad_() for p in params])
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.group_spec(again.param_groups[0]) == fastopt.presets.spec("nadam_linf")
    assert int(again.state_dict()["state"][0]["step"]) == 3


def test_group_holding_a_spec_checkpoints_with_weights_only():
    """A group may hold a Spec object: its state_dict saves the key string, so the
    checkpoint loads with torch.load's default weights_only and continues the rule."""
    params = _fresh()
    nadam = fastopt.presets.spec("nadam_dozat")
    opt = fastopt.FusedOptimizer(
        [{"params": params[:1], "spec": nadam}, {"params": params[1:]}], spec=fastopt.presets.spec("adam")
    )
    _train(opt, params, torch.Generator().manual_seed(0), 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["param_groups"][0]["spec"] == nadam.key()
    assert isinstance(opt.param_groups[0]["spec"], fastopt.spec.Spec)  # the optimizer's own is kept
    other = fastopt.FusedOptimizer(
        [{"params": params[:1]}, {"params": params[1:]}], spec=fastopt.presets.spec("adam")
    )
    other.load_state_dict(saved)
    assert other.group_spec(other.param_groups[0]) == nadam


def test_generic_optimizer_takes_a_spec_key_string():
    """spec= as the key string (what ZeRO's own groups should hold, for weights_only
    checkpoints) steps exactly as the Spec itself."""
    runs = []
    for spec in (fastopt.presets.spec("nadam_linf"), fastopt.presets.spec("nadam_linf").key()):
        params = _fresh()
        _train(
            fastopt.FusedOptimizer(params, spec=spec, lr=5e-3), params, torch.Generator().manual_seed(0), 4
        )
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    with pytest.raises(fastopt.spec.SpecError, match="not a spec key"):
        fastopt.FusedOptimizer(_fresh(), spec="adam")


def test_mismatched_state_shape_is_refused_and_nothing_changes():
    params = _fresh()
    opt = fastopt.Adam(params, lr=0.1)
    _train(opt, params, torch.Generator().manual_seed(0), 2)
    good = opt.state_dict()
    bad = opt.state_dict()
    bad["state"] = {k: dict(v) for k, v in bad["state"].items()}
    bad["state"][0]["exp_avg"] = torch.zeros(5)
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    for k, v in opt.state[params[0]].items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    opt.load_state_dict(good)  # a good one still loads


def test_wrong_group_count_is_refused():
    opt = fastopt.SGD(_fresh(), lr=0.1)
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"nonsense": 1})
