"""Shared test configuration.

Hypothesis runs a fixed, derandomized profile in CI so runs are reproducible; set
FASTOPT_HYPOTHESIS_PROFILE=thorough for many more examples.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

# Before torch loads its OpenMP runtime, which reads this once: a full run shares the cores
# with the test builds made in the background (tests/prebuild.py), and OpenMP's idle workers
# (torch's, the C++ extension's) spin by default, taking the core from the thread they wait
# for. Under that load a whole-family test ran 4-8x slower; passive waiting costs nothing
# measurable when the cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # tests import optim_db and helpers

pytest_plugins = ["failure_log"]

settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("FASTOPT_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def float64_default():
    """float64 default dtype: torch keeps scalar state (NAdam's mu_product) in it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(params=["interpreted", pytest.param("cuda", marks=pytest.mark.gpu)])
def triton_device(request):
    """The device of a test of the optimizer layer on the GPU backends: a CUDA GPU where
    one is present, else the CPU under Triton's interpreter (how CI runs the kernels)."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        yield torch.device("cuda")
        return
    if torch.cuda.is_available():
        pytest.skip("interpreted cases run where no GPU is present (CI)")
    from test_reliability_hostile import triton_interpreter

    with triton_interpreter():
        yield torch.device("cpu")


@pytest.fixture(
    params=[
        "triton-interpreted",
        "cuda-emulated",
        pytest.param("triton", marks=pytest.mark.gpu),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ]
)
def device_hooks(request):
    """(device, backend) of a test of the backends with device hooks (found_inf and the
    loss scale read on the device, capturable scalars) through the optimizer: on a GPU the
    compiled Triton and CUDA C++ kernels; without one, Triton's interpreter and the CUDA C++
    kernels built for CPU emulation, on CPU tensors (how CI runs them)."""
    import importlib.util

    from fastopt import backends

    backend = request.param.split("-")[0]
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if request.param in ("triton", "cuda"):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        reason = backends.unavailable_reason(backend)
        if reason is not None:
            pytest.skip(f"{backend}: {reason}")
        yield torch.device("cuda"), backend
        return
    if torch.cuda.is_available():
        pytest.skip("interpreted and emulated cases run where no GPU is present (CI)")
    from test_reliability_hostile import kernel_env

    with kernel_env("cpu", backend):
        yield torch.device("cpu"), backend


def pytest_collection_modifyitems(config, items):
    """Refuse a test that asks for a fixture nobody defines. pytest reports a missing
    fixture only when the test sets up, and a skip mark (no GPU here) comes first: a GPU
    test whose fixture was renamed would pass CI and error on the GPU machine."""
    missing = []
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:  # not a python function test
            continue
        unknown = [n for n in info.names_closure if n != "request" and n not in info.name2fixturedefs]
        if unknown:
            missing.append(f"{item.nodeid}: {', '.join(unknown)}")
    if missing:
        raise pytest.UsageError("tests ask for fixtures that are not defined:\n" + "\n".join(missing))


_PREBUILD = pytest.StashKey[subprocess.Popen]()


def pytest_collection_finish(session):
    """A run that includes test_sanitized.py (CI's) starts the builds it needs late in the
    background (tests/prebuild.py): minutes of compiling on the core the tests leave idle."""
    if os.environ.get("PYTEST_XDIST_WORKER") or sys.platform != "linux" or torch.cuda.is_available():
        return
    if not any(item.nodeid.startswith("tests/test_sanitized.py") for item in session.items):
        return
    script = os.path.join(os.path.dirname(__file__), "prebuild.py")
    session.config.stash[_PREBUILD] = subprocess.Popen(
        [sys.executable, script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def pytest_sessionfinish(session):
    builder = session.config.stash.get(_PREBUILD, None)
    if builder is not None and builder.poll() is None:  # a run stopped early: no build left behind
        os.killpg(builder.pid, signal.SIGTERM)
        builder.wait()
