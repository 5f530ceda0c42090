"""What a user swapping torch.optim.X for fastopt.X does to the optimizer object itself.

Editing a param's state between steps, keeping a handle on ``optimizer.state``, copying
or pickling the optimizer, load_state_dict hooks that convert a checkpoint, and a
misspelt keyword: each as torch.optim does it, for every optimizer of the table. The
numbers are compared with the torch.optim twin doing the same in float64 (1e-10 relative:
a few steps of the same algebra in another order, tests/test_torch_parity.py).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from optim_db import OPTIM_DB, cpu_backends

import fastopt

TOL = dict(rtol=1e-10, atol=1e-12)
CASES = [(info, backend) for info in OPTIM_DB for backend in cpu_backends()]
IDS = [f"{info.name}-{backend}" for info, backend in CASES]


def _kw(info) -> dict:
    kw = dict(info.base)
    if info.name in ("SGD", "RMSprop"):
        kw["momentum"] = 0.9  # so that there is state to edit
    return kw


def _pair(info, backend):
    gen = torch.Generator().manual_seed(0)
    p0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(4, 3), (5,)]]
    ours = [p.clone().requires_grad_() for p in p0]
    theirs = [p.clone().requires_grad_() for p in p0]
    return (
        ours,
        info.fastopt_cls(ours, backend=backend, **_kw(info)),
        theirs,
        info.torch_cls(theirs, **_kw(info)),
    )


def _steps(params, opt, first: int, count: int) -> None:
    for step in range(first, first + count):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def _edits(state: dict, param: torch.Tensor, kind: str) -> None:
    """The same edit of one param's state, whatever the optimizer's own."""
    entries = state[param]
    if kind == "clear":
        entries.clear()
    elif kind == "replace":  # every tensor entry a new tensor, buffers halved
        for key, value in list(entries.items()):
            if isinstance(value, torch.Tensor):
                entries[key] = value if key in ("step", "mu_product") else value * 0.5
    elif kind == "restart":  # a bias-correction restart: the step count back to 0
        entries["step"] = torch.zeros_like(entries["step"])
    elif kind == "restart-in-place":  # the same, written into the tensor the state holds
        entries["step"].zero_()
    elif kind == "rewind-in-place":  # counters edited in place (NAdam's product too)
        entries["step"].sub_(2)
        if "mu_product" in entries:
            entries["mu_product"].mul_(0.5)
    else:
        raise AssertionError(kind)


# (torch.optim.SGD keeps no step count to restart)
EDITS = [
    (info, b, kind)
    for info, b in CASES
    for kind in ("clear", "replace", "restart", "restart-in-place", "rewind-in-place")
    if info.name != "SGD" or kind in ("clear", "replace")
]


@pytest.mark.parametrize("info,backend,kind", EDITS, ids=[f"{i.name}-{b}-{k}" for i, b, k in EDITS])
def test_edited_param_state_is_stepped_as_torch_steps_it(info, backend, kind, float64_default):
    """A param's state entries replaced (or the dict cleared, or its counters changed in
    place: fastopt's step packs every param's count into one buffer) between steps: the
    next steps use the new entries, and the state_dict holds them."""
    ours, opt, theirs, ref = _pair(info, backend)
    _steps(ours, opt, 0, 4)
    _steps(theirs, ref, 0, 4)
    _edits(opt.state, ours[0], kind)
    _edits(ref.state, theirs[0], kind)
    _steps(ours, opt, 4, 3)
    _steps(theirs, ref, 4, 3)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)
    saved, want = opt.state_dict()["state"], ref.state_dict()["state"]
    assert saved.keys() == want.keys()
    for i in want:
        assert saved[i].keys() == want[i].keys()
        for key, value in want[i].items():
            torch.testing.assert_close(
                torch.as_tensor(saved[i][key]).double(), torch.as_tensor(value).double(), **TOL
            )


def test_state_handle_taken_at_construction_stays_the_state():
    params = [torch.zeros(3, requires_grad=True)]
    opt = fastopt.Adam(params, lr=0.1)
    handle = opt.state
    _steps(params, opt, 0, 2)
    assert handle is opt.state and params[0] in handle
    handle[params[0]]["exp_avg"] = torch.ones(3)  # a write through the handle is stepped with
    _steps(params, opt, 2, 1)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt.state[params[0]]["exp_avg"])
    assert float(opt.state[params[0]]["exp_avg"][0]) != 1.0  # it moved on from the new value


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("info", OPTIM_DB, ids=lambda i: i.name)
def test_copied_optimizer_steps_on_like_the_original(info, how):
    """deepcopy, pickle and torch.save of the whole optimizer (with its params, as a model
    saved whole holds them): the copy keeps its options and steps as the original does."""
    backend = cpu_backends()[-1]
    params = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True)]
    opt = info.fastopt_cls(params, backend=backend, max_grad_norm=1.5, **_kw(info))
    _steps(params, opt, 0, 3)
    if how == "deepcopy":
        clone = copy.deepcopy(opt)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    assert (clone.backend, clone.max_grad_norm) == (backend, 1.5)
    copies = clone.param_groups[0]["params"]
    assert copies[0] is not params[0] and list(clone.state) == copies
    _steps(params, opt, 3, 2)
    _steps(copies, clone, 3, 2)
    assert torch.equal(copies[0], params[0])
    clone_state, state = clone.state[copies[0]], opt.state[params[0]]
    assert clone_state.keys() == state.keys() and all(
        torch.equal(clone_state[k], v) for k, v in state.items()
    )


def test_state_dict_holds_plain_dicts_and_loads_weights_only():
    params = [torch.randn(3, requires_grad=True)]
    opt = fastopt.NAdam(params, lr=0.1)
    _steps(params, opt, 0, 2)
    saved = opt.state_dict()
    assert type(saved["state"][0]) is dict
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert torch.equal(loaded["state"][0]["exp_avg"], opt.state[params[0]]["exp_avg"])


def test_load_state_dict_hooks_run_as_in_torch():
    """A pre-hook converts a checkpoint (other state key names, an extra param group) before
    it is checked; a post-hook sees the loaded state."""
    params = [torch.randn(3, requires_grad=True)]
    src = torch.optim.Adam(params, lr=0.1)
    _steps(params, src, 0, 2)
    foreign = copy.deepcopy(src.state_dict())  # (its tensors are src's own, stepped on below)
    foreign["state"] = {
        k: {"step": v["step"], "m": v["exp_avg"], "v": v["exp_avg_sq"]} for k, v in foreign["state"].items()
    }
    foreign["param_groups"].append(dict(foreign["param_groups"][0], params=[7]))
    seen = []

    def convert(opt, state_dict):
        state_dict["state"] = {
            k: {"step": v["step"], "exp_avg": v["m"], "exp_avg_sq": v["v"]}
            for k, v in state_dict["state"].items()
        }
        return dict(state_dict, param_groups=state_dict["param_groups"][:1])

    ours = [p.detach().clone().requires_grad_() for p in params]
    opt = fastopt.Adam(ours, lr=0.1)
    opt.register_load_state_dict_pre_hook(convert)
    opt.register_load_state_dict_post_hook(lambda o: seen.append(float(o.state[ours[0]]["step"])))
    opt.load_state_dict(foreign)
    assert seen == [2.0]
    _steps(ours, opt, 2, 2)
    _steps(params, src, 2, 2)
    torch.testing.assert_close(ours[0], params[0], rtol=2e-5, atol=2e-6)  # fp32: a few ulps a step
    # without the hook the same checkpoint is refused, naming what is wrong
    with pytest.raises(ValueError, match="param groups"):
        fastopt.Adam([p.detach().clone().requires_grad_() for p in params], lr=0.1).load_state_dict(foreign)


@pytest.mark.parametrize("info", OPTIM_DB, ids=lambda i: i.name)
def test_misspelt_keyword_is_refused(info):
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_grad_nrom'"):
        info.fastopt_cls([torch.zeros(2, requires_grad=True)], max_grad_nrom=1.0, **info.base)
    with pytest.raises(TypeError) as theirs:
        info.torch_cls([torch.zeros(2, requires_grad=True)], max_grad_nrom=1.0, **info.base)
    assert "max_grad_nrom" in str(theirs.value)  # torch refuses it the same way


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
@pytest.mark.parametrize("info,backend", CASES, ids=IDS)
def test_state_entries_have_torch_s_dtypes_and_shapes(info, backend, default):
    """Under a float64 default torch keeps 'step' (and NAdam's mu_product) in float64, so
    counts stay exact past 2^24; under float32, in float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        runs = []
        for make in (
            lambda ps: info.fastopt_cls(ps, backend=backend, **_kw(info)),
            lambda ps: info.torch_cls(ps, **_kw(info)),
        ):
            p = torch.zeros(3, requires_grad=True)
            opt = make([p])
            for _ in range(2):
                p.grad = torch.ones(3)
                opt.step()
            runs.append({k: (v.dtype, v.shape) for k, v in opt.state[p].items()})
        assert runs[0] == runs[1]
    finally:
        torch.set_default_dtype(old)


def test_a_float64_step_count_advances_past_2_to_the_24():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        p = torch.zeros(2, requires_grad=True)
        opt = fastopt.Adam([p], backend="cpp")
        p.grad = torch.ones(2)
        opt.step()
        state = opt.state_dict()
        state["state"][0]["step"] = torch.tensor(2.0**24 + 1)
        opt.load_state_dict(state)
        for _ in range(3):
            opt.step()
        assert float(opt.state[p]["step"]) == 2.0**24 + 4
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("backend", cpu_backends())
def test_adagrad_shares_its_accumulators_as_torch_does(backend):
    """Hogwild training calls share_memory() before forking workers."""
    runs = []
    for cls, kw in ((fastopt.Adagrad, dict(backend=backend)), (torch.optim.Adagrad, {})):
        p = torch.ones(3, requires_grad=True)
        opt = cls([p], lr=0.1, **kw)
        opt.share_memory()
        assert opt.state[p]["sum"].is_shared()
        for step in range(3):
            p.grad = torch.full((3,), step + 1.0)
            opt.step()
        runs.append((p.detach(), opt.state[p]["sum"]))
    torch.testing.assert_close(runs[0], runs[1])
