"""GPU optimizer-step throughput: fastopt's Triton and CUDA backends against torch.optim.

Builds on bench/throughput.py (its optimizer cases, providers, byte counts and CSV/PNG
writers) with what a GPU needs on top:

* timing by CUDA events over several back-to-back steps per sample (a host-bound step shows
  up as such: the GPU waits between launches), interleaved rounds, median;
* GPU-sized param sets: one 64M tensor, 1000 x 64k, ResNet-50, GPT-2 small and a
  1B-parameter GPT-2 (width 1600, 32 layers), plus 10,000 tiny tensors against one tensor of
  the same size;
* ``triton-kernel`` / ``cuda-kernel``: the backend's ``step`` called directly with fixed
  scalars (the kernel and its pointer table, without the optimizer layer's Python);
* the roofline: a device-to-device copy in the same run, bytes read + written per second;
  a step's floor is its bytes over that bandwidth;
* layout experiments (pointer table vs one flat buffer; packing of small tensors) and a
  launch-configuration sweep (``--tune``).

Usage: ``python -m bench.gpu_throughput [--quick] [--tune] [--budget SECONDS] [--out
bench/results]``; writes ``throughput_cuda_<GPU>.csv`` and ``.png``. Measurements run in
the order of ``plan`` (what the targets lean on first); under ``--budget`` none starts once
the budget is spent, and the table and the targets are printed from what was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .shapes import gpt2_small_shapes, numel, resnet50_shapes
from .throughput import (
    CASE_BY_NAME,
    FP32_STATE,
    Case,
    _short_error,
    build_steps,
    bytes_per_step,
    make_params,
    write_csv,
    write_png,
)

PARAM_SETS = {
    "resnet50": resnet50_shapes(),
    "gpt2-small": gpt2_small_shapes(),
    "64M": [(2**26,)],
    "1000x64k": [(2**16,)] * 1000,
    "gpt2-1B": gpt2_small_shapes(d=1600, layers=32),
}
TINY_SETS = {"10000x100": [(100,)] * 10000, "1x1M": [(10**6,)]}
BF16 = "adam_bf16_state"
OPTIMIZERS = [
    "adam",
    "adamw",
    BF16,
    "rmsprop",
    "adadelta",
    "adamax",
    "nadam",
    "radam",
    "nadam_dozat",
    "adam_linf",
]
BIG_OPTIMIZERS = ("adam", "adamw", BF16)  # on the 1B set
NO_FUSED = ("rmsprop", "adadelta", "adamax", "nadam", "radam", "nadam_dozat", "adam_linf")
PRIMARY = "fastopt-triton"
# torch.compile'd steps are measured where the targets name them (compile takes a while)
COMPILED = {("adam", "resnet50"), ("adam", "gpt2-small"), ("adamw", "resnet50"), ("adamw", "gpt2-small")}
# the 1B set holds a state per provider: only a few providers fit next to each other
BIG_PROVIDERS = ("fastopt-triton", "triton-kernel", "torch-fused", "torch-foreach")


# ---- timing -------------------------------------------------------------------------------------


def time_steps(
    steps: dict[str, Callable[[], None]], rounds: int, min_ms: float = 2.0
) -> dict[str, list[float]]:
    """ms per step of each function: warm up, then interleaved rounds of k back-to-back
    steps between two CUDA events (k so that a sample lasts about min_ms)."""
    per_sample = {}
    for name, fn in steps.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = (time.perf_counter() - t0) * 1e3
        per_sample[name] = max(1, min(200, math.ceil(min_ms / max(est, 1e-3))))
    times: dict[str, list[float]] = {n: [] for n in steps}
    names = list(steps)
    for r in range(rounds if names else 0):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            k = per_sample[name]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(k):
                steps[name]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / k)
    return times


def set_copy_bandwidth(shapes) -> float:
    """Bandwidth of torch._foreach_copy_ over the set's own tensors (bytes read + written):
    what a multi-tensor pass over this layout of memory achieves, for comparison."""
    src = [torch.ones(s, device="cuda") for s in shapes]
    dst = [torch.empty(s, device="cuda") for s in shapes]
    ms = statistics.median(time_steps({"copy": lambda: torch._foreach_copy_(dst, src)}, rounds=7)["copy"])
    return 8 * numel(shapes) / (ms * 1e-3)


def copy_bandwidth(elements: int = 2**28) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    a = torch.empty(elements, device="cuda")
    b = torch.ones(elements, device="cuda")
    ms = statistics.median(time_steps({"copy": lambda: a.copy_(b)}, rounds=10)["copy"])
    return 8 * elements / (ms * 1e-3)  # a and b are freed on return


# ---- providers ----------------------------------------------------------------------------------


def kernel_step(case: Case, params: list[torch.Tensor], backend: str) -> Callable[[], None]:
    """The backend's step called directly: fixed scalars (step 10), state created here."""
    from fastopt import backends, presets
    from fastopt.scalars import step_scalars

    be = backends.get(backend)
    spec = presets.spec(case.preset)
    hyper = {**presets.PRESETS[case.preset].defaults, **case.kwargs}
    hyper = {"mu": 0.9, "nu": 0.999, "eps": 1e-8, **hyper}
    scalars = step_scalars(spec, _generic(hyper), 10)
    dtype = case.state_dtype or params[0].dtype
    state = {r: [torch.zeros_like(p, dtype=dtype) + 0.01 for p in params] for r in spec.state_roles}
    grads = [p.grad for p in params]
    return lambda: be.step(spec, scalars, params, grads, None, state)


def _generic(h: dict[str, Any]) -> dict[str, Any]:
    """torch.optim's hyperparameter names to fastopt's generic ones (for step_scalars)."""
    out = dict(h)
    if "betas" in out:
        out["mu"], out["nu"] = out.pop("betas")
    if "momentum" in out and isinstance(out["momentum"], float):
        out["mu"] = out.pop("momentum")
    if "alpha" in out:
        out["nu"] = out.pop("alpha")
    if "rho" in out:
        out["nu"] = out.pop("rho")
    return out


def all_steps(
    case: Case, pset: str, params, hvps, compile_ok: bool = True
) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """Every provider's step of a cell; ``compile_ok`` False leaves the torch.compile'd step
    out (noted) where too little of the budget is left for its compile."""
    compiled = (case.name, pset) in COMPILED
    steps, notes = build_steps(case, params, hvps, torch.device("cuda"), compiled and compile_ok)
    if compiled and not compile_ok:
        notes["torch-compiled"] = "skipped: too little of the budget left for its compile"
    steps.pop("fastopt-torch", None)  # the portable backend: not a GPU contender
    for backend in ("triton", "cuda"):
        if f"fastopt-{backend}" in steps and (pset != "gpt2-1B" or f"{backend}-kernel" in BIG_PROVIDERS):
            steps[f"{backend}-kernel"] = kernel_step(case, params, backend)
    if pset == "gpt2-1B":
        steps = {k: v for k, v in steps.items() if k in BIG_PROVIDERS}
    return steps, notes


# ---- the runs -------------------------------------------------------------------------------------


def run_set(
    case: Case, pset: str, shapes, bandwidth: float, rounds: int, meta: dict, compile_ok: bool = True
) -> list[dict[str, Any]]:
    params, hvps = make_params(shapes, torch.device("cuda"), hvp=False)  # (no GPU case uses H u)
    steps, notes = all_steps(case, pset, params, hvps, compile_ok)
    t0 = time.perf_counter()
    times = {}
    for name, fn in steps.items():  # warm up one by one: a failure (or compile) stays local
        try:
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
        except Exception as exc:  # report it as a row, keep going
            notes[name] = f"failed: {_short_error(exc)}"
    live = {k: v for k, v in steps.items() if k not in notes}
    times = time_steps(live, rounds)
    nbytes = bytes_per_step(case, shapes)
    # the fp32-state reference of a bf16-state case moves fp32 state's bytes
    fp32_bytes = bytes_per_step(dataclasses.replace(case, state_dtype=None), shapes)
    state_dtype = "fp32" + (f"/{str(case.state_dtype)[6:]}-state" if case.state_dtype else "")
    rows = []
    for name in [*live, *notes]:
        ts = times.get(name)
        med = statistics.median(ts) if ts else None
        moved = fp32_bytes if name.endswith(FP32_STATE) else nbytes
        rows.append(
            dict(
                benchmark="gpu_throughput",
                optimizer=case.name,
                param_set=pset,
                provider=name,
                dtype="fp32" if name.endswith(FP32_STATE) else state_dtype,
                ms_median=None if med is None else round(med, 4),
                ms_p20=None if not ts else round(_quantile(ts, 0.2), 4),
                ms_p80=None if not ts else round(_quantile(ts, 0.8), 4),
                gbps=None if med is None else round(moved / med / 1e6, 1),
                roofline_fraction=None if med is None else round(moved / bandwidth * 1e3 / med, 3),
                bytes_per_step=moved,
                tensors=len(shapes),
                elements=numel(shapes),
                note=notes.get(name, ""),
                **meta,
            )
        )
    # the copy's bandwidth as a row of its own: the plot's roofline
    rows.append(
        dict(rows[0], provider="roofline", ms_median=round(nbytes / bandwidth * 1e3, 4), ms_p20=None,
             ms_p80=None, gbps=round(bandwidth / 1e9, 1), roofline_fraction=1.0, bytes_per_step=nbytes,
             dtype=state_dtype, note="device-to-device copy of the same run")
    )  # fmt: skip
    print(f"  {pset:>10} {case.name:<16} {time.perf_counter() - t0:6.1f} s", flush=True)
    del steps, live, params, hvps
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def tiny_experiment(rounds: int) -> list[str]:
    """10,000 tiny tensors against one tensor of the same size (Adam fp32): eager through the
    optimizer, the kernel call alone, and the kernel captured in a CUDA graph (no host work)."""
    from fastopt.backends import triton_backend as tb

    lines = []
    case = CASE_BY_NAME["adam"]
    results: dict[str, dict[str, float]] = {}
    for pset, shapes in TINY_SETS.items():
        params, hvps = make_params(shapes, torch.device("cuda"))
        steps, _ = build_steps(case, params, hvps, torch.device("cuda"), False)
        steps = {k: v for k, v in steps.items() if k in ("fastopt-triton", "torch-fused", "torch-foreach")}
        steps["triton-kernel"] = kernel_step(case, params, "triton")
        steps["triton-kernel-unpacked"] = _unpacked(kernel_step(case, params, "triton"))
        # (the last: the optimizer itself, capturable=True, captured whole)
        for name, capture, pack in (
            ("triton-graph", _graphed, 1),
            ("triton-graph-unpacked", _graphed, 0),
            ("fastopt-graph", _graphed_optimizer, 1),
        ):
            tb._GPU_CONFIG["pack"] = pack
            try:
                steps[name] = capture(case, params)
            except Exception as exc:  # reported, the other providers still run
                lines.append(f"{name} failed on {pset}: {_short_error(exc)}")
            finally:
                tb._GPU_CONFIG["pack"] = 1
        times = time_steps(steps, rounds)
        results[pset] = {k: statistics.median(v) for k, v in times.items()}
        del steps, params
        gc.collect()
    many, one = results["10000x100"], results["1x1M"]
    lines.append(f"{'provider':<24}{'10000x100 ms':>14}{'1x1M ms':>10}{'ratio':>8}")
    for k in many:
        if k in one:  # (a provider that failed on one of the two sets has no ratio)
            lines.append(f"{k:<24}{many[k]:>14.4f}{one[k]:>10.4f}{many[k] / one[k]:>8.2f}")
    return lines


def graph_ratio(report: str) -> float | None:
    """The 10,000-tiny / one-tensor ratio of a CUDA-graph step from tiny_experiment's lines:
    the whole optimizer's (fastopt-graph) where it ran, else the kernel's (triton-graph)."""
    ratios = {}
    for line in report.splitlines():
        cells = line.split()
        if len(cells) == 4 and cells[0] in ("fastopt-graph", "triton-graph"):
            try:
                ratios[cells[0]] = float(cells[3])
            except ValueError:  # not a table row
                pass
    return ratios.get("fastopt-graph", ratios.get("triton-graph"))


def _unpacked(fn: Callable[[], None]) -> Callable[[], None]:
    """fn with the Triton backend's packing of small tensors switched off."""
    from fastopt.backends import triton_backend as tb

    def run() -> None:
        tb._GPU_CONFIG["pack"] = 0
        try:
            fn()
        finally:
            tb._GPU_CONFIG["pack"] = 1

    return run


def _graphed(case: Case, params: list[torch.Tensor]) -> Callable[[], None]:
    """The Triton step with device scalars, captured in a CUDA graph; replay = one step."""
    from fastopt import presets
    from fastopt.backends import triton_backend as tb
    from fastopt.scalars import step_scalars

    spec = presets.spec(case.preset)
    scalars = step_scalars(spec, dict(lr=1e-3, mu=0.9, nu=0.999, eps=1e-8), 10)
    sc = tb.scalars_tensor(scalars, "cuda")
    state = {r: [torch.zeros_like(p) + 0.01 for p in params] for r in spec.state_roles}
    grads = [p.grad for p in params]
    tb.step(spec, scalars, params, grads, None, state, scalars_tensor=sc)  # compile + table
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tb.step(spec, scalars, params, grads, None, state, scalars_tensor=sc)
    return graph.replay


def _graphed_optimizer(case: Case, params: list[torch.Tensor]) -> Callable[[], None]:
    """fastopt.Adam(capturable=True) with a device lr: warmed up on a side stream, then one
    step() captured in a CUDA graph; a replay is a whole optimizer step without host work."""
    import fastopt

    opt = fastopt.Adam(params, lr=torch.tensor(1e-3, device="cuda"), backend="triton", capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def layout_experiment(rounds: int) -> list[str]:
    """Pointer table over separate tensors vs the same sizes as views of one flat buffer
    (which the table coalesces into one entry), Adam fp32 through the kernel call."""
    from fastopt.backends import triton_backend as tb

    lines = [f"{'param set':<12}{'separate ms':>12}{'flat ms':>10}{'flat, not coalesced ms':>24}"]
    case = CASE_BY_NAME["adam"]
    for pset in ("1000x64k", "resnet50"):
        shapes = PARAM_SETS[pset]
        sep, _ = make_params(shapes, torch.device("cuda"))
        sizes = [p.numel() for p in sep]
        flat_p = torch.cat([p.detach().reshape(-1) for p in sep])
        flat_g = torch.cat([p.grad.reshape(-1) for p in sep])
        views = list(flat_p.split(sizes))
        for v, g in zip(views, flat_g.split(sizes), strict=True):
            v.grad = g
        steps = {"separate": kernel_step(case, sep, "triton"), "flat": kernel_step(case, views, "triton")}
        coalesce = tb._coalesce
        tb._coalesce = lambda ptrs, sizes, esizes: (ptrs[sizes > 0], sizes[sizes > 0])
        tb.clear_cache()
        flat_nc = kernel_step(case, views, "triton")
        flat_nc()  # builds its (uncoalesced) table now
        tb._coalesce = coalesce
        steps["flat-nc"] = flat_nc
        times = {k: statistics.median(v) for k, v in time_steps(steps, rounds).items()}
        lines.append(f"{pset:<12}{times['separate']:>12.4f}{times['flat']:>10.4f}{times['flat-nc']:>24.4f}")
        del sep, views, flat_p, flat_g, steps
        gc.collect()
    return lines


def tune(rounds: int) -> list[str]:
    """Block, chunk and warps of the Triton launch: ms of the kernel call per config."""
    from fastopt.backends import triton_backend as tb

    case = CASE_BY_NAME["adam"]
    sets = {k: PARAM_SETS[k] for k in ("64M", "1000x64k", "resnet50")}
    params = {k: make_params(v, torch.device("cuda"))[0] for k, v in sets.items()}
    saved = dict(tb._GPU_CONFIG)
    lines = [f"{'block':>6}{'chunk':>7}{'warps':>6}" + "".join(f"{k:>12}" for k in sets)]
    for block in (1024, 2048, 4096):
        for chunk in (8192, 16384, 65536):
            for warps in (4, 8):
                tb._GPU_CONFIG.update(block=block, chunk=chunk, num_warps=warps)
                steps = {k: kernel_step(case, p, "triton") for k, p in params.items()}
                times = {k: statistics.median(v) for k, v in time_steps(steps, rounds).items()}
                lines.append(f"{block:>6}{chunk:>7}{warps:>6}" + "".join(f"{times[k]:>12.4f}" for k in sets))
    tb._GPU_CONFIG.clear()
    tb._GPU_CONFIG.update(saved)
    return lines


# ---- the order of the run --------------------------------------------------------------------------

TINY = ("tiny",)
# what the targets lean on most, measured first: a run cut short by its budget keeps them
FIRST = ("adam", BF16)


def plan(optimizers: list[str], sets: list[str], tiny: bool) -> list[tuple[str, ...]]:
    """The measurements of a run, in order: (optimizer, param set) cells, optimizer by
    optimizer over every set (a run cut short leaves whole rows of the table), Adam and
    bf16-state Adam first, then the many-tiny-tensors experiment, then the rest as given."""
    first = [o for o in FIRST if o in optimizers]
    rest = [o for o in optimizers if o not in first]
    cells: list[tuple[str, ...]] = []
    for group in (first, rest):
        cells += [(o, s) for o in group for s in sets if s != "gpt2-1B" or o in BIG_OPTIMIZERS]
        if group is first and tiny:
            cells.append(TINY)
    return cells


class Budget:
    """Seconds of measurement from its creation on; ``left_out`` collects what was not run."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.left_out: list[str] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


def run_tiny(rounds: int, seconds: float | None = None) -> str:
    """tiny_experiment in a process of its own: a failure there (a CUDA graph that breaks the
    context) must not take the other measurements with it. ``seconds``: its time limit."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.gpu_throughput", "--tiny-only", "--rounds", str(rounds)],
            capture_output=True,
            text=True,
            timeout=seconds,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return out + f"stopped at its limit of {seconds:.0f} s"
    return done.stdout + (done.stderr[-2000:] if done.returncode else "")


# ---- report ---------------------------------------------------------------------------------------


def targets(rows: list[dict[str, Any]], tiny_ratio: float | None) -> list[str]:
    def ms(opt, pset, prov):
        hit = [r for r in rows if (r["optimizer"], r["param_set"], r["provider"]) == (opt, pset, prov)]
        return hit[0]["ms_median"] if hit else None

    def frac(opt, pset, prov=PRIMARY):
        hit = [r for r in rows if (r["optimizer"], r["param_set"], r["provider"]) == (opt, pset, prov)]
        return hit[0]["roofline_fraction"] if hit else None

    out = []

    def check(label, value, ok):
        if value is not None:
            out.append(f"[{'met' if ok(value) else 'NOT met'}] {label}: {value:.2f}")

    for opt in ("adam", "adamw"):
        for pset in ("64M", "1000x64k", "gpt2-small", "gpt2-1B"):
            check(f"{opt} roofline fraction on {pset} (>= 0.9)", frac(opt, pset), lambda v: v >= 0.9)
        for pset in ("resnet50", "gpt2-small"):
            mine = ms(opt, pset, PRIMARY)
            for prov, need in (("torch-fused", 1.1), ("torch-compiled", 1.0)):
                other = ms(opt, pset, prov)
                check(f"{opt} {pset} vs {prov} (>= {need}x)", other / mine if other and mine else None,
                      lambda v, n=need: v >= n)  # fmt: skip
    for opt in NO_FUSED:
        for pset in PARAM_SETS:
            mine, other = ms(opt, pset, PRIMARY), ms(opt, pset, "torch-foreach")
            check(f"{opt} {pset} vs torch-foreach (>= 3x)", other / mine if other and mine else None,
                  lambda v: v >= 3.0)  # fmt: skip
    for pset in PARAM_SETS:
        mine, other = ms(BF16, pset, PRIMARY), ms("adam", pset, "torch-fused")
        check(f"bf16-state Adam {pset} vs torch-fused fp32 Adam (>= 1.3x)", other / mine if other and mine else None,
              lambda v: v >= 1.3)  # fmt: skip
    check("10,000 tiny tensors / one tensor, CUDA-graph step (< 2x)", tiny_ratio, lambda v: v < 2.0)
    return out


# the table's columns: (heading, provider); the speedup of PRIMARY over each
TABLE_COLUMNS = (
    ("triton-kernel", "triton-kernel"),
    ("fastopt-cuda", "fastopt-cuda"),
    ("cuda-kernel", "cuda-kernel"),
    ("fp32-state", PRIMARY + FP32_STATE),  # a bf16-state case's fp32-state twin
    ("torch-forloop", "torch-forloop"),
    ("torch-foreach", "torch-foreach"),
    ("torch-fused", "torch-fused"),
    ("torch-compiled", "torch-compiled"),
)


def print_table(rows: list[dict[str, Any]]) -> None:
    for pset in dict.fromkeys(r["param_set"] for r in rows):
        set_rows = [r for r in rows if r["param_set"] == pset]
        print(f"\n== {pset}: {set_rows[0]['tensors']} tensors, {set_rows[0]['elements'] / 1e6:.1f}M elements; "
              f"{PRIMARY} ms, GB/s, roofline fraction; speedup of {PRIMARY} over each provider "
              f"(fp32-state: {PRIMARY} with fp32 state)")  # fmt: skip
        head = f"{'optimizer':<16}{'ms':>8}{'GB/s':>8}{'roof':>6}" + "".join(
            f"{h:>15}" for h, _ in TABLE_COLUMNS
        )
        print(head)
        for opt in dict.fromkeys(r["optimizer"] for r in set_rows):
            cells = {r["provider"]: r for r in set_rows if r["optimizer"] == opt}
            main = cells.get(PRIMARY, {})
            t = main.get("ms_median")
            line = f"{opt:<16}{_f(t, '.3f'):>8}{_f(main.get('gbps'), '.0f'):>8}{_f(main.get('roofline_fraction')):>6}"
            for _, p in TABLE_COLUMNS:
                o = cells.get(p, {}).get("ms_median")
                line += f"{(f'{o / t:.2f}x' if o and t else '-'):>15}"
            print(line)


def _f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def gpu_tag() -> str:
    name = torch.cuda.get_device_name()
    found = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return found.group(1) if found else re.sub(r"[^A-Za-z0-9]+", "_", name)


# a cell whose torch.compile'd step would start with less of the budget left leaves it out
COMPILE_SECONDS = 90


def _measure(
    cells: list[tuple[str, ...]],
    budget: Budget,
    rounds: int,
    bandwidth: float,
    meta: dict,
    stem: str,
    rows: list[dict[str, Any]],
    reports: dict[str, str],
) -> None:
    """The plan's cells in order until the budget is spent. ``rows`` is extended (and written)
    and ``reports`` filled as they come, so that an interrupt keeps what was measured."""
    for cell in cells:
        if budget.spent():
            budget.left_out.append("+".join(cell))
        elif cell == TINY:
            reports["tiny"] = run_tiny(
                rounds, None if math.isinf(budget.left()) else max(budget.left(), 30.0)
            )
        else:
            name, pset = cell
            try:
                rows += run_set(CASE_BY_NAME[name], pset, PARAM_SETS[pset], bandwidth, rounds, meta,
                                compile_ok=budget.left() > COMPILE_SECONDS)  # fmt: skip
            except Exception as exc:  # one broken cell (out of memory, say) is reported, not fatal
                print(f"  {pset:>10} {name:<16} failed: {_short_error(exc)}", flush=True)
                budget.left_out.append(f"{name}+{pset} (failed)")
                gc.collect()
                torch.cuda.empty_cache()
            write_csv(rows, stem + ".csv")  # as it goes: a cut-short run keeps what it measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_throughput", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="Adam only, fewer rounds")
    parser.add_argument("--tune", action="store_true", help="sweep the Triton launch configuration first")
    parser.add_argument("--sets", default=",".join(PARAM_SETS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--compiled", default="adam", help="optimizers to torch.compile (comma list or none)")
    parser.add_argument("--experiments", default="layout,tiny", help="extra experiments to run (or none)")
    parser.add_argument("--tiny-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument(
        "--budget",
        type=float,
        default=math.inf,
        help="seconds: no new measurement starts after this; the table and targets still print",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    # the budget counts from the start, torch's and the copy probes' time included; a
    # SIGTERM (the session's time limit) ends the measuring as Ctrl-C does, not the report
    budget = Budget(args.budget)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rounds = args.rounds or (5 if args.quick else 11)
    if args.tiny_only:
        print("\n".join(tiny_experiment(rounds)))
        return 0
    optimizers = ["adam", BF16] if args.quick else args.optimizers.split(",")
    COMPILED.intersection_update({(o, p) for o in args.compiled.split(",") for p in PARAM_SETS})
    meta = dict(
        device_name=torch.cuda.get_device_name(),
        torch_version=torch.__version__,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    bandwidth = copy_bandwidth()
    print(
        f"{meta['device_name']}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (r+w)"
    )
    if args.tune:
        print("\nlaunch configuration (triton-kernel, Adam fp32, ms):")
        print("\n".join(tune(max(3, rounds // 2))))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"throughput_cuda_{gpu_tag()}")
    sets = args.sets.split(",")
    rows: list[dict[str, Any]] = []
    reports: dict[str, str] = {}
    interrupted = False
    try:
        for pset in sets:
            set_bw = set_copy_bandwidth(PARAM_SETS[pset])
            print(f"{pset}: foreach copy over its tensors {set_bw / 1e9:.0f} GB/s (r+w)", flush=True)
        cells = plan(optimizers, sets, "tiny" in args.experiments)
        _measure(cells, budget, rounds, bandwidth, meta, stem, rows, reports)
    except KeyboardInterrupt:  # (rows and reports hold what was measured before it)
        interrupted = True
        budget.left_out.append("the rest (interrupted)")
        print("\ninterrupted: reporting what was measured", flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the report finish
    print_table(rows)
    tiny_report = reports.get("tiny")
    title = f"optimizer step throughput, {meta['device_name']}, torch {torch.__version__}"
    if rows:  # (a budget spent before the first measurement leaves nothing to draw)
        write_png(rows, stem + ".png", title)
    if tiny_report is not None:
        print("\nmany tiny tensors (Adam fp32, ms):\n" + tiny_report)
    if "layout" in args.experiments and not (budget.spent() or interrupted):
        print("\npointer table vs flat buffer (triton-kernel, Adam fp32, ms):")
        print("\n".join(layout_experiment(rounds)))
    elif "layout" in args.experiments:
        budget.left_out.append("layout")
    if budget.left_out:
        print(f"\nnot measured (budget {args.budget:.0f} s): " + ", ".join(budget.left_out))
    print("\nTargets:")
    for line in targets(rows, None if tiny_report is None else graph_ratio(tiny_report)):
        print("  " + line)
    print(f"\nwrote {stem}.csv and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
