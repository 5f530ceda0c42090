"""fastopt's C++ kernels under AddressSanitizer: no read or write outside a tensor.

The value tests cannot see every stray access: a load past a tensor's end may feed lanes
whose results are never stored, and a store past it may land in allocator padding. Here
the kernels are built with ASan (tests/sanitized.py) and run in a child process that
preloads its runtime, where any such access stops the process with a report:

* the CPU extensions (``fastopt._C`` with every instruction-set build of its kernels that
  the CPU runs, and
  ``fastopt._host``) under their own tests, test_cpp_backend.py and test_tensor_lists.py
  (ragged tails, chunk and piece boundaries, every storage dtype, threads, instruction
  sets, the written-back gradients), and under the optimizer layer's test_torch_parity.py,
  test_drop_in.py and test_reliability_amp.py;
* the CUDA C++ kernels built for CPU emulation (tests/cuda_emulation.py), over ragged,
  chunk-crossing and unaligned tensors (tests/cuda_sanitized_worker.py).

The builds carry UBSan too (stopping at its first report). A kernel made to read past its
tensors (a block length or a vector access taken whole at a tensor's end) fails both with
ASan's heap-buffer-overflow report; a stochastic-rounding key shifted past the width of an
int fails with UBSan's.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import sanitized
from cuda_emulation import EMULATE
from cuda_emulation import build as emulation_build

TESTS = sanitized.ROOT / "tests"
# the runtime is preloaded with LD_PRELOAD (glibc's loader); CI runs on Linux
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="ASan preloading here is Linux-only")


def _check(done: subprocess.CompletedProcess, log_dir, clean_mark: str) -> None:
    found = sanitized.reports(log_dir)  # (UBSan, built in beside ASan, reports on stderr)
    assert not found and done.returncode == 0, found[:6000] + done.stderr[:6000] + done.stdout[-2000:]
    assert clean_mark in done.stdout


def test_cpu_extensions_stay_inside_their_tensors(tmp_path):
    root = sanitized.package_with(sanitized.cpu_extensions(), tmp_path / "pkg")
    logs = tmp_path / "logs"
    logs.mkdir()
    env = sanitized.asan_env(logs, PYTHONPATH=str(root))
    # the child imports the copy (run there, first on its path), and ASan is in it
    probe = "import fastopt._C as c, fastopt._host as h; print(c.__file__, h.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(path.startswith(str(root)) for path in where.stdout.split()), where.stdout
    # the extensions' own tests, and the optimizer layer over them: the torch.optim parity
    # table, state edits, AMP with gradients written back (shared and overlapping ones) and
    # the stochastic rounding of bf16 state
    names = [
        "test_cpp_backend",
        "test_tensor_lists",
        "test_torch_parity",
        "test_drop_in",
        "test_reliability_amp",
        "test_stochastic_rounding",
    ]
    # the Triton and CUDA C++ cases of these files run the interpreter or the emulation
    # build, none of the C++ built here (the emulation has a test of its own, below)
    tests = [str(TESTS / f"{name}.py") for name in names] + ["-k", "not triton and not cuda"]
    # left out as well, for time (a third of the run): a training run on the torch backend,
    # and the orthogonal switches, which the kernels take as scalars (the same loads and
    # stores as the whole family's test, which runs); node ids are relative to the
    # checkout's root, pytest's rootdir
    tests += [
        "--deselect=tests/test_stochastic_rounding.py::test_bf16_state_tracks_fp32_state[torch]",
        "--deselect=tests/test_cpp_backend.py::test_orthogonal_switches_and_grad_scale_match_torch_backend",
    ]
    done = subprocess.run(
        # --capture=sys: what the sanitizers write to file descriptor 2 reaches us even
        # when they stop the process in the middle of a test
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys", *tests],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    _check(done, logs, " passed")
    assert " failed" not in done.stdout, done.stdout[-3000:]


def test_emulated_cuda_kernels_stay_inside_their_tensors(tmp_path):
    if not EMULATE:
        pytest.skip("emulated cases run where no GPU is present (CI)")
    done = subprocess.run(
        [sys.executable, str(TESTS / "cuda_sanitized_worker.py"), str(emulation_build(sanitize=True))],
        capture_output=True,
        text=True,
        timeout=900,
        env=sanitized.asan_env(tmp_path),
    )
    _check(done, tmp_path, "sanitized emulation: clean")
