"""The torch.optim surface: param groups, closures, EGD, backends, presets, GradScaler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from optim_db import cpu_backends

import fastopt
from fastopt import presets
from fastopt.reference import Reference
from fastopt.spec import Spec, SpecError, family


def test_presets_are_points_of_the_family():
    members = set(family())
    for name, preset in presets.PRESETS.items():
        # the family lists each rule once with L2 decay and minimization; the two
        # orthogonal switches are free
        assert preset.spec.replace(weight_decay=0, maximize=False) in members, name


def test_spec_rejects_invalid_combinations_with_reasons():
    with pytest.raises(SpecError, match="without momentum"):
        Spec(mu_schedule=1)
    with pytest.raises(SpecError, match="needs a denominator"):
        Spec(momentum=1, momentum_input=2)
    with pytest.raises(SpecError, match="L2"):
        Spec(denominator=2, norm=1, centered=True)
    with pytest.raises(SpecError, match="not a"):
        Spec(norm=7)
    with pytest.raises(SpecError, match="not a bool"):
        Spec(maximize="False")  # a truthy string must not switch maximize on


def test_spec_is_hashable_and_round_trips_through_its_key():
    s = presets.spec("nadam_l1")
    assert {s: 1}[Spec.from_key(s.key())] == 1
    with pytest.raises(SpecError):
        Spec.from_key("momentum=banana")


def test_param_groups_use_their_own_hyperparameters():
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = fastopt.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert torch.equal(a, torch.full((2,), 0.9)) and torch.equal(b, torch.full((2,), 0.5))


def test_add_param_group_and_zero_grad():
    a = torch.ones(2, requires_grad=True)
    opt = fastopt.Adam([a], lr=0.1)
    b = torch.ones(3, requires_grad=True)
    opt.add_param_group({"params": [b], "lr": 0.2})
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step()
    assert torch.allclose(b, torch.full((3,), 0.8))  # Adam's first step is lr * sign(g)
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_params_without_grad_are_left_alone():
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = fastopt.Adam([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b, torch.ones(2)) and b not in opt.state


def test_closure_is_called_and_its_loss_returned():
    w = torch.tensor([2.0], requires_grad=True)
    opt = fastopt.SGD([w], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 4.0 and w.item() == pytest.approx(1.0)


def test_tensor_lr_is_accepted():
    w = torch.ones(2, requires_grad=True)
    opt = fastopt.Adam([w], lr=torch.tensor(0.1))
    w.grad = torch.ones(2)
    opt.step()
    assert torch.allclose(w, torch.full((2,), 0.9))


def test_egd_needs_a_closure():
    w = torch.ones(2, requires_grad=True)
    opt = presets.make("egd", [w])
    w.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_egd_uses_the_hessian_vector_product():
    """On f(x) = 0.5 x^T A x + b^T x, H u = A u: replaying the same u into the reference
    must give the same trajectory."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    a_mat, b_vec = (
        m @ m.T + torch.eye(4, dtype=torch.float64),
        torch.randn(4, generator=gen, dtype=torch.float64),
    )
    x = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    x0 = x.detach().numpy().copy()
    hyper = dict(lr=0.05, nu=0.999, eps=1e-4)
    opt = presets.make("egd", [x], **hyper)
    ref = Reference(presets.spec("egd"), hyper, [x0])
    for step in range(5):
        torch.manual_seed(100 + step)
        opt.step(lambda: 0.5 * x @ a_mat @ x + b_vec @ x)
        torch.manual_seed(100 + step)
        u = torch.randn(4, dtype=torch.float64)  # the same draw the optimizer made
        xr = torch.tensor(ref.params[0])
        ref.step([(a_mat @ xr + b_vec).numpy()], [(a_mat @ u).numpy()])
    np.testing.assert_allclose(x.detach().numpy(), ref.params[0], rtol=1e-10)


def test_egd_steps_a_param_whose_gradient_is_constant():
    """A loss linear in one param: its gradient has no graph, its H u is 0 (the step is
    then the gradient over eps-limited zero curvature), and the other param's H u is used."""
    lin = torch.nn.Linear(3, 1, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    hyper = dict(lr=0.05, nu=0.999, eps=1e-4)
    opt = presets.make("egd", [lin.bias, lin.weight], **hyper)
    before = lin.bias.detach().clone()
    loss = opt.step(lambda: lin(x).sum() + (lin.weight**2).sum())
    assert torch.isfinite(loss)
    ref = Reference(presets.spec("egd"), hyper, [before.numpy()])
    ref.step([np.full(1, 5.0)], [np.zeros(1)])  # d loss / d bias = 5, H u = 0
    np.testing.assert_allclose(lin.bias.detach().numpy(), ref.params[0], rtol=1e-12)


def _coupled_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() ** 2 + (a**4).sum()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("maximize", [False, True])
def test_egd_weight_decay_steps_as_the_same_term_in_the_loss(backend, maximize):
    """weight_decay = wd is wd/2 |x|^2 in the objective for the gradient (wd x) and for the
    curvature (wd u), as for every other rule."""
    runs = []
    for wd, term in ((0.5, 0.0), (0.0, 0.5)):
        x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).requires_grad_()
        spec = presets.spec("egd").replace(maximize=maximize)
        opt = fastopt.FusedOptimizer(
            [x], spec=spec, backend=backend, lr=0.05, nu=0.999, eps=1e-4, weight_decay=wd
        )
        # L2 decay pulls towards 0 either way: maximize f - wd/2 |x|^2, minimize f + wd/2 |x|^2
        sign = -1.0 if maximize else 1.0
        for step in range(3):
            torch.manual_seed(step)  # the same u in both runs
            opt.step(lambda x=x, c=sign * term / 2: (x**4).sum() + c * (x**2).sum())
        runs.append(x.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-14)


def test_egd_curvature_does_not_depend_on_the_grouping():
    """u is drawn over every param with a gradient: an EGD group next to an Adam group gets
    (H u) of the whole Hessian, as when both params are in one EGD group."""
    updates = []
    for split in (False, True):
        a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
        b = torch.tensor([1.5, 0.3, -0.7], dtype=torch.float64, requires_grad=True)
        egd = presets.spec("egd")
        groups = [
            {"params": [a], "spec": egd},
            {"params": [b], "spec": presets.spec("adam") if split else egd},
        ]
        opt = fastopt.FusedOptimizer(groups, spec=egd, lr=0.1, nu=0.999, eps=1e-4)
        before = a.detach().clone()
        torch.manual_seed(0)
        opt.step(lambda a=a, b=b: _coupled_loss(a, b))
        updates.append(a.detach() - before)
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-12, atol=0)


def test_step_with_hvps_checks_the_products_before_anything_steps():
    a, b = torch.ones(2, 3, requires_grad=True), torch.ones(4, requires_grad=True)
    opt = fastopt.FusedOptimizer([{"params": [a]}, {"params": [b]}], spec=presets.spec("egd"), lr=0.1)
    a.grad, b.grad = torch.ones(2, 3), torch.ones(4)
    for bad in (torch.ones(3, 2), torch.ones(1), torch.ones(4, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="Hessian-vector product .* does not match its parameter"):
            opt.step_with_hvps({a: torch.ones(2, 3), b: bad})
        assert torch.equal(a.detach(), torch.ones(2, 3)) and not opt.state[a]


def test_backends_report():
    report = fastopt.available_backends()
    assert report["torch"] is None
    assert set(report) == {"torch", "cpp", "triton", "cuda"}
    for name, reason in report.items():
        assert reason is None or isinstance(reason, str) and reason, name


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        fastopt.Adam([torch.ones(1, requires_grad=True)], backend="quantum")


def test_grad_scaler_unscales_and_skips_inf_steps():
    torch.manual_seed(0)
    model_a = torch.nn.Linear(4, 2).double()
    model_b = torch.nn.Linear(4, 2).double()
    model_b.load_state_dict(model_a.state_dict())
    opt_a = fastopt.Adam(model_a.parameters(), lr=0.01)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=0.01)
    scaler_a = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(6):
        x = torch.randn(8, 4, dtype=torch.float64)
        if step == 3:
            x[0, 0] = float("inf")  # an overflowing batch: both must skip and back off
        for model, opt, scaler in ((model_a, opt_a, scaler_a), (model_b, opt_b, scaler_b)):
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)
    assert scaler_a.get_scale() == scaler_b.get_scale() < 2.0**10


def test_max_grad_norm_equals_clip_grad_norm():
    torch.manual_seed(1)
    p0 = [torch.randn(3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    a = [p.clone().requires_grad_() for p in p0]
    b = [p.clone().requires_grad_() for p in p0]
    oa = fastopt.Adam(a, lr=0.1, max_grad_norm=0.5)
    ob = torch.optim.Adam(b, lr=0.1)
    for _ in range(5):
        gs = [torch.randn_like(p) * 3 for p in p0]
        for x, y, g in zip(a, b, gs):
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        torch.nn.utils.clip_grad_norm_(b, 0.5)
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_a_compiled_training_step_runs_the_fused_step():
    """torch.compile around forward, backward and opt.step(): the fused step (raw addresses
    handed to kernels, which dynamo cannot trace) runs eagerly between the compiled graphs."""
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    twin.load_state_dict(model.state_dict())
    opt = fastopt.Adam(model.parameters(), lr=0.1, backend="cpp", max_grad_norm=1.0)
    ref = torch.optim.Adam(twin.parameters(), lr=0.1)
    x = torch.randn(8, 4)

    @torch.compile(backend="eager")  # dynamo's tracing is what is under test, not codegen
    def train_step(m, o):
        loss = m(x).pow(2).sum()
        loss.backward()
        o.step()
        o.zero_grad()
        return loss

    for _ in range(3):
        train_step(model, opt)
        twin(x).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        ref.step()
        ref.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        # fp32, three steps: the fused kernel's roundings against torch's separate ops
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
