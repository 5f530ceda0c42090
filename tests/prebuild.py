"""Makes the test builds that a full run needs late, while its first tests run.

``python tests/prebuild.py``: the CUDA C++ emulation build, then the AddressSanitizer builds
of the CPU extensions and of the emulation (tests/sanitized.py, tests/cuda_emulation.py),
into their shared cache. conftest.py starts it in the background when the run includes
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

if __name__ == "__main__":
    for make in (cuda_emulation.build, sanitized.cpu_extensions, lambda: cuda_emulation.build(sanitize=True)):
        try:
            make()
        except Exception as exc:  # the test that needs it builds it again and says why
            print(f"prebuild: {type(exc).__name__}: {exc}"[:2000], file=sys.stderr)
