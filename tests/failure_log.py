"""pytest plugin (loaded by conftest.py): with FASTOPT_FAILURE_LOG set, each failure is
appended to that file as soon as it is reported.

A GPU session's test call runs under a time limit, and pytest writes its summary and JUnit
report only at the end: a run cut short would lose the messages of the failures it had
already seen (bench/gpu_session.sh sets the variable).
"""

from __future__ import annotations

import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("FASTOPT_FAILURE_LOG")
    # under pytest-xdist the controller receives every worker's reports: it alone writes
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
