"""The CUDA C++ backend's kernels on the CPU, for tests where no GPU is present.

``python build_cuda.py --emulate`` compiles csrc/cuda_step.cu and its bindings with the host
C++ compiler against csrc/cuda_emulation.h: a ``fastopt._cuda`` whose launches run the same
kernel source over CPU tensors. :func:`cuda_emulation` hands that module to the backend for
the duration, as tests/test_reliability_hostile.py's ``triton_interpreter`` does for Triton.
The build (about 15 s on two cores) is kept under build/test-builds/ with the ASan builds,
keyed by a hash of its sources, so that it is made once per checkout and change.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import sanitized
import torch

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    "build_cuda.py",
    "csrc/cuda_step.cu",
    "csrc/cuda_bindings.cpp",
    "csrc/cuda_emulation.h",
    "csrc/update_math.h",
]
# Emulated cases run where no GPU is present (CI); on a GPU machine the compiled kernels
# themselves are tested instead.
EMULATE = not torch.cuda.is_available()


def build(sanitize: bool = False) -> Path:
    """The path of the emulation build of fastopt._cuda (``sanitize``: with AddressSanitizer,
    which only loads in a process started with it preloaded: tests/sanitized.py), built here
    if this checkout has none of the current sources yet."""

    def make(work: Path) -> list[str]:
        command = [sys.executable, str(ROOT / "build_cuda.py"), "--emulate", "--out", str(work)]
        return command + (["--sanitize"] if sanitize else [])

    out = sanitized.cached_build("emulated_asan" if sanitize else "emulated", SOURCES, make)
    (path,) = (out / "fastopt").glob("_cuda_emulated*")
    return path


@functools.cache
def build_script() -> ModuleType:
    """build_cuda.py (the build of fastopt._cuda), loaded."""
    spec = importlib.util.spec_from_file_location("build_cuda", ROOT / "build_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvcc_build(arch: str = "90") -> Path:
    """The folder of the nvcc build of fastopt._cuda for ``sm_<arch>`` beside the CPU torch
    (the module links no torch and loads without a GPU; only its launches need one): CI's
    check that every .cu file still compiles and links. Kept with the other test builds
    and made in the background during a full run (tests/prebuild.py); needs nvcc (see
    ``build_script().why_not_built(need_cuda_torch=False)``)."""

    def make(work: Path) -> list[str]:
        build = [sys.executable, str(ROOT / "build_cuda.py"), "--out", str(work), "--without-cuda-torch"]
        return ["env", f"FASTOPT_CUDA_ARCH={arch}", *build]

    return sanitized.cached_build(f"nvcc_sm{arch}", SOURCES, make)


@functools.cache
def emulation_module() -> ModuleType:
    """The emulation build of fastopt._cuda, loaded."""
    spec = importlib.util.spec_from_file_location("fastopt._cuda_emulated", build())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.EMULATED
    return module


@contextlib.contextmanager
def cuda_emulation():
    """The CUDA backend runs on CPU tensors, through the emulation build, for the duration."""
    from fastopt.backends import cuda_backend

    module = emulation_module()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_backend, "_ext", module)
        mp.setattr(cuda_backend, "_ext_error", None)
        yield module
