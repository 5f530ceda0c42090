"""Optimizer-step throughput: fastopt's backends side by side with torch.optim.

For each optimizer and parameter set every provider steps the same parameters and
gradients, in interleaved rounds (one step of each provider per round, start rotated), so
that the noise of a shared machine hits them alike and their ratios stay meaningful. The
roofline, a read-modify-write pass over buffers far larger than the cache, runs in the
same rounds.

Providers: ``fastopt-<backend>`` for each fastopt backend of the device, and torch.optim's
``torch-forloop`` (foreach=False), ``torch-foreach``, ``torch-fused`` and ``torch-compiled``
(``torch.compile(opt.step)``) where the optimizer has a torch.optim twin. Rules torch.optim
lacks are compared with fastopt's own ``_foreach`` backend (``fastopt-torch``).

Effective bandwidth counts the bytes a step must move: params read and written, gradients
(and Hessian-vector products) read, each state tensor read and written, at their dtypes.

Usage: ``python -m bench.throughput [--device cpu|cuda] [--quick] [--optimizers adam,...]
[--out bench/results]``; writes ``throughput_<device>.csv`` and ``.png`` (``_quick`` added
for a quick run, ``_partial`` for a subset of the optimizers or param sets).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .shapes import PARAM_SETS, QUICK_PARAM_SETS, TINY_PARAM_SETS, Shape, numel

CSV_COLUMNS = [
    "benchmark", "optimizer", "param_set", "provider", "dtype", "ms_median", "ms_p20", "ms_p80", "gbps",
    "roofline_fraction", "bytes_per_step", "tensors", "elements", "note", "device_name", "torch_version",
    "timestamp",
]  # fmt: skip
TORCH_PROVIDERS = ("torch-forloop", "torch-foreach", "torch-fused", "torch-compiled")
FASTOPT_BACKENDS = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}
FP32_STATE = "/fp32-state"  # suffix of the fp32-state reference provider of a state-dtype case


@dataclasses.dataclass(frozen=True)
class Case:
    """One optimizer: a fastopt preset, its torch.optim twin (if any) and shared kwargs."""

    name: str
    preset: str
    torch_cls: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    state_dtype: torch.dtype | None = None
    summary: str = ""
    # clip to this global gradient norm: fastopt's max_grad_norm against torch's
    # clip_grad_norm_ before the step (foreach=False for the for-loop provider)
    max_grad_norm: float | None = None
    # step as a GradScaler does (see _lend_scale): fused steps unscale inside and leave
    # p.grad unscaled, the others unscale first, as GradScaler.unscale_ does
    amp: bool = False


CASES = [
    Case("adam", "adam", "Adam", {"lr": 1e-3}, summary="Adam fp32"),
    Case("adamw", "adamw", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}),
    Case("sgd_momentum", "momentum", "SGD", {"lr": 1e-3, "momentum": 0.9}),
    Case("rmsprop", "rmsprop", "RMSprop", {"lr": 1e-2}),
    Case("adadelta", "adadelta", "Adadelta", {"lr": 1.0}),
    Case("adamax", "adamax", "Adamax", {"lr": 2e-3}),
    Case("nadam", "nadam", "NAdam", {"lr": 2e-3}),
    Case("radam", "radam", "RAdam", {"lr": 1e-3}),
    Case("nadam_dozat", "nadam_dozat", summary="Dozat's Nesterov-Adam"),
    Case("adam_l1", "adam_l1", summary="Adam, L1 norm"),
    Case("adam_linf", "adam_linf", summary="Adam, L-inf norm"),
    Case("egd", "egd", summary="equilibrated SGD (H u curvature)"),
    Case("adam_bf16_state", "adam", state_dtype=torch.bfloat16, summary="Adam, fp32 params, bf16 state"),
    Case(
        "adam_clip", "adam", "Adam", {"lr": 1e-3}, max_grad_norm=1.0, summary="Adam fp32, clipped to norm 1"
    ),
    Case("adam_amp", "adam", "Adam", {"lr": 1e-3}, amp=True, summary="Adam fp32 under a GradScaler"),
]
CASE_BY_NAME = {c.name: c for c in CASES}


# ---- measuring ------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    provider: str
    times: list[float] = dataclasses.field(default_factory=list)
    note: str = ""

    def quantile(self, q: float) -> float | None:
        if not self.times:
            return None
        xs = sorted(self.times)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _short_error(exc: BaseException) -> str:
    """The first line of an error, and of its cause (torch.compile's own first line,
    "backend='inductor' raised:", names none)."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:160]
    cause = exc.__cause__
    if cause is not None:
        text += " <- " + f"{type(cause).__name__}: {cause}".strip().splitlines()[0][:160]
    return text


def measure(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device
) -> dict[str, Result]:
    """Warm every step up (compiling, creating state), then time them in interleaved rounds."""
    sync = _sync(device)
    results = {name: Result(name) for name in steps}
    live = []
    for name, fn in steps.items():
        t0 = time.perf_counter()
        try:
            for _ in range(warmup):
                fn()
            sync()
        except Exception as exc:  # e.g. torch.compile failing on this machine: report it
            results[name].note = f"failed: {_short_error(exc)}"
            continue
        if name == "torch-compiled":
            results[name].note = f"warmup incl. compile {time.perf_counter() - t0:.0f} s"
        live.append(name)
    for r in range(repeats):
        shift = r % max(1, len(live))
        for name in live[shift:] + live[:shift]:
            sync()
            t0 = time.perf_counter()
            steps[name]()
            sync()
            results[name].times.append(time.perf_counter() - t0)
    return results


def roofline_step(device: torch.device, elements: int) -> tuple[Callable[[], None], int]:
    """A bandwidth probe and the bytes it moves: CPU a += b (12 bytes per fp32 element,
    read a, read b, write a) on buffers far beyond the last-level cache; CUDA a device to
    device copy (read + write)."""
    a = torch.zeros(elements, device=device)
    b = torch.ones(elements, device=device)
    if device.type == "cuda":
        return (lambda: a.copy_(b)), 8 * elements
    return (lambda: a.add_(b)), 12 * elements


# ---- providers --------------------------------------------------------------------------------


def bytes_per_step(case: Case, shapes: list[Shape], param_dtype: torch.dtype = torch.float32) -> int:
    """Bytes one step must move: param r+w, grad (and H u) read, each state tensor r+w, and
    the grads read once more for a clipped case's norm."""
    from fastopt import presets
    from fastopt.spec import Curvature

    spec = presets.spec(case.preset)
    p = torch.empty((), dtype=param_dtype).element_size()
    s = torch.empty((), dtype=case.state_dtype or param_dtype).element_size()
    reads = p * (2 if spec.curvature == Curvature.HVP else 1)
    if case.max_grad_norm is not None:
        reads += p  # the gradients' norm reads them once more
    if case.amp:
        reads += p  # the unscaled gradients written back
    per_element = 2 * p + reads + 2 * s * len(spec.state_roles)
    return per_element * numel(shapes)


def _fastopt_optimizer(case: Case, params: list[torch.Tensor], backend: str) -> torch.optim.Optimizer:
    import fastopt
    from fastopt import presets

    options: dict[str, Any] = {"backend": backend}
    if case.state_dtype is not None:
        options["state_dtype"] = case.state_dtype
    if case.max_grad_norm is not None:
        options["max_grad_norm"] = case.max_grad_norm
    if case.torch_cls is not None:
        return getattr(fastopt, case.torch_cls)(params, **case.kwargs, **options)
    return presets.make(case.preset, params, **case.kwargs, **options)


def _torch_optimizer(case: Case, params: list[torch.Tensor], provider: str) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, case.torch_cls)
    flags = {
        "torch-forloop": {"foreach": False},
        "torch-foreach": {"foreach": True},
        "torch-fused": {"fused": True},
        "torch-compiled": {},
    }[provider]
    return cls(params, **case.kwargs, **flags)


def _clipped(
    step: Callable[[], Any], params: list[torch.Tensor], max_norm: float, foreach: bool
) -> Callable[[], None]:
    """torch's way to a clipped step: clip_grad_norm_ over the params, then the step."""

    def clipped_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)
        step()

    return clipped_step


def _lend_scale(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Lend a GradScaler's scale and found_inf to a step that unscales inside (as
    ``GradScaler.step`` does for fused optimizers). The scale is 1: the step leaves p.grad
    unscaled, and the next step must see the same gradients (a larger scale would shrink
    them a step at a time, into the CPU's slow denormals); the work does not depend on it."""
    opt.grad_scale = torch.ones((), device=device)
    opt.found_inf = torch.zeros((), device=device)


def _unscaled_first(
    step: Callable[[], Any], params: list[torch.Tensor], device: torch.device
) -> Callable[[], None]:
    """An unfused optimizer's step under a GradScaler: ``GradScaler.unscale_``'s op over the
    gradients (an inf check and a multiply, written back), then the step."""
    grads = [p.grad for p in params]
    found_inf, inv_scale = torch.zeros((), device=device), torch.ones((), device=device)

    def step_after_unscaling() -> None:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        step()

    return step_after_unscaling


def _unscaling_apart(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same fastopt optimizer with the unscaled gradients written back in a pass of their
    own after the step (how fastopt did it before its kernels wrote them): what fusing buys."""

    def apart(self: Any, plans: list, inv_scale: torch.Tensor | None) -> list:
        for plan in plans:
            plan.unscale = None
        return plans

    opt.__class__ = type(type(opt).__name__, (type(opt),), {"_choose_unscaling": apart})
    return opt


def build_steps(
    case: Case,
    params: list[torch.Tensor],
    hvps: dict[torch.Tensor, torch.Tensor],
    device: torch.device,
    compiled: bool,
) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """The step function of each provider that can run the case, and why the others cannot."""
    from fastopt import backends, presets
    from fastopt.spec import Curvature

    steps: dict[str, Callable[[], None]] = {}
    notes: dict[str, str] = {}
    hvp = presets.spec(case.preset).curvature == Curvature.HVP
    for backend in FASTOPT_BACKENDS.get(device.type, ("torch",)):
        name = f"fastopt-{backend}"
        reason = backends.unavailable_reason(backend)
        if reason is not None:
            notes[name] = f"unavailable: {reason}"
            continue
        try:
            opt = _fastopt_optimizer(case, params, backend)
        except Exception as exc:
            notes[name] = f"failed: {_short_error(exc)}"
            continue
        steps[name] = (lambda o=opt: o.step_with_hvps(hvps)) if hvp else opt.step
        if case.amp:
            _lend_scale(opt, device)
            if backend != "torch":
                apart = _unscaling_apart(_fastopt_optimizer(case, params, backend))
                _lend_scale(apart, device)
                steps[f"{name}/unscale-apart"] = apart.step
        if case.state_dtype is not None and backend != "torch":
            # the same optimizer with fp32 state, in the same rounds: the ratio of the two
            # is what the narrower state buys
            ref = _fastopt_optimizer(dataclasses.replace(case, state_dtype=None), params, backend)
            steps[f"{name}{FP32_STATE}"] = ref.step
    for provider in TORCH_PROVIDERS:
        if case.torch_cls is None:
            why = "bf16 state" if case.state_dtype is not None else "rule"
            notes[provider] = f"n/a: torch.optim has no such {why}"
            continue
        if provider == "torch-compiled" and case.amp:
            notes[provider] = "n/a: GradScaler steps are not compiled"
            continue
        if provider == "torch-compiled" and not compiled:
            notes[provider] = "not measured: compile time (run with --compiled all)"
            continue
        try:
            opt = _torch_optimizer(case, params, provider)
        except Exception as exc:  # fused=True where torch has no fused kernel
            notes[provider] = f"n/a: {_short_error(exc)}"
            continue
        step = opt.step
        if case.amp and provider == "torch-fused":
            _lend_scale(opt, device)
        elif case.amp:
            step = _unscaled_first(step, params, device)
        if case.max_grad_norm is not None:
            step = _clipped(step, params, case.max_grad_norm, foreach=provider != "torch-forloop")
        if provider == "torch-compiled":
            # every optimizer's step is the same function to dynamo: without a reset the
            # ninth compile hits its recompile limit and silently runs eagerly
            torch._dynamo.reset()
            steps[provider] = torch.compile(step)
        else:
            steps[provider] = step
    return steps, notes


def make_params(shapes: list[Shape], device: torch.device, hvp: bool = True, seed: int = 0):
    """Params shared by every provider (each keeps its own state), with fixed gradients
    and, if asked for, H u products. Values stay tame: steps are small, so nothing turns
    denormal."""
    # drawn where they live: a GPU set of a billion elements drawn on the host takes minutes
    gen = torch.Generator(device=device).manual_seed(seed)
    params, hvps = [], {}
    for shape in shapes:
        p = (torch.randn(shape, generator=gen, device=device) * 0.1).requires_grad_()
        p.grad = torch.randn(shape, generator=gen, device=device)
        params.append(p)
        if hvp:
            hvps[p] = torch.randn(shape, generator=gen, device=device)
    return params, hvps


# ---- reporting ----------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "-"
    return f"{num / den:.2f}x"


def print_table(rows: list[dict[str, Any]], primary: str) -> None:
    """Per param set: the primary fastopt provider's ms, GB/s and roofline fraction, and
    speedups (other provider's time / primary's time)."""
    by_set: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_set.setdefault(row["param_set"], []).append(row)
    others = ["fastopt-torch", *TORCH_PROVIDERS]
    for param_set, set_rows in by_set.items():
        roof = [r for r in set_rows if r["provider"] == "roofline"]
        roof_gbps = statistics.median([r["gbps"] for r in roof]) if roof else None
        first = set_rows[0]
        print(
            f"\n== {param_set}: {first['tensors']} tensors, {first['elements'] / 1e6:.1f}M elements; "
            f"roofline {_fmt(roof_gbps, '.1f')} GB/s (median of the cases' probes; the "
            f"'roof' column uses each case's own); speedup of {primary} over each provider"
        )
        header = f"{'optimizer':<16}{'ms':>8}{'GB/s':>7}{'roof':>6}" + "".join(f"{o:>15}" for o in others)
        print(header)
        print("-" * len(header))
        optimizers = list(dict.fromkeys(r["optimizer"] for r in set_rows if r["provider"] != "roofline"))
        for opt in optimizers:
            cells = {r["provider"]: r for r in set_rows if r["optimizer"] == opt}
            main = cells.get(primary, {})
            t = main.get("ms_median")
            line = f"{opt:<16}{_fmt(t):>8}{_fmt(main.get('gbps'), '.1f'):>7}{_fmt(main.get('roofline_fraction')):>6}"
            for o in others:
                line += f"{_ratio(cells.get(o, {}).get('ms_median'), t):>15}"
            print(line)
        failed = [r for r in set_rows if r["note"].startswith("failed")]
        for r in failed:
            print(f"  {r['optimizer']} {r['provider']}: {r['note']}")


def check_targets(rows: list[dict[str, Any]], primary: str) -> list[str]:
    """The throughput targets, each with its measured value and whether it holds."""

    def ms(opt: str, pset: str, prov: str) -> float | None:
        for r in rows:
            if r["optimizer"] == opt and r["param_set"] == pset and r["provider"] == prov:
                return r["ms_median"]
        return None

    def frac(opt: str, pset: str) -> float | None:
        for r in rows:
            if r["optimizer"] == opt and r["param_set"] == pset and r["provider"] == primary:
                return r["roofline_fraction"]
        return None

    lines = []

    def target(label: str, value: float | None, ok: Callable[[float], bool]) -> None:
        if value is not None:
            lines.append(f"[{'met' if ok(value) else 'NOT met'}] {label}: {value:.2f}")

    sets = list(dict.fromkeys(r["param_set"] for r in rows))
    single = next((s for s in sets if s in ("16M", "4M", "tiny")), None)
    many = next((s for s in sets if s in ("1000x16k", "250x16k")), None)
    for pset, need in ((single, 1.0), (many, 1.8)):
        if pset is not None:
            mine, fused = ms("adam", pset, primary), ms("adam", pset, "torch-fused")
            value = fused / mine if mine and fused else None
            target(f"Adam fp32 vs torch fused on {pset} (>= {need}x)", value, lambda v, n=need: v >= n)
    for pset in sets:
        target(f"Adam fp32 roofline fraction on {pset} (>= 0.9)", frac("adam", pset), lambda v: v >= 0.9)
    no_fused = (
        "rmsprop",
        "adadelta",
        "adamax",
        "nadam",
        "radam",
        "nadam_dozat",
        "adam_l1",
        "adam_linf",
        "egd",
    )
    for pset in sets:
        for opt in no_fused:
            mine = ms(opt, pset, primary)
            # torch.optim's foreach step; for a rule it lacks, fastopt's torch backend (the
            # rule as fused in-place foreach ops: a foreach baseline as good as torch's)
            baseline = "torch-foreach" if ms(opt, pset, "torch-foreach") else "fastopt-torch"
            foreach = ms(opt, pset, baseline)
            value = foreach / mine if mine and foreach else None
            target(f"{opt} vs {baseline} on {pset} (>= 4x)", value, lambda v: v >= 4.0)
        bf16, fp32 = ms("adam_bf16_state", pset, primary), ms("adam_bf16_state", pset, primary + FP32_STATE)
        value = bf16 / fp32 if bf16 and fp32 else None
        target(f"Adam bf16 state / fp32 state time on {pset} (<= 0.8)", value, lambda v: v <= 0.8)
    return lines


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})


def write_png(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Grouped bars of effective GB/s per optimizer and provider, one panel per param set,
    the roofline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["param_set"] for r in rows))
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "roofline"]
    fig, axes = plt.subplots(len(sets), 1, figsize=(14, 3.6 * len(sets)), squeeze=False)
    for ax, pset in zip(axes[:, 0], sets):
        set_rows = [r for r in rows if r["param_set"] == pset]
        opts = list(dict.fromkeys(r["optimizer"] for r in set_rows if r["provider"] != "roofline"))
        width = 0.8 / max(1, len(providers))
        for i, prov in enumerate(providers):
            values = []
            for opt in opts:
                hit = [r for r in set_rows if r["optimizer"] == opt and r["provider"] == prov]
                values.append(hit[0]["gbps"] if hit and hit[0]["gbps"] is not None else 0.0)
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(opts))]
            ax.bar(xs, values, width=width, label=prov)
        roof = [r["gbps"] for r in set_rows if r["provider"] == "roofline"]
        if roof:
            ax.axhline(statistics.median(roof), color="black", linestyle="--", linewidth=1, label="roofline")
        ax.set_xticks(range(len(opts)))
        ax.set_xticklabels(opts, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("effective GB/s")
        ax.set_title(pset, fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=len(labels), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.972))
    fig.suptitle(title, fontsize=11, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.945))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- driver -----------------------------------------------------------------------------------


def _compile_auto(case: Case, shapes: list[Shape], args: argparse.Namespace) -> bool:
    """torch.compile's compile time grows with the tensor count (here ~100 s for ResNet-50's
    161 tensors, ~10 min for 1000): by default Adam is compiled on sets of at most
    --compile-max-tensors tensors and the other optimizers on single-tensor sets only
    (quick: Adam only)."""
    if case.name == "adam":
        return len(shapes) <= args.compile_max_tensors
    return not args.quick and len(shapes) == 1


def run_case(
    case: Case,
    pset: str,
    shapes: list[Shape],
    device: torch.device,
    args: argparse.Namespace,
    roofline: tuple[Callable[[], None], int],
    meta: dict[str, str],
) -> list[dict[str, Any]]:
    from fastopt import presets
    from fastopt.spec import Curvature

    params, hvps = make_params(shapes, device, hvp=presets.spec(case.preset).curvature == Curvature.HVP)
    compiled = args.compiled == "all" or (args.compiled == "auto" and _compile_auto(case, shapes, args))
    steps, notes = build_steps(case, params, hvps, device, compiled)
    steps["roofline"], roof_bytes = roofline
    results = measure(steps, args.warmup, args.repeats, device)
    nbytes = bytes_per_step(case, shapes)
    fp32_bytes = bytes_per_step(dataclasses.replace(case, state_dtype=None), shapes)
    roof = results["roofline"].quantile(0.5)
    bandwidth = roof_bytes / roof if roof else None  # bytes per second
    dtype = "fp32" + (f"/{str(case.state_dtype)[6:]}-state" if case.state_dtype else "")
    rows = []
    for name in [*steps, *notes]:
        res = results.get(name, Result(name, note=notes.get(name, "")))
        med, p20, p80 = res.quantile(0.5), res.quantile(0.2), res.quantile(0.8)
        moved = roof_bytes if name == "roofline" else (fp32_bytes if name.endswith(FP32_STATE) else nbytes)
        if med is None or not bandwidth:
            fraction = None
        else:  # the step's ideal time at the probe's bandwidth over its measured time
            fraction = moved / bandwidth / med
        rows.append(
            dict(
                benchmark="throughput",
                optimizer=case.name,
                param_set=pset,
                provider=name,
                dtype="fp32" if name.endswith(FP32_STATE) else dtype,
                ms_median=None if med is None else round(med * 1e3, 4),
                ms_p20=None if p20 is None else round(p20 * 1e3, 4),
                ms_p80=None if p80 is None else round(p80 * 1e3, 4),
                gbps=None if med is None else round(moved / med / 1e9, 3),
                roofline_fraction=None if fraction is None else round(fraction, 3),
                bytes_per_step=moved,
                tensors=len(shapes),
                elements=numel(shapes),
                note=res.note,
                **meta,
            )
        )
    del steps, params, hvps, results
    gc.collect()
    return rows


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda where a GPU is present"
    )
    parser.add_argument("--quick", action="store_true", help="smaller param sets and fewer repeats (~2 min)")
    parser.add_argument("--optimizers", default=",".join(c.name for c in CASES), help="comma-separated")
    parser.add_argument("--param-sets", default=None, help="comma-separated names (default: all of the mode)")
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument(
        "--repeats", type=_at_least(1), default=None, help="timed rounds (default 11, quick 5)"
    )
    parser.add_argument(
        "--warmup", type=_at_least(0), default=3, help="untimed steps first (compiles, creates state)"
    )
    parser.add_argument(
        "--compiled",
        default="auto",
        choices=["auto", "all", "none"],
        help="torch.compile'd provider: auto = Adam on param sets of at most --compile-max-tensors tensors, "
        "the other optimizers on single-tensor sets (quick: Adam only); all = everywhere (slow)",
    )
    parser.add_argument(
        "--compile-max-tensors",
        type=int,
        default=200,
        help="with --compiled auto, compile Adam only on param sets of at most this many tensors",
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 11
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code."""
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here", file=sys.stderr)
        return 2
    available = {**PARAM_SETS, **QUICK_PARAM_SETS, **TINY_PARAM_SETS}
    if args.param_sets:
        names = args.param_sets.split(",")
        unknown = [n for n in names if n not in available]
        if unknown:
            print(f"unknown param sets {unknown}; known: {sorted(available)}", file=sys.stderr)
            return 2
        param_sets = {n: available[n] for n in names}
    else:
        param_sets = QUICK_PARAM_SETS if args.quick else PARAM_SETS
    unknown = [n for n in args.optimizers.split(",") if n not in CASE_BY_NAME]
    if unknown:
        print(f"unknown optimizers {unknown}; known: {sorted(CASE_BY_NAME)}", file=sys.stderr)
        return 2
    cases = [CASE_BY_NAME[n] for n in args.optimizers.split(",")]

    from fastopt import backends

    primary = next(
        (f"fastopt-{b}" for b in FASTOPT_BACKENDS[device.type] if backends.unavailable_reason(b) is None),
        "fastopt-torch",
    )
    for b in FASTOPT_BACKENDS[device.type]:
        reason = backends.unavailable_reason(b)
        if reason is not None:
            print(f"skipping fastopt-{b}: {reason}")
    meta = dict(
        device_name=device_name(device),
        torch_version=torch.__version__,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    # the probe: 64M fp32 elements (256 MB per buffer), 8x a 32 MB last-level cache
    probe_elements = (
        (2**24 if (args.quick or "tiny" in param_sets) else 2**26) if device.type == "cpu" else 2**27
    )
    roofline = roofline_step(device, probe_elements)
    print(f"{meta['device_name']}, torch {meta['torch_version']}; {args.repeats} rounds per case")
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for pset, shapes in param_sets.items():
        for case in cases:
            t0 = time.perf_counter()
            rows += run_case(case, pset, shapes, device, args, roofline, meta)
            print(f"  {pset:>10} {case.name:<16} {time.perf_counter() - t0:6.1f} s", flush=True)
    print_table(rows, primary)
    if set(param_sets) <= set(PARAM_SETS):
        print("\nTargets:")
    else:  # (quick, tiny): what the targets say of these sets is no verdict on the full ones
        print(
            "\nTargets (set for the full run's param sets; these are smaller and partly fit in the "
            "caches, so read them as indicative only; `python -m fastopt bench` runs the full sets):"
        )
    for line in check_targets(rows, primary):
        print("  " + line)
    os.makedirs(args.out, exist_ok=True)
    # a quick or partial run must not overwrite the committed results of a full one
    partial = args.param_sets is not None or cases != list(CASES)
    suffix = "_quick" if args.quick else "_partial" if partial else ""
    stem = os.path.join(args.out, f"throughput_{device.type}{suffix}")
    write_csv(rows, stem + ".csv")
    write_png(
        rows, stem + ".png", f"optimizer step throughput, {meta['device_name']}, torch {torch.__version__}"
    )
    print(f"\nwrote {stem}.csv and {stem}.png in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
