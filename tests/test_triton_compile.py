"""Every Triton kernel variant the backend launches compiles for the GPU, without one.

CI runs the kernels under Triton's interpreter, which executes them as NumPy code: it
checks their arithmetic but never meets the compiler, so a kernel can pass every
interpreted test and still fail to compile on the GPU machine (a loop-carried variable
that changes type, an op or layout the backend cannot lower). Here the backend's real
launches (the GPU launch configuration, the subset of the family that takes every value
of every switch, every storage dtype, the AMP and CUDA-graph hooks, packed and unaligned
tensors, the gradient-norm kernel) are recorded on the CPU and each distinct one is
compiled to a cubin for ``sm_90`` (H100, H200) and ``sm_80`` (A100) by
tests/triton_compile_worker.py. That takes the compiler alone, no driver; running the
cubins needs the GPU and is left to the GPU tests.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastopt import rule
from fastopt.scalars import step_scalars

triton = pytest.importorskip("triton")

from test_triton_backend import ADAM, HYPER, NO_WD, SUBSET  # noqa: E402

from fastopt.spec import Extra, WeightDecay  # noqa: E402

WORKER = Path(__file__).with_name("triton_compile_worker.py")
# Hopper (H100, H200: what the kernels are tuned on) and Ampere (A100)
ARCHS = [int(a) for a in os.environ.get("FASTOPT_TRITON_ARCHS", "90,80").split(",")]
# one tensor below the packing threshold (4096 elements), one of two chunks with a tail
SIZES = [100, 8192 + 300]

_TORCH_TO_TRITON = {
    torch.int64: "i64",
    torch.int32: "i32",
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.uint8: "u8",
}


class _Recorder:
    """Stands in for a kernel (compiled or interpreted): ``kernel[grid](*args, **kwargs)``
    records the launch's arguments, in the worker's format, instead of running it."""

    def __init__(self, kernel, label: list[str], launches: dict):
        self.fn, self.label, self.launches = kernel.fn, label, launches

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, num_warps: int, **kwargs) -> None:
        names = list(inspect.signature(self.fn).parameters)
        described = {}
        for name, value in zip(names, args):
            if isinstance(value, torch.Tensor):
                described[name] = {
                    "ptr": _TORCH_TO_TRITON[value.dtype],
                    "aligned": value.data_ptr() % 16 == 0,
                }
            elif isinstance(value, bool | int | float):
                described[name] = {type(value).__name__: value}
            else:
                raise TypeError(f"{name}: cannot describe {type(value).__name__} to the compiler")
        for name in names[len(args) :]:
            value = kwargs[name]
            if isinstance(value, triton.language.dtype):
                value = {"dtype": str(value)}
            described[name] = {"constexpr": value}
        launch = {
            "kernel": f"fastopt.backends.triton_kernels:{self.fn.__name__}",
            "args": described,
            "num_warps": num_warps,
        }
        key = json.dumps(launch, sort_keys=True)
        self.launches.setdefault(key, dict(launch, label=self.label[0]))


def _tensors(dtype, sizes=SIZES, offset: int = 0):
    # offset > 0: views that start off a 16-byte boundary (the unaligned kernel path)
    return [torch.randn(n + offset, dtype=torch.float32).to(dtype)[offset:] for n in sizes]


def _record_launches(monkeypatch) -> list[dict]:
    from fastopt.backends import triton_backend as tb
    from fastopt.backends import triton_kernels as K

    # the backend as it runs on a GPU: its launch configuration, CPU tensors accepted
    monkeypatch.setattr(tb, "_interpreted", lambda: False)
    monkeypatch.setattr(tb, "unavailable_reason", lambda: None)
    monkeypatch.setattr(tb, "_device_ok", lambda device: None)
    tb.clear_cache()
    label, launches = [""], {}
    monkeypatch.setattr(K, "step_kernel", _Recorder(K.step_kernel, label, launches))
    monkeypatch.setattr(K, "sumsq_kernel", _Recorder(K.sumsq_kernel, label, launches))

    def step(
        name,
        spec,
        hyper,
        t,
        dtype=torch.float32,
        state_dtype=None,
        master=False,
        offset=0,
        sizes=SIZES,
        **hooks,
    ):
        label[0] = name
        params = _tensors(dtype, sizes, offset)
        grads = _tensors(dtype, sizes, offset)
        hvps = _tensors(dtype, sizes, offset) if spec.curvature == 1 else None
        state = {r: _tensors(state_dtype or dtype, sizes) for r in spec.state_roles}
        if master:
            state["master"] = [p.float() for p in params]
        tb.step(spec, step_scalars(spec, hyper, t), params, grads, hvps, state, **hooks)

    for name, spec, hyper, t0, _ in SUBSET:
        for t in (t0, t0 + 1):  # some switches change after the first steps
            step(name, spec, hyper, t)
    adamw = ADAM.replace(weight_decay=WeightDecay.DECOUPLED)
    step("adam bf16", ADAM, HYPER, 3, torch.bfloat16)
    step("adam fp16", ADAM, HYPER, 3, torch.float16)
    step("adam fp16 fp32-state", ADAM, HYPER, 3, torch.float16, torch.float32)
    step(
        "adam bf16 master bf16-state (stochastic rounding)",
        ADAM,
        NO_WD,
        3,
        torch.bfloat16,
        torch.bfloat16,
        True,
    )
    step("adamw fp32 bf16-state (stochastic rounding)", adamw, HYPER, 3, torch.float32, torch.bfloat16)
    step("adam fp16 master", ADAM, NO_WD, 3, torch.float16, torch.float32, True)
    step("adam unaligned", ADAM, HYPER, 3, offset=1)
    step("adam one large tensor", ADAM, HYPER, 3, sizes=SIZES[1:])
    one = torch.ones(1)
    inf = torch.zeros(1)
    # as the optimizer launches an AMP step: the unscaled gradients written back too
    amp = dict(grad_scale_ptr=one, found_inf=inf, unscale_grads=one)
    step("adam amp", ADAM, NO_WD, 3, **amp)
    step("adam amp bf16", ADAM, NO_WD, 3, torch.bfloat16, **amp)
    step("adam amp no write-back", ADAM, NO_WD, 3, grad_scale_ptr=one, found_inf=inf)
    radam = ADAM.replace(extra=Extra.RADAM)
    adadelta = next(case[1] for case in SUBSET if case[0] == "adadelta")
    for name, spec in [("adam", ADAM), ("adamw", adamw), ("radam", radam), ("adadelta", adadelta)]:
        scalars = tb.scalars_tensor(step_scalars(spec, HYPER, 3), "cpu", seed=5)
        step(f"{name} capturable", spec, HYPER, 3, scalars_tensor=scalars, found_inf=inf)
    scalars = tb.scalars_tensor(step_scalars(ADAM, HYPER, 3), "cpu", seed=5)
    step("adam capturable amp", ADAM, HYPER, 3, scalars_tensor=scalars, **amp)
    step(
        "adam capturable fp32 bf16-state",
        ADAM,
        HYPER,
        3,
        torch.float32,
        torch.bfloat16,
        scalars_tensor=scalars,
    )
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        label[0] = f"global grad norm {dtype}"
        tb.global_grad_norm(_tensors(dtype) + _tensors(dtype, offset=1))
    tb.clear_cache()
    return list(launches.values())


def _compile(launches: list[dict], tmp_path: Path, arch: int = 90) -> list[dict]:
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env.pop("TRITON_INTERPRET", None)
    job = json.dumps({"arch": arch, "launches": launches})
    done = subprocess.run(
        [sys.executable, str(WORKER)], input=job, capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def launches() -> list[dict]:
    with pytest.MonkeyPatch.context() as mp:
        return _record_launches(mp)


def _constexprs(launch: dict) -> dict:
    return {k: v["constexpr"] for k, v in launch["args"].items() if "constexpr" in v}


def test_recorded_launches_take_every_kernel_variant(launches):
    """The recording is not vacuous: it holds each value of the switches the compiler sees."""
    seen: dict[str, set] = {}
    for launch in launches:
        for name, value in _constexprs(launch).items():
            seen.setdefault(name, set()).add(json.dumps(value))
    steps = [x for x in launches if x["kernel"].endswith(":step_kernel")]
    norms = [x for x in launches if x["kernel"].endswith(":sumsq_kernel")]
    assert len(norms) >= 3 and len(steps) >= 25
    for name in (
        "SR",
        "ALIGNED",
        "SCALARS_FROM_TENSOR",
        "DYNAMIC_USE_DENOMINATOR",
        "HAS_INV_SCALE",
        "HAS_FOUND_INF",
    ):
        assert seen[name] == {"true", "false"}, name
    for name in ("DT_P", "DT_G", "DT_S"):
        assert len(seen[name]) == 3, name
    for name in rule.switches(ADAM, step_scalars(ADAM, HYPER, 1)):
        expected = {"0", "1", "2"} if name.startswith(("MOMENTUM", "DENOMINATOR")) else {"0", "1"}
        assert seen[name] == ({"1", "2", "3"} if name == "NORM" else expected), name
    search = {_constexprs(x)["SEARCH"] for x in steps}
    assert 0 in search and max(search) > 0  # with and without packed small tensors
    assert {_constexprs(x)["S_MASTER"] >= 0 for x in steps} == {True, False}
    assert {_constexprs(x)["S_H"] >= 0 for x in steps} == {True, False}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_every_launch_compiles_for_the_gpu(launches, tmp_path, arch):
    results = _compile(launches, tmp_path, arch)
    assert len(results) == len(launches)
    failed = [f"{r['label']}: {r['error']}" for r in results if not r["ok"]]
    assert not failed, "\n\n".join(failed)
    assert all(r["cubin_bytes"] > 1000 for r in results)
    for r in results:  # where cuobjdump is there, its report was read (at most 255 per thread)
        assert r["registers"] is None or 0 < r["registers"] <= 255, r
    report = os.environ.get("FASTOPT_TRITON_RESOURCES")
    if report and arch == ARCHS[0]:  # registers and spills per variant, for tuning (docs/gpu.md quotes them)
        with open(report, "w") as f:
            f.write("variant,registers,spill_bytes,shared_bytes,triton,arch\n")
            for r in results:
                f.write(
                    f"{r['label']},{r['registers']},{r['spill_bytes']},{r['shared']},{triton.__version__},sm_{arch}\n"
                )


PLANTED = """
import triton
import triton.language as tl


@triton.jit
def running_sum(x_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    total = 0  # an int, then a float tensor: the interpreter's NumPy takes it, the compiler not
    for i in range(0, N, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        total = total + tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr + tl.arange(0, BLOCK), total)
"""


def test_worker_reports_what_only_the_compiler_rejects(tmp_path):
    """A kernel that Triton's interpreter runs but the compiler refuses fails here: the
    check sees past the interpreter, and a failure is reported, not swallowed."""
    path = tmp_path / "planted_kernels.py"
    path.write_text(textwrap.dedent(PLANTED))
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("planted", {str(path)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
x = torch.arange(8, dtype=torch.float32); out = torch.empty(4)
m.running_sum[(1,)](x, out, N=8, BLOCK=4)
print(out.tolist())
"""
    interpreted = subprocess.run(
        [sys.executable, "-c", run], capture_output=True, text=True, env=env, timeout=300
    )
    assert interpreted.returncode == 0, interpreted.stderr[-2000:]
    assert interpreted.stdout.strip() == "[4.0, 6.0, 8.0, 10.0]"

    launch = {
        "label": "planted",
        "kernel": f"{path}:running_sum",
        "args": {
            "x_ptr": {"ptr": "fp32", "aligned": True},
            "out_ptr": {"ptr": "fp32", "aligned": True},
            "N": {"constexpr": 8},
            "BLOCK": {"constexpr": 4},
        },
        "num_warps": 1,
    }
    fixed = dict(launch, label="fixed", kernel=f"{path}:running_sum_fixed")
    path.write_text(
        textwrap.dedent(PLANTED)
        + textwrap.dedent(PLANTED)
        .replace("running_sum", "running_sum_fixed")
        .replace("total = 0 ", "total = tl.zeros([BLOCK], tl.float32) ")
    )
    planted, good = _compile([launch, fixed], tmp_path)
    assert not planted["ok"] and "total" in planted["error"], planted
    assert good["ok"], good["error"]
