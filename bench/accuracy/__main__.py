"""Command line: ``python -m bench.accuracy EXPERIMENT [options]``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import EXPERIMENTS


def _threads(text: str) -> int:
    """An argparse type: a thread count from 1 to the machine's CPUs."""
    value, cpus = int(text), os.cpu_count() or 1
    if not 1 <= value <= cpus:
        raise argparse.ArgumentTypeError(f"must be from 1 to {cpus} (this machine's CPUs), got {value}")
    return value


def _device(text: str) -> str:
    """An argparse type: cpu, cuda or cuda:N (the experiments run on nothing else)."""
    head, _, index = text.partition(":")
    if head == "cpu" and not index or head == "cuda" and (not index or index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.accuracy",
        description="Regenerate a paper's accuracy experiment and compare it with the paper, cell by cell.",
    )
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--quick", action="store_true", help="reduced grid, epochs and data: minutes on a CPU")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "cpp", "triton", "cuda"],
        help="fastopt backend",
    )
    p.add_argument(
        "--impl",
        default="fastopt",
        choices=["fastopt", "torch", "both"],
        help="run fastopt, torch.optim, or both (each available fastopt backend with --backend auto)",
    )
    p.add_argument(
        "--data-dir", default=None, help="folder with mnist/, fashion-mnist/, cifar-10-batches-bin/ ..."
    )
    p.add_argument(
        "--out", default="bench/results/accuracy", help="results folder (default bench/results/accuracy)"
    )
    p.add_argument("--threads", type=_threads, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="replace the experiment's seeds")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (for log files)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one experiment; return the process exit status."""
    args = parse_args(argv)
    import torch

    from .common import Options
    from .data import DataError

    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    opts = Options(
        experiment=args.experiment,
        quick=args.quick,
        device=args.device,
        backend=args.backend,
        impl=args.impl,
        data_dir=args.data_dir,
        out=args.out,
        threads=args.threads,
        seeds=args.seeds,
        progress=not args.no_progress,
    )
    module = importlib.import_module(EXPERIMENTS[args.experiment])
    try:
        path = module.run(opts)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
