"""Bad input gets a clear error before anything is modified."""

from __future__ import annotations

import pytest
import torch
from optim_db import OPTIM_DB, cpu_backends
from test_reliability_hostile import TARGETS, kernel_env

import fastopt
from fastopt import backends
from fastopt.scalars import step_scalars
from fastopt.spec import family

ERROR_CASES = [(info, kw, exc, msg) for info in OPTIM_DB for kw, exc, msg in info.errors]


@pytest.mark.parametrize(
    "info,kw,exc,msg", ERROR_CASES, ids=[f"{c[0].name}-{c[2].__name__}-{c[3]}" for c in ERROR_CASES]
)
def test_constructor_errors_match_torch(info, kw, exc, msg):
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(exc, match=msg):
        info.torch_cls(p, **kw)  # the table is right about torch ...
    with pytest.raises(exc, match=msg):
        info.fastopt_cls(p, **kw)  # ... and fastopt says the same


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state
    }


def _assert_unchanged(opt, params, snap):
    values, states = snap
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    for p in params:
        for k, v in states.get(id(p), {}).items():
            assert torch.equal(opt.state[p][k], v)


def _trained_adam(*shapes):
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    opt = fastopt.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt, params


def test_sparse_gradient_is_refused_untouched():
    opt, params = _trained_adam((3,), (4,))
    snap = _snapshot(opt, params)
    params[0].grad = torch.randn(3)
    params[1].grad = torch.sparse_coo_tensor([[0]], [1.0], (4,))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    _assert_unchanged(opt, params, snap)


def test_complex_params_are_refused():
    p = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    opt = fastopt.Adam([p])
    p.grad = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


def test_mixed_dtypes_in_a_group_are_refused():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = fastopt.SGD([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(2), torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="one dtype"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(2))


@pytest.mark.parametrize("backend", cpu_backends())
def test_overlap_behind_a_longer_param_is_found(backend):
    """B and C share an element; A, a strided view spanning both, is checked first and
    shares none with either: the check must compare C with B too, not only with the param
    that reaches furthest (a missed overlap lost one of the two updates)."""
    buf = torch.zeros(200)
    params = [buf[0:200:2], buf[1:100:2], buf[51:52]]
    for p in params:
        p.requires_grad_()
        p.grad = -torch.ones_like(p)
    with pytest.raises(ValueError, match="params 1 and 2 of a group overlap"):
        fastopt.SGD(params, lr=1.0, backend=backend).step()
    assert not buf.any()  # nothing stepped


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_param_with_distinct_elements_is_stepped(backend):
    """Strides (3, 2) over shape (2, 3) fail the quick no-overlap test but address six
    distinct elements: the param is stepped as torch.optim steps it."""
    bufs = [torch.arange(12.0), torch.arange(12.0)]
    views = [b.as_strided((2, 3), (3, 2)).requires_grad_() for b in bufs]
    for v in views:
        v.grad = torch.ones(2, 3)
    fastopt.SGD(views[:1], lr=0.5, backend=backend).step()
    torch.optim.SGD(views[1:], lr=0.5).step()
    assert torch.equal(bufs[0], bufs[1]) and not torch.equal(bufs[0], torch.arange(12.0))


def test_mixed_devices_in_a_group_are_refused():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, device="meta", requires_grad=True)
    opt = fastopt.SGD([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(2), torch.ones(2, device="meta")
    with pytest.raises(ValueError, match="one device"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(2))


def test_an_error_in_a_later_group_leaves_earlier_groups_untouched():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = fastopt.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad = torch.ones(2)
    b.grad = torch.sparse_coo_tensor([[0]], [1.0], (2,))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(2)) and not opt.state


def test_grad_shape_mismatch_is_refused():
    p = torch.zeros(3, requires_grad=True)
    opt = fastopt.SGD([p], lr=0.1)
    p.grad = torch.ones(3)
    p.grad.data = torch.ones(4)
    with pytest.raises(RuntimeError, match="does not match"):
        opt.step()


def test_found_inf_skips_the_step():
    opt, params = _trained_adam((3,))
    snap = _snapshot(opt, params)
    params[0].grad = torch.ones(3)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    del opt.found_inf
    _assert_unchanged(opt, params, snap)


def test_differentiable_is_refused():
    with pytest.raises(NotImplementedError, match="differentiable"):
        fastopt.Adam([torch.zeros(1, requires_grad=True)], differentiable=True)


def test_generic_optimizer_checks_hyperparameters():
    spec = fastopt.presets.spec("adam")
    with pytest.raises(ValueError, match="learning rate"):
        fastopt.FusedOptimizer([torch.zeros(1, requires_grad=True)], spec=spec, lr=-1.0)
    with pytest.raises(TypeError, match="needs a spec"):
        fastopt.FusedOptimizer([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match="max_grad_norm"):
        fastopt.FusedOptimizer([torch.zeros(1, requires_grad=True)], spec=spec, max_grad_norm=0.0)
    with pytest.raises(TypeError, match="lr must be a number"):
        fastopt.FusedOptimizer([torch.zeros(1, requires_grad=True)], spec=spec, lr="0.1")
    with pytest.raises(ValueError, match="1-element"):
        fastopt.FusedOptimizer([torch.zeros(1, requires_grad=True)], spec=spec, lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize(
    "name,value",
    [
        ("dampening", -0.1), ("dampening", 1.5), ("lr_decay", -1.5), ("initial_accumulator_value", -1.0),
        ("momentum_decay", float("nan")), ("mu_max", 1.5), ("nu_max", float("nan")), ("mu_max", -0.1),
    ],
)  # fmt: skip
def test_generic_optimizer_refuses_bad_secondary_hyperparameters(name, value):
    """Each would step to NaN or flip the lr's sign (lr_decay = -1.5 at step 2) silently."""
    with pytest.raises(ValueError, match=f"Invalid {name} value"):
        fastopt.FusedOptimizer(
            [torch.zeros(1, requires_grad=True)], spec=fastopt.presets.spec("adam"), **{name: value}
        )


# torch.optim checks only the constructor's arguments; fastopt checks every param group, as
# given and as edited later, with the same messages
VALUE_ERRORS = [(info, kw, msg) for info, kw, exc, msg in ERROR_CASES if exc is ValueError]
_VALUE_IDS = [f"{info.name}-{msg}" for info, _, msg in VALUE_ERRORS]


@pytest.mark.parametrize("info,kw,msg", VALUE_ERRORS, ids=_VALUE_IDS)
def test_a_param_group_out_of_range_is_refused(info, kw, msg):
    first, second = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=f"param group 1: {msg}"):
        info.fastopt_cls([{"params": [first]}, {"params": [second], **kw}], **info.base)
    opt = info.fastopt_cls([first], **info.base)
    with pytest.raises(ValueError, match=f"param group 1: {msg}"):
        opt.add_param_group({"params": [second], **kw})
    assert len(opt.param_groups) == 1  # the refused group was not added


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("info,kw,msg", VALUE_ERRORS, ids=_VALUE_IDS)
def test_a_group_edited_out_of_range_stops_the_step_untouched(info, kw, msg, backend):
    params = [torch.randn(3, requires_grad=True), torch.randn(4, requires_grad=True)]
    opt = info.fastopt_cls([{"params": [params[0]]}, {"params": [params[1]]}], backend=backend, **info.base)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[1].update(kw)  # as a user or an lr schedule might
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=f"param group 1: {msg}"):
        opt.step()
    _assert_unchanged(opt, params, snap)  # group 0 was not stepped either


def test_a_tensor_lr_edited_negative_is_refused():
    p = torch.randn(3, requires_grad=True)
    opt = fastopt.Adam([p], lr=torch.tensor(0.01))
    p.grad = torch.randn(3)
    opt.param_groups[0]["lr"] = torch.tensor(-0.01)
    with pytest.raises(ValueError, match="param group 0: Invalid learning rate"):
        opt.step()
    assert not opt.state[p]  # nothing was created or stepped


@pytest.mark.parametrize("schedule", ["bias_correction_mu", "bias_correction_nu", "radam_nu"])
def test_hyperparameters_without_a_first_step_are_refused_at_construction(schedule):
    """mu = 1 under bias correction divides by 1 - mu^t = 0; RAdam's rho_inf by 1 - nu."""
    spec, kw = {
        "bias_correction_mu": ("adam", dict(mu=1.0)),
        "bias_correction_nu": ("adam", dict(nu=1.0)),
        "radam_nu": ("radam", dict(nu=1.0)),
    }[schedule]
    with pytest.raises(ValueError, match="param group 0: its hyperparameters define no step 1"):
        fastopt.FusedOptimizer([torch.zeros(2, requires_grad=True)], spec=fastopt.presets.spec(spec), **kw)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad"])
def test_fused_and_foreach_together_are_refused_as_torch_does(name):
    p = [torch.zeros(2, requires_grad=True)]
    for cls in (getattr(torch.optim, name), getattr(fastopt, name)):
        with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
            cls(p, lr=0.1, fused=True, foreach=True)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "NAdam", "RAdam", "Adamax"])
def test_betas_on_a_device_are_refused(name):
    """The betas are read on the host at every step: from a device tensor (torch allows
    them for capturable runs) that would be a host sync per step and an error under CUDA
    graph capture. A meta tensor stands in for the device here; a CPU tensor is fine."""
    p = [torch.zeros(2, requires_grad=True)]
    cls = getattr(fastopt, name)
    with pytest.raises(ValueError, match=r"betas\[1\] is a tensor on meta"):
        cls(p, lr=0.1, betas=(0.9, torch.tensor(0.99, device="meta")))
    opt = cls(p, lr=0.1, betas=(torch.tensor(0.9), 0.99))
    p[0].grad = torch.ones(2)
    opt.param_groups[0]["betas"] = (torch.tensor(0.9, device="meta"), 0.99)
    with pytest.raises(ValueError, match=r"param group 0: betas\[0\] is a tensor on meta"):
        opt.step()
    assert not opt.state[p[0]]
    opt.param_groups[0]["betas"] = (torch.tensor(0.9), 0.99)
    opt.step()
    assert not torch.equal(p[0].detach(), torch.zeros(2))


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "Adagrad"])
def test_capturing_a_group_that_is_not_capturable_is_refused(name, monkeypatch):
    """Captured, a capturable=False step would replay its host scalars (bias corrections,
    schedules, the rounding seed) forever while 'step' advanced: an error, as in torch,
    before anything is modified. (The capture is stood in for on the CPU; torch's SGD has no
    step count, and a graph of it replays correctly.)"""
    from fastopt import backends

    params = [torch.randn(3, requires_grad=True)]
    params[0].grad = torch.randn(3)
    monkeypatch.setattr(backends, "capturing", lambda device: True)
    opt = getattr(fastopt, name)(params, lr=0.1)
    snap = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="param group 0: step.. is being captured in a CUDA graph, but"):
        opt.step()
    _assert_unchanged(opt, params, snap)
    sgd = fastopt.SGD(params, lr=0.1, momentum=0.9)
    sgd.step()
    assert not torch.equal(params[0].detach(), snap[0][0])


@pytest.mark.parametrize("device,backend", TARGETS, ids=[f"{d}-{b}" for d, b in TARGETS])
def test_backends_refuse_hessian_vector_products_they_cannot_read(device, backend):
    """A backend's step called directly with an HVP spec and missing, too few, misshapen or
    wrongly typed products is a ValueError before anything is stepped: the GPU kernels
    would read them through a -1 table slot, as a gradient's dtype, or past their end."""
    spec = next(s for s in family() if s.curvature == 1 and s.state_roles)
    scalars = step_scalars(spec, dict(lr=0.1), 1)
    p = torch.ones(5, device=device)
    g = torch.full((5,), 0.5, device=device)
    state = {r: [torch.zeros(5, device=device)] for r in spec.state_roles}
    bad = [None, [], [torch.ones(4, device=device)], [torch.ones(5, dtype=torch.float64, device=device)]]
    with kernel_env(device, backend):
        b = backends.get(backend)
        for hvps in bad:
            with pytest.raises(ValueError, match="Hessian-vector product"):
                b.step(spec, scalars, [p], [g], hvps, state)
        assert p.eq(1).all() and all(s.eq(0).all() for ts in state.values() for s in ts)
        b.step(spec, scalars, [p], [g], [torch.ones(5, device=device)], state)
    assert not p.eq(1).any()  # the well-formed call steps
