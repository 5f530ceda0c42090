"""Host time of an optimizer step over many small params: what a GPU step costs the CPU.

On an H100, Adam over ResNet-50 or 1000 x 64k elements runs in a few hundred µs; unless
the host issues each step faster than that, the GPU waits and the step is host-bound.
The host side can be measured on any machine: fastopt's GPU path runs its host work
(plan, gradient checks, pointer table, launch arguments) on CPU tensors with the kernel
launch replaced by nothing. Providers, side by side in interleaved rounds:

* ``fastopt-triton-host``: that GPU host path, with the C++ passes of ``fastopt._host``;
* ``fastopt-triton-host-python``: the same with the passes in Python (where ``_host`` is
  not built);
* ``fastopt-triton-host-new-table``: the C++ path when the gradients are at new addresses
  (zero_grad(set_to_none=True), then a backward whose allocations land elsewhere), so that
  the step builds and checks a new pointer table rather than reuse a cached one;
* ``fastopt-cpp``, ``torch-fused``, ``torch-foreach``: whole CPU steps of Adam on 8-element
  params, host-bound too, for scale.

Usage: ``python -m bench.host_overhead [--params 8,161,1000,10000] [--rounds 15]``; writes
``host_overhead_cpu.csv`` and ``.png`` to ``--out`` (default bench/results).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .throughput import device_name

ELEMENTS = 8  # per param: the step's own arithmetic is negligible
COLUMNS = [
    "params",
    "provider",
    "us_per_step",
    "ns_per_param",
    "vs_torch_fused",
    "note",
    "device_name",
    "torch",
]


@contextlib.contextmanager
def triton_launch_stubbed() -> Iterator[None]:
    """The Triton backend's GPU host path on CPU tensors, its kernel launch a no-op."""
    from fastopt.backends import triton_backend as tb
    from fastopt.backends import triton_kernels as K

    class NoLaunch:
        def __getitem__(self, grid: Any) -> Callable[..., None]:
            return lambda *args, **kwargs: None

    saved = (tb._interpreted, tb.unavailable_reason, tb._device_ok, K.step_kernel)
    tb._interpreted, tb.unavailable_reason, tb._device_ok = (lambda: False), (lambda: None), (lambda d: None)
    K.step_kernel = NoLaunch()
    tb.clear_cache()
    try:
        yield
    finally:
        tb._interpreted, tb.unavailable_reason, tb._device_ok, K.step_kernel = saved
        tb.clear_cache()


def _params(n: int) -> list[torch.Tensor]:
    params = [torch.zeros(ELEMENTS, requires_grad=True) for _ in range(n)]
    for p in params:
        p.grad = torch.full((ELEMENTS,), 0.1)
    return params


def providers(n: int) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """Step functions (each already warmed up) and why the missing ones are missing."""
    import fastopt
    from fastopt import tensor_lists

    steps: dict[str, Callable[[], None]] = {}
    notes: dict[str, str] = {}
    try:
        import triton  # noqa: F401
    except Exception as exc:
        notes["fastopt-triton-host"] = f"unavailable: {type(exc).__name__}: {exc}"
    else:
        # (run under triton_launch_stubbed(): see run())
        opt = fastopt.Adam(_params(n), lr=1e-3, backend="triton")
        native = tensor_lists._host

        def python_step(opt: torch.optim.Optimizer = opt) -> None:
            tensor_lists._host = None  # the passes in Python for this step only
            try:
                opt.step()
            finally:
                tensor_lists._host = native

        def new_table_step(opt: torch.optim.Optimizer = opt) -> None:
            from fastopt.backends import triton_backend

            triton_backend.clear_cache()  # as if every gradient had moved
            opt.step()

        if native is not None:
            steps["fastopt-triton-host"] = opt.step
            steps["fastopt-triton-host-new-table"] = new_table_step
        else:
            notes["fastopt-triton-host"] = "unavailable: fastopt._host is not built"
        steps["fastopt-triton-host-python"] = python_step
    if fastopt.available_backends()["cpp"] is None:
        steps["fastopt-cpp"] = fastopt.Adam(_params(n), lr=1e-3, backend="cpp").step
    else:
        notes["fastopt-cpp"] = "unavailable: fastopt._C is not built"
    steps["torch-fused"] = torch.optim.Adam(_params(n), lr=1e-3, fused=True).step
    steps["torch-foreach"] = torch.optim.Adam(_params(n), lr=1e-3, foreach=True).step
    for step in steps.values():
        step()
        step()
    return steps, notes


def measure(steps: dict[str, Callable[[], None]], rounds: int, min_s: float = 0.02) -> dict[str, float]:
    """Median seconds per step: interleaved rounds of back-to-back steps (a machine's
    load drifts; interleaving spreads it evenly over the providers)."""
    repeat = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        repeat[name] = max(1, int(min_s / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(repeat[name]):
                steps[name]()
            samples[name].append((time.perf_counter() - t0) / repeat[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def run(counts: list[int], rounds: int) -> list[dict[str, Any]]:
    rows = []
    meta = dict(device_name=device_name(torch.device("cpu")), torch=torch.__version__)
    for n in counts:
        with triton_launch_stubbed():
            steps, notes = providers(n)
            times = measure(steps, rounds)
        fused = times.get("torch-fused")
        for name in [*steps, *notes]:
            t = times.get(name)
            rows.append(
                dict(
                    params=n,
                    provider=name,
                    us_per_step=None if t is None else round(t * 1e6, 1),
                    ns_per_param=None if t is None else round(t * 1e9 / n, 1),
                    vs_torch_fused=None if t is None or not fused else round(t / fused, 3),
                    note=notes.get(name, ""),
                    **meta,
                )
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'params':>7}  {'provider':<32}{'us/step':>10}{'ns/param':>10}{'x torch fused':>15}")
    for r in rows:
        if r["us_per_step"] is None:
            print(f"{r['params']:>7}  {r['provider']:<32}{r['note']}")
        else:
            ratio = "" if r["vs_torch_fused"] is None else f"{r['vs_torch_fused']:.2f}"
            print(
                f"{r['params']:>7}  {r['provider']:<32}{r['us_per_step']:>10.1f}{r['ns_per_param']:>10.1f}{ratio:>15}"
            )


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_png(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["params"] for r in rows})
    names = list(dict.fromkeys(r["provider"] for r in rows if r["us_per_step"] is not None))
    fig, ax = plt.subplots(figsize=(8, 5))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        values = [
            next((r["ns_per_param"] for r in rows if r["params"] == n and r["provider"] == name), None) or 0.0
            for n in counts
        ]
        ax.bar([i + k * width for i in range(len(counts))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(counts))], [f"{n} params" for n in counts])
    ax.set_ylabel("host ns per param per step")
    ax.set_yscale("log")
    ax.set_title(f"Adam step over {ELEMENTS}-element params, {rows[0]['device_name']}")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.host_overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--params", default="8,161,1000,10000", help="param counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    args = parser.parse_args(argv)
    rows = run([int(n) for n in args.params.split(",")], args.rounds)
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = (os.path.join(args.out, f"host_overhead_cpu.{ext}") for ext in ("csv", "png"))
    write_csv(rows, csv_path)
    write_png(rows, png_path)
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
