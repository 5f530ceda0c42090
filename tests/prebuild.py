"""Makes the test builds that a full run needs late, while its first tests run.

``python tests/prebuild.py``: the CUDA C++ emulation build, the nvcc compile check of the
CUDA C++ module (where nvcc is present), then the AddressSanitizer builds of the CPU
extensions and of the emulation (tests/sanitized.py, tests/cuda_emulation.py), into their
shared cache. conftest.py starts it in the background when the run includes
test_sanitized.py: the builds take minutes on two cores, mostly on one, while most tests
keep one core busy. A test that needs a build still in progress waits for it (a file
lock); a build that fails here is made, and its failure reported, by the test itself.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import cuda_emulation  # noqa: E402 - needs the path above
import sanitized  # noqa: E402


def _nvcc_build() -> None:
    """The nvcc compile check of test_cuda_backend.py, where nvcc is present."""
    if cuda_emulation.build_script().why_not_built(need_cuda_torch=False) is None:
        cuda_emulation.nvcc_build()


if __name__ == "__main__":
    # in the order the tests need them
    builds = (
        cuda_emulation.build,
        _nvcc_build,
        sanitized.cpu_extensions,
        lambda: cuda_emulation.build(sanitize=True),
    )
    for make in builds:
        try:
            make()
        except Exception as exc:  # the test that needs it builds it again and says why
            print(f"prebuild: {type(exc).__name__}: {exc}"[:2000], file=sys.stderr)
