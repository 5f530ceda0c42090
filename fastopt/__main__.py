"""``python -m fastopt verify|bench``: check every backend, or measure throughput."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m fastopt verify [--stride N] [--steps N]\n"
              "       python -m fastopt bench [--device auto|cpu|cuda] [--quick] ...  (bench/throughput.py)")  # fmt: skip
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "verify":
        from .verify import main as verify_main

        return verify_main(rest)
    if command == "bench":
        try:
            from bench.throughput import main as bench_main
        except ImportError as exc:
            print(
                f"the throughput benchmark lives in the repository's bench/ folder: run this from a checkout ({exc})"
            )
            return 2
        return bench_main(rest)
    print(f"unknown command {command!r}; use verify or bench")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
