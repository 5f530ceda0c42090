"""Build of the optional CUDA extension ``fastopt._cuda`` (csrc/cuda_step.cu + csrc/cuda_bindings.cpp).

It is built only where a CUDA toolkit (nvcc) and a CUDA build of torch are both present.
Nothing here imports torch: its CUDA version is read from ``torch/version.py``. The module
links the CUDA runtime statically and no libtorch, so it does not depend on torch's ABI.

Use from setup.py::

    from build_cuda import cuda_extensions, with_cuda
    setup(ext_modules=[...] + cuda_extensions(), cmdclass={"build_ext": with_cuda(build_ext)})

or stand-alone, building ``fastopt/_cuda*.so`` in place: ``python build_cuda.py``.
``python build_cuda.py --out DIR --without-cuda-torch`` builds it into DIR even beside a
CPU torch (the module needs no torch): how CI checks, without a GPU, that it links and
loads. ``python build_cuda.py --out DIR --emulate`` builds the same sources with the host
C++ compiler against csrc/cuda_emulation.h instead (no nvcc needed): a module whose kernels
run on CPU tensors (``fastopt._cuda_emulated``), which the tests use to check the kernels
where no GPU is present.

Environment: ``FASTOPT_CUDA_ARCH`` ("90", "80;90", ...; default: the GPUs nvidia-smi lists,
else 80 and 90), ``FASTOPT_CUDA_JOBS`` (parallel nvcc processes), ``FASTOPT_NO_CUDA=1``
(skip the extension), ``CUDA_HOME``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension

ROOT = Path(__file__).resolve().parent
CU_SOURCES = ["csrc/cuda_step.cu"]
HEADERS = ["csrc/update_math.h"]


def cuda_home() -> Path | None:
    """The CUDA toolkit's root: CUDA_HOME/CUDA_PATH, /usr/local/cuda, or where the nvcc on
    PATH lives (a toolkit has bin/nvcc and include/cuda_runtime.h)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


def torch_cuda_version() -> str | None:
    """torch's CUDA version (e.g. "13.0"), or None for a CPU torch or no torch, without importing it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_py = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    if not version_py.exists():
        return None
    found = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([0-9.]+)['\"]", version_py.read_text(), re.MULTILINE)
    return found.group(1) if found else None


def why_not_built(need_cuda_torch: bool = True) -> str | None:
    """None when fastopt._cuda can be built here, else the reason it is skipped. Without a
    CUDA torch the module would never be used (``need_cuda_torch=False``: build it anyway)."""
    if os.environ.get("FASTOPT_NO_CUDA", "0") not in ("", "0"):
        return "FASTOPT_NO_CUDA is set"
    if cuda_home() is None:
        return "no CUDA toolkit (nvcc) found"
    if need_cuda_torch and torch_cuda_version() is None:
        return "torch is not a CUDA build"
    if _cudart_dir() is None:
        return "the CUDA toolkit has no static runtime (libcudart_static.a)"
    return None


def _cudart_dir() -> Path | None:
    home = cuda_home()
    if home is None:
        return None
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (home / sub / "libcudart_static.a").exists():
            return home / sub
    return None


def arch_flags() -> list[str]:
    """-gencode flags: machine code for each architecture, plus PTX of the newest one so that
    later GPUs can compile it when the module loads."""
    spec = (
        os.environ.get("FASTOPT_CUDA_ARCH")
        or os.environ.get("TORCH_CUDA_ARCH_LIST")
        or _local_archs()
        or "80;90"
    )
    archs = sorted(
        {a.replace(".", "").replace("+PTX", "").strip() for a in re.split(r"[;, ]+", spec) if a.strip()}
    )
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def _local_archs() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    caps = [c.strip() for c in out.splitlines() if c.strip()]
    return ";".join(caps) or None


def _jobs() -> int:
    return max(1, int(os.environ.get("FASTOPT_CUDA_JOBS", 0)) or min(os.cpu_count() or 1, 16))


# The host build of the .cu sources (--emulate): C++20 for <barrier>; the kernels' vector
# accesses reinterpret float arrays as float4, which host C++ allows only without strict
# aliasing.
EMULATION_FLAGS = ["-x", "c++", "-std=c++20", "-O2", "-fPIC", "-fno-strict-aliasing", "-pthread"]
EMULATION_MACRO = "FASTOPT_CUDA_EMULATION"
# --sanitize: AddressSanitizer and UBSan in the emulated kernels, so that a read or write
# outside a tensor (which on a GPU corrupts memory or faults far from its cause), or
# undefined behaviour, stops with a report
SANITIZE_FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-fno-omit-frame-pointer",
]


def compile_cu(
    build_dir: Path, shards: int | None = None, emulate: bool = False, extra: list[str] | None = None
) -> list[Path]:
    """Compile every .cu source into objects under build_dir; the kernels of a source are
    split into shards (preprocessor FASTOPT_SHARD) compiled in parallel. ``emulate``: with
    the host C++ compiler ($CXX, else c++) for CPU emulation instead of nvcc, with the
    ``extra`` flags."""
    include = f"-I{ROOT / 'csrc'}"
    if emulate:
        base = [
            os.environ.get("CXX", "c++"),
            *EMULATION_FLAGS,
            *(extra or []),
            f"-D{EMULATION_MACRO}",
            include,
        ]
    else:
        home = cuda_home()
        if home is None:
            raise RuntimeError("no CUDA toolkit (nvcc) found")
        base = [
            str(home / "bin" / "nvcc"),
            "-O3",
            "-std=c++17",
            "-Xcompiler",
            "-fPIC",
            include,
            *arch_flags(),
        ]
    shards = shards or _jobs()
    build_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for src in CU_SOURCES:
        for k in range(shards):
            obj = build_dir / f"{Path(src).stem}.{k}of{shards}.o"
            cmd = [
                *base,
                f"-DFASTOPT_SHARDS={shards}",
                f"-DFASTOPT_SHARD={k}",
                "-c",
                str(ROOT / src),
                "-o",
                str(obj),
            ]
            jobs.append((cmd, obj))

    def run(job: tuple[list[str], Path]) -> Path:
        cmd, obj = job
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({' '.join(cmd)}):\n{done.stdout}\n{done.stderr}")
        return obj

    with ThreadPoolExecutor(max_workers=_jobs()) as pool:
        return list(pool.map(run, jobs))


def cuda_extensions(need_cuda_torch: bool = True) -> list[Extension]:
    """[the fastopt._cuda Extension] when it can be built here, else [] (with a note on stderr)."""
    reason = why_not_built(need_cuda_torch)
    if reason is not None:
        print(f"fastopt: not building the CUDA extension: {reason}", file=sys.stderr)
        return []
    import pybind11

    ext = Extension(
        "fastopt._cuda",
        sources=["csrc/cuda_bindings.cpp"],
        include_dirs=[pybind11.get_include(), "csrc"],
        library_dirs=[str(_cudart_dir())],
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O2", "-std=c++17"],
        depends=CU_SOURCES + HEADERS,
        language="c++",
    )
    ext.cuda_sources = list(CU_SOURCES)  # compiled by with_cuda()'s build_ext
    return [ext]


def emulation_extension(sanitize: bool = False) -> Extension:
    """fastopt._cuda built for CPU emulation (csrc/cuda_emulation.h), as a test build named
    fastopt._cuda_emulated; ``sanitize``: with AddressSanitizer (load it with LD_PRELOAD)
    and UBSan."""
    import pybind11

    extra = SANITIZE_FLAGS if sanitize else []
    ext = Extension(
        "fastopt._cuda_emulated",
        sources=["csrc/cuda_bindings.cpp"],
        include_dirs=[pybind11.get_include(), "csrc"],
        define_macros=[(EMULATION_MACRO, "1")],
        libraries=["pthread"],
        extra_compile_args=["-O2", "-std=c++17", *extra],
        extra_link_args=extra,
        depends=CU_SOURCES + HEADERS + ["csrc/cuda_emulation.h"],
        language="c++",
    )
    ext.cuda_sources = list(CU_SOURCES)
    ext.emulate = True
    ext.emulation_flags = extra
    return ext


def with_cuda(build_ext_class: type) -> type:
    """A subclass of a setuptools build_ext that first compiles an extension's .cu sources
    (with nvcc, or the host compiler for an emulation build) and links the objects in."""

    class BuildExtWithCuda(build_ext_class):
        def build_extension(self, ext: Extension) -> None:
            cu = getattr(ext, "cuda_sources", None)
            if cu:
                emulate = getattr(ext, "emulate", False)
                where = Path(self.build_temp).resolve() / ("cuda-emulated" if emulate else "cuda")
                objects = compile_cu(where, emulate=emulate, extra=getattr(ext, "emulation_flags", None))
                ext.extra_objects = [*(ext.extra_objects or []), *map(str, objects)]
            super().build_extension(ext)

    return BuildExtWithCuda


def main(argv: list[str] | None = None) -> int:
    """Build fastopt/_cuda in place (python build_cuda.py [--out DIR] [--without-cuda-torch]
    [--emulate [--sanitize]])."""
    import argparse

    from setuptools import setup
    from setuptools.command.build_ext import build_ext

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, help="build the module under DIR/fastopt/ instead of in place")
    parser.add_argument(
        "--without-cuda-torch", action="store_true", help="build even where torch is a CPU build"
    )
    parser.add_argument(
        "--emulate", action="store_true", help="a test build whose kernels run on the CPU (needs --out)"
    )
    parser.add_argument(
        "--sanitize", action="store_true", help="with --emulate: AddressSanitizer and UBSan in the kernels"
    )
    args = parser.parse_args(argv)
    out = None if args.out is None else args.out.resolve()  # (relative to the caller's directory)
    if args.emulate:
        if out is None:
            parser.error("--emulate needs --out: an emulation build must not replace the real module")
        os.chdir(ROOT)
        setup(
            name="fastopt-cuda-emulated",
            ext_modules=[emulation_extension(sanitize=args.sanitize)],
            cmdclass={"build_ext": with_cuda(build_ext)},
            script_args=["build_ext", "--build-lib", str(out), "--build-temp", str(out / "temp")],
        )
        print("built fastopt._cuda_emulated (fastopt._cuda for CPU emulation)")
        return 0
    need_cuda_torch = not args.without_cuda_torch
    reason = why_not_built(need_cuda_torch)
    if reason is not None:
        print(f"cannot build fastopt._cuda: {reason}", file=sys.stderr)
        return 1
    os.chdir(ROOT)
    if out is None:
        where = ["--inplace", "--build-temp", str(ROOT / "build" / "cuda-temp")]
    else:
        where = ["--build-lib", str(out), "--build-temp", str(out / "temp")]
    setup(
        name="fastopt-cuda",
        ext_modules=cuda_extensions(need_cuda_torch),
        cmdclass={"build_ext": with_cuda(build_ext)},
        script_args=["build_ext", *where],
    )
    print(f"built fastopt._cuda for {sysconfig.get_platform()} ({' '.join(arch_flags())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
