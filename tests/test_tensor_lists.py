"""fastopt.tensor_lists: the C++ pass (fastopt._host) and the Python one give the same answers.

CI builds fastopt._host, so these tests fail (not skip) without it; each case is also run
with the extension switched off, which is how fastopt runs where it is not built.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastopt import tensor_lists


class Tagged(torch.Tensor):
    """A tensor subclass: the extension leaves such tensors to Python."""


@pytest.fixture(params=["native", "python"])
def lists(request, monkeypatch):
    if request.param == "native":
        if not tensor_lists.native():
            pytest.fail("fastopt._host is not built: `python -m pip install --no-build-isolation -e .`")
    else:
        monkeypatch.setattr(tensor_lists, "_host", None)
    return tensor_lists


def _mixed() -> list[torch.Tensor]:
    base = torch.arange(24.0).reshape(4, 6)
    return [
        torch.zeros(5),
        torch.nn.Parameter(torch.ones(2, 3)),
        base[1],  # a view at an offset
        torch.zeros(0),
        torch.zeros(3, dtype=torch.bfloat16),
        torch.zeros(()),
    ]


def test_grads_are_the_params_own_objects(lists):
    params = [torch.nn.Parameter(torch.zeros(3)), torch.zeros(2, requires_grad=True)]
    for p in params:
        p.grad = torch.ones_like(p)
    found = lists.grads(params)
    assert found is not None and all(g is p.grad for g, p in zip(found, params))
    params[1].grad = None
    assert lists.grads(params) is None
    assert lists.grads([]) == []
    tagged = torch.zeros(2).as_subclass(Tagged).requires_grad_()
    tagged.grad = torch.ones(2)
    assert lists.grads([tagged])[0] is tagged.grad


def test_addresses_and_numels(lists):
    ts = _mixed()
    assert lists.addresses(ts).tolist() == [t.data_ptr() for t in ts]
    assert lists.numels(ts).tolist() == [t.numel() for t in ts]
    assert lists.addresses([]).tolist() == [] and lists.numels([]).dtype == np.int64


def test_contiguity_and_devices(lists):
    ts = _mixed()
    assert lists.all_contiguous(ts)
    base = torch.arange(24.0).reshape(4, 6)
    assert not lists.all_contiguous([*ts, base[:, 1]])
    assert not lists.all_contiguous([base.t(), *ts])
    assert lists.one_device(ts)
    assert not lists.one_device([*ts, torch.zeros(2, device="meta")])
    assert lists.one_device([])


def test_all_like_finds_each_kind_of_mismatch(lists):
    params = [torch.zeros(2, 3), torch.nn.Parameter(torch.zeros(4)), torch.zeros(1)]
    grads = [torch.ones(2, 3), torch.ones(4), torch.ones(1)]
    assert lists.all_like(grads, params)
    wrong = {
        "shape": torch.ones(3, 2),
        "dtype": torch.ones(4, dtype=torch.float64),
        "device": torch.ones(4, device="meta"),
        "layout": torch.ones(4).to_sparse(),
    }
    for what, bad in wrong.items():
        assert not lists.all_like([grads[0], bad, grads[2]], params), what
    assert not lists.all_like(grads[:2], params)  # one missing


def test_one_dtype(lists):
    assert lists.one_dtype([]) and lists.one_dtype([torch.zeros(2), torch.nn.Parameter(torch.ones(3))])
    assert not lists.one_dtype([torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)])
    tagged = torch.zeros(2, dtype=torch.float16).as_subclass(Tagged)
    assert not lists.one_dtype([torch.zeros(2), tagged]) and lists.one_dtype([tagged, tagged])


def test_disjoint_finds_any_shared_byte(lists):
    """Separate tensors and back-to-back views share nothing; the same tensor twice, a view
    overlapping another by one element, or lists of other dtypes overlapping do; empty
    views share nothing even at one address."""
    flat = torch.zeros(40)
    views = [flat[0:10], flat[10:10], flat[10:25], flat[25:40]]
    assert lists.disjoint([views, [torch.zeros(3), torch.zeros(0)]])
    assert lists.disjoint([]) and lists.disjoint([[], [flat]])
    assert lists.disjoint([[flat[5:5], flat[5:5], flat[0:5]]])
    assert not lists.disjoint([views + [flat[24:26]]])
    assert not lists.disjoint([[flat[0:10]], [flat[9:11]]])  # one element shared
    assert not lists.disjoint([[views[0]], [views[0]]])
    half = torch.zeros(8, dtype=torch.bfloat16)
    assert lists.disjoint([[half[:4]], [half[4:]]])
    assert not lists.disjoint([[half[:5]], [half[4:]]])  # 2-byte elements: one shared
    wide = torch.zeros(4, dtype=torch.float64)
    as_floats = wide.view(torch.float32)  # eight floats over the four doubles
    assert not lists.disjoint([[wide[1:2]], [as_floats[3:4]]])  # the second double's last half
    assert lists.disjoint([[wide[1:2]], [as_floats[4:5]]])


def test_cpu_addresses_answers_only_for_contiguous_cpu_tensors_of_one_dtype(lists):
    """The CPU backend's one-pass check: the addresses where every tensor fits, else None
    (and the backend looks at them one by one, to copy or to say what is wrong)."""
    base = torch.arange(24.0).reshape(4, 6)
    good = [torch.zeros(5), base[1], torch.zeros(0), torch.zeros(())]
    sizes = lists.numels(good)
    if not lists.native():  # Python has nothing faster than the checks it falls back to
        assert lists.cpu_addresses(good, sizes) is None
        return
    assert lists.cpu_addresses(good, sizes) == [t.data_ptr() for t in good]
    assert lists.cpu_addresses(good, None) == [t.data_ptr() for t in good]
    assert lists.cpu_addresses([], None) == []
    wrong_size = sizes.copy()
    wrong_size[1] += 1
    for ts, sz in [
        (good, wrong_size),  # a size other than the param's
        (good, sizes[:2]),  # a size list of another length
        ([*good[:3], base[:, 1]], sizes),  # not contiguous
        ([*good[:3], torch.zeros((), dtype=torch.float64)], sizes),  # another dtype
        ([*good[:3], torch.zeros((), device="meta")], sizes),  # not on the CPU
        ([*good[:3], torch.zeros(()).as_subclass(Tagged)], sizes),  # a subclass: Python's to say
        (tuple(good), sizes),  # not a list
    ]:
        assert lists.cpu_addresses(ts, sz) is None


def test_subclasses_are_answered_by_python(lists):
    plain = torch.arange(6.0)
    tagged = plain.as_subclass(Tagged)
    ts = [plain, tagged]
    assert lists.addresses(ts).tolist() == [plain.data_ptr()] * 2
    assert lists.numels(ts).tolist() == [6, 6]
    assert lists.all_contiguous(ts)
    assert lists.all_like(ts, [plain, plain])
    if lists.native():
        assert lists.all_plain([[plain], [torch.nn.Parameter(plain)]])
        assert not lists.all_plain([[plain], ts])
    else:
        assert lists.all_plain([[plain]]) is None


def test_the_extension_refuses_what_is_not_a_list():
    if not tensor_lists.native():
        pytest.fail("fastopt._host is not built")
    from fastopt import _host

    with pytest.raises(TypeError, match="list of tensors"):
        _host.addresses((torch.zeros(1),))
    assert _host.addresses([torch.zeros(1), "not a tensor"]) is None
    assert _host.first_mismatch([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)]) is None


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_the_optimizer_steps_and_refuses_alike_either_way(lists, backend):
    import fastopt

    torch.manual_seed(0)
    p0 = [torch.randn(4, 3), torch.randn(5)]
    ours = [p.clone().requires_grad_() for p in p0]
    ref = [p.clone().requires_grad_() for p in p0]
    opt = fastopt.Adam(ours, lr=0.1, backend=backend)
    twin = torch.optim.Adam(ref, lr=0.1)
    for _ in range(3):
        grads = [torch.randn(3, 4).t(), torch.randn(5)]  # the first is not contiguous
        for a, b, g in zip(ours, ref, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
    for a, b in zip(ours, ref):
        # fp32 storage, three steps: the fused kernel's roundings against torch's ops
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ours[1].grad = torch.ones(5)
    ours[1].grad.data = torch.ones(6)  # past the .grad setter's size check
    with pytest.raises(RuntimeError, match="does not match its parameter"):
        opt.step()


def test_the_extension_is_used_only_with_the_torch_it_was_built_for():
    class Built:
        TORCH_VERSION = torch.__version__.split("+")[0]

    class BuiltForAnother:
        TORCH_VERSION = "1.0.0"

    assert tensor_lists._usable(Built) is Built
    assert tensor_lists._usable(BuiltForAnother) is None
    assert tensor_lists._usable(object()) is None  # no version recorded
    if tensor_lists.native():
        assert tensor_lists._host.TORCH_VERSION == torch.__version__.split("+")[0]
