"""Builds the optional C++ extensions. Nothing here imports torch.

``fastopt._C`` (the CPU step; links no torch), ``fastopt._host`` (a step's per-tensor host
work, compiled against the installed torch's headers and libraries) and, where nvcc and a
CUDA torch exist, ``fastopt._cuda`` (build_cuda.py). Each is optional: if it cannot be
built, the install still succeeds with a warning and fastopt does that work in Python or
on its torch backend.

``csrc/cpu_step.cpp`` is compiled once per instruction set on x86-64 (baseline, AVX2,
AVX-512, each into its own namespace) and the best one the CPU supports is picked at run
time, so the wheel stays portable without -march=native. Each of these builds is split into
KERNEL_SHARDS objects (a share of the rule kernels each), and all the objects compile in
parallel: on two cores the build takes about half as long as with one object per build.
With OpenMP available the step runs on the OpenMP runtime, which torch's CPU ops share.

``FASTOPT_SANITIZE=address`` builds ``_C`` and ``_host`` with AddressSanitizer, for tests
that load them in a process started with ASan's runtime preloaded (tests/sanitized.py).
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig
import traceback
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
HEADERS = [os.path.join(CSRC, h) for h in ("update_math.h", "cpu_step.h")]
KERNELS = os.path.join(CSRC, "cpu_step.cpp")
BINDINGS = os.path.join(CSRC, "bindings.cpp")

# No fast-math: NaN/Inf must propagate like torch. No FMA contraction: every build, the
# vector body and its scalar tail round exactly like separate torch ops, so results do not
# depend on the instruction set, chunking or thread count. errno/trapping only block
# vectorizing sqrt and compare-selects; neither changes a result.
GCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fvisibility=hidden",
]
MSVC_FLAGS = ["/std:c++17", "/O2", "/fp:precise", "/EHsc"]
# the objects each instruction-set build of the kernels is split into (csrc/cpu_step.cpp)
KERNEL_SHARDS = 4
# (namespace, compiler flags) of each extra instruction-set build
X86_ISAS = [
    ("isa_avx2", ["-mavx2"]),
    ("isa_avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]),
]


def sanitize_flags() -> list[str]:
    """Compile and link flags of a FASTOPT_SANITIZE test build (else none): a comma list of
    ``address`` (AddressSanitizer) and ``undefined`` (UBSan, stopping at the first report)."""
    which = [w for w in os.environ.get("FASTOPT_SANITIZE", "").split(",") if w not in ("", "0")]
    if not which:
        return []
    unknown = set(which) - {"address", "undefined"}
    if unknown:
        raise ValueError(f"FASTOPT_SANITIZE: {sorted(unknown)} unknown (address, undefined)")
    flags = [f"-fsanitize={','.join(which)}", "-fno-omit-frame-pointer"]
    return flags + (["-fno-sanitize-recover=undefined"] if "undefined" in which else [])


def debug_flags() -> list[str]:
    """Debug information (GCC, Clang): none in a release build (Python's own CFLAGS ask for
    full -g, which makes the kernels' many template instances compile half again as long);
    line tables in a sanitizer build, so that its reports name file and line."""
    return ["-g1"] if sanitize_flags() else ["-g0"]


def _warn(message: str) -> None:
    bar = "=" * 78
    print(
        f"\n{bar}\nWARNING: {message}\nfastopt will do without it (see setup.py).\n{bar}\n", file=sys.stderr
    )


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: a failed build prints a warning instead."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any failure leaves the extension out
            _warn(f"building fastopt._C failed ({type(exc).__name__}: {exc})")

    def build_extension(self, ext: Extension) -> None:
        try:
            if ext.name == "fastopt._C":
                self._build(ext)
            else:  # _host, and _cuda (nvcc objects from build_cuda.with_cuda): the standard way
                super().build_extension(ext)
        except Exception as exc:
            self._leave_out(ext, exc)

    def _leave_out(self, ext: Extension, exc: Exception) -> None:
        """Warn, and remember the extension so that nothing tries to copy or install it."""
        traceback.print_exc()
        _warn(f"building {ext.name} failed ({type(exc).__name__}: {exc})")
        self._failed = [*getattr(self, "_failed", []), ext.name]

    def _built(self) -> list[Extension]:
        return [e for e in self.extensions if e.name not in getattr(self, "_failed", [])]

    def copy_extensions_to_source(self) -> None:  # build_ext --inplace
        extensions, self.extensions = self.extensions, self._built()
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = extensions

    def get_outputs(self) -> list[str]:  # what an (editable) wheel installs
        return [self.get_ext_fullpath(e.name) for e in self._built()]

    def get_output_mapping(self) -> dict[str, str]:  # editable installs: build -> source tree
        extensions, self.extensions = self.extensions, self._built()
        try:
            return super().get_output_mapping()
        finally:
            self.extensions = extensions

    def _openmp_flags(self) -> list[str]:
        """-fopenmp if the compiler takes it (else the kernels use their own thread pool)."""
        if not self._gcc_like() or os.environ.get("FASTOPT_NO_OPENMP"):
            return []
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "omp_probe.cpp")
            with open(src, "w") as f:
                f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
            try:
                objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
                self.compiler.link_executable(objs, "omp_probe", output_dir=tmp, extra_postargs=["-fopenmp"])
            except Exception:
                return []
        return ["-fopenmp"]

    def _gcc_like(self) -> bool:
        return self.compiler.compiler_type != "msvc"

    def _isa_builds(self) -> list[tuple[str, list[str]]]:
        """The extra instruction-set builds: all of X86_ISAS on x86-64 with GCC or Clang.
        ``FASTOPT_ISA_BUILDS`` (a comma list of avx2, avx512, or none) makes fewer: a test
        build for one machine need not compile what its CPU cannot run."""
        machine = platform.machine().lower()
        if not self._gcc_like() or machine not in ("x86_64", "amd64"):
            return []
        chosen = os.environ.get("FASTOPT_ISA_BUILDS")
        if chosen is None:
            return X86_ISAS
        names = {n.strip() for n in chosen.split(",")} - {"", "none"}
        unknown = names - {name[4:] for name, _ in X86_ISAS}
        if unknown:
            raise ValueError(f"FASTOPT_ISA_BUILDS: {sorted(unknown)} unknown (avx2, avx512, none)")
        return [(name, flags) for name, flags in X86_ISAS if name[4:] in names]

    def _build(self, ext: Extension) -> None:
        import pybind11  # a build dependency (pyproject.toml)

        linked = self._openmp_flags() + sanitize_flags()  # flags of the compile and the link
        flags = (GCC_FLAGS + debug_flags() if self._gcc_like() else MSVC_FLAGS) + linked
        includes = [CSRC, pybind11.get_include(), sysconfig.get_paths()["include"]]
        isas = self._isa_builds()
        have = [(f"FASTOPT_HAVE_{name[4:].upper()}", "1") for name, _ in isas]
        # (source, output folder, macros, extra flags) of each object
        jobs = [(BINDINGS, "main", [], [])]
        for name, isa_flags in [("isa_base", []), *isas]:
            for shard in range(KERNEL_SHARDS):
                macros = [("FASTOPT_KERNEL_SHARDS", str(KERNEL_SHARDS)), ("FASTOPT_KERNEL_SHARD", str(shard))]
                if name == "isa_base" and shard == 0:  # with the dispatcher
                    macros += have
                else:
                    macros += [("FASTOPT_ISA_NS", name), ("FASTOPT_MAIN", "0")]
                if name != "isa_base":  # no inline code shared with another build through the linker
                    macros.append(("FASTOPT_INLINE", "static inline"))
                jobs.append((KERNELS, f"{name}-{shard}", macros, isa_flags))
        # the largest objects first, so that the last one to finish is short
        jobs.sort(key=lambda job: job[0] == BINDINGS)
        for _, folder, _, _ in jobs:
            os.makedirs(os.path.join(self.build_temp, folder), exist_ok=True)

        def compile_one(job: tuple[str, str, list, list]) -> list[str]:
            source, folder, macros, extra = job
            return self.compiler.compile(
                [source],
                output_dir=os.path.join(self.build_temp, folder),
                macros=macros,
                include_dirs=includes,
                extra_postargs=flags + extra,
                depends=HEADERS,
            )

        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            objects = [obj for objs in pool.map(compile_one, jobs) for obj in objs]

        ext_path = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(ext_path) or ".", exist_ok=True)
        self.compiler.link_shared_object(
            objects,
            ext_path,
            libraries=self.get_libraries(ext),
            library_dirs=ext.library_dirs,
            export_symbols=self.get_export_symbols(ext),
            extra_postargs=linked,
            build_temp=self.build_temp,
            target_lang="c++",
        )


HOST = os.path.join(CSRC, "host.cpp")


def torch_dirs() -> tuple[list[str], str] | None:
    """The installed torch's include directories and library directory, found without
    importing it (a build never imports or installs torch), or None without a torch."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    include = os.path.join(root, "include")
    if not os.path.isdir(include):
        return None
    return [include, os.path.join(include, "torch", "csrc", "api", "include")], os.path.join(root, "lib")


def host_extensions() -> list[Extension]:
    """fastopt._host (csrc/host.cpp), built against the torch installed beside it."""
    found = torch_dirs()
    if found is None:
        return []
    includes, lib = found
    return [
        Extension(
            "fastopt._host",
            sources=[HOST],
            include_dirs=[*includes, sysconfig.get_paths()["include"]],
            library_dirs=[lib],
            runtime_library_dirs=[lib],
            libraries=["c10", "torch_cpu", "torch_python"],
            extra_compile_args=[
                "-std=c++20",
                "-O2",
                "-fvisibility=hidden",
                *debug_flags(),
                *sanitize_flags(),
            ],
            extra_link_args=sanitize_flags(),
            language="c++",
        )
    ]


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_cuda import cuda_extensions, with_cuda  # noqa: E402 - needs the path above


class BuildExt(with_cuda(OptionalBuildExt)):
    """Compiles the .cu sources of fastopt._cuda (where nvcc and a CUDA torch are present)
    before the link; like every extension here, a failure only leaves it out."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._leave_out(ext, exc)


setup(
    ext_modules=[
        Extension("fastopt._C", sources=[BINDINGS, KERNELS], depends=HEADERS, language="c++"),
        *host_extensions(),
        *cuda_extensions(),
    ],
    cmdclass={"build_ext": BuildExt},
)
