"""AddressSanitizer builds of fastopt's C++ code, for tests that run them in a child process.

An access outside a tensor by a kernel (a vector load past a tensor's end, a tail handled
as a whole block) may read garbage that no stored value shows, or write over a neighbour's
memory; ASan stops the process at the access with a report. An ASan build only loads in a
process started with ASan's runtime preloaded, so these tests run their checks in a child
process (:func:`asan_env`). Builds are kept under build/test-builds/, keyed by a hash of their
sources, so that each is made once per checkout and change.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # (not on Windows: builds are then not shared between processes)
    fcntl = None

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "build" / "test-builds"


def _runtime(name: str) -> str:
    found = subprocess.run(["c++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(found):
        raise RuntimeError(f"the C++ compiler has no {name} (AddressSanitizer's runtime)")
    return found


def asan_env(log_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a child process that loads ASan builds: ASan's runtime preloaded,
    and libstdc++ with it (else ASan cannot find the real ``__cxa_throw`` when an extension
    throws, Python itself not being linked to libstdc++); ASan's reports go to files in
    ``log_dir`` (pytest's capture would swallow them from stderr when the process aborts).
    UBSan, built in beside ASan, writes to stderr whatever its options say."""
    return dict(
        os.environ,
        LD_PRELOAD=f"{_runtime('libasan.so')} {_runtime('libstdc++.so')}",
        ASAN_OPTIONS=f"detect_leaks=0:log_path={log_dir / 'asan'}",
        UBSAN_OPTIONS="print_stacktrace=1",
        **extra,
    )


def reports(log_dir: Path) -> str:
    """What ASan wrote to ``log_dir`` (empty when nothing went wrong)."""
    return "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("asan*")))


def cached_build(kind: str, sources: list[str], make: Callable[[Path], list[str]], variant: str = "") -> Path:
    """The folder of build ``kind`` of these sources: ``make(dir)`` gives the command that
    builds into dir, run here if this checkout has no build of the current sources yet
    (``variant``: what else the build depends on, such as the machine's instruction sets)."""
    digest = hashlib.sha256(sysconfig.get_config_var("EXT_SUFFIX").encode() + variant.encode())
    for name in sources:
        for path in sorted(ROOT.glob(name)):
            digest.update(path.read_bytes())
    out = HOME / f"{kind}-{digest.hexdigest()[:16]}"
    if out.exists():
        return out
    HOME.mkdir(parents=True, exist_ok=True)
    with open(HOME / f"{kind}.lock", "w") as lock:
        if fcntl is not None:  # a build of this kind under way elsewhere (tests/prebuild.py): wait
            fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        _build(kind, out, make)
    return out


def _build(kind: str, out: Path, make: Callable[[Path], list[str]]) -> None:
    for stale in HOME.glob(f"tmp-{kind}-*"):  # left by a build stopped midway (under the lock)
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(dir=HOME, prefix=f"tmp-{kind}-"))
    done = subprocess.run(make(work), capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if done.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"the {kind} build failed:\n" + done.stdout[-3000:] + done.stderr[-3000:])
    shutil.rmtree(work / "temp", ignore_errors=True)
    try:
        os.rename(work, out)  # whole or not at all
    except OSError:  # made meanwhile by another process
        shutil.rmtree(work, ignore_errors=True)
    for old in HOME.glob(f"{kind}-*"):  # builds of earlier sources
        if old != out:
            shutil.rmtree(old, ignore_errors=True)


def runnable_isa_builds() -> str | None:
    """The extra instruction-set builds of fastopt._C that this CPU runs, as setup.py's
    FASTOPT_ISA_BUILDS takes them ("avx2", "avx2,avx512", "none"), as the installed
    extension finds them; None where it is not installed."""
    try:
        from fastopt import _C
    except ImportError:
        return None
    return ",".join(isa[4:] for isa in _C.available_isas() if isa != "isa_base") or "none"


def cpu_extensions() -> Path:
    """A folder whose fastopt/ holds fastopt._C and fastopt._host built with ASan and UBSan
    (every instruction-set build of the kernels that this CPU runs: one it cannot run
    cannot be checked here)."""

    isas = runnable_isa_builds()

    def make(work: Path) -> list[str]:
        return [
            "env",
            "FASTOPT_SANITIZE=address,undefined",
            "FASTOPT_NO_CUDA=1",
            *([f"FASTOPT_ISA_BUILDS={isas}"] if isas is not None else []),
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-lib",
            str(work),
            "--build-temp",
            str(work / "temp"),
        ]

    sources = ["setup.py", "build_cuda.py", "tests/sanitized.py", "csrc/*.cpp", "csrc/*.h"]
    out = cached_build("cpu", sources, make, variant=f"isa builds: {isas}")
    if not list((out / "fastopt").glob("_C*")):  # setup.py leaves out what fails to build
        raise RuntimeError("the ASan build of fastopt._C is missing (see setup.py's warnings)")
    return out


def package_with(extensions: Path, into: Path) -> Path:
    """A copy of the fastopt package under ``into`` whose extensions are those built in
    ``extensions``/fastopt; put ``into`` first on the child's path (and run it there)."""
    target = into / "fastopt"
    shutil.copytree(ROOT / "fastopt", target, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for ext in (extensions / "fastopt").iterdir():
        shutil.copy2(ext, target / ext.name)
    return into
