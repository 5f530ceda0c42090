"""``python -m fastopt verify``: every backend present against the NumPy reference.

For each backend that can run here (and each device it runs on), steps every preset and
a spread of the whole family for a few steps on small multi-tensor groups, in float64 where
the backend supports it and in float32, and prints one row per (backend, device, dtype)
with the worst relative error against the reference.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from . import backends, presets
from .optim import FusedOptimizer
from .reference import Reference
from .spec import Curvature, Spec, family

# Tolerances: float64 is rounding only (a few ulps per op over a few steps); float32 is
# ~1e-7 per op times a few dozen ops per step, amplified by lr / vbar with eps >= 1e-4
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
HYPER = dict(
    lr=0.01, mu=0.9, nu=0.99, eps=1e-3, weight_decay=0.05, dampening=0.1, initial_accumulator_value=0.1
)
SHAPES = [(7,), (3, 5), (1,), (0,), (129,)]


def _max_error(
    spec: Spec, backend: str, device: torch.device, dtype: torch.dtype, steps: int, seed: int
) -> float:
    rng = np.random.default_rng(seed)
    hyper = dict(HYPER, **{k: v for k, v in presets_defaults(spec).items() if k in ("mu", "nu")})
    params = [
        torch.tensor(rng.standard_normal(s), dtype=dtype, device=device, requires_grad=True) for s in SHAPES
    ]
    opt = FusedOptimizer(params, spec=spec, backend=backend, **hyper)
    ref = Reference(spec, hyper, [p.detach().double().cpu().numpy() for p in params])
    for _ in range(steps):
        grads = [torch.tensor(rng.standard_normal(s), dtype=dtype, device=device) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g
        if spec.curvature == Curvature.HVP:
            # H u supplied directly: the kernels see exactly what the reference sees
            hvps = {
                p: torch.tensor(rng.standard_normal(s), dtype=dtype, device=device)
                for p, s in zip(params, SHAPES)
            }
            opt.step_with_hvps(hvps)
            ref.step(
                [g.double().cpu().numpy() for g in grads], [hvps[p].double().cpu().numpy() for p in params]
            )
        else:
            opt.step()
            ref.step([g.double().cpu().numpy() for g in grads])
    errs = [
        float(np.max(np.abs(p.detach().double().cpu().numpy() - r) / (1.0 + np.abs(r)))) if r.size else 0.0
        for p, r in zip(params, ref.params)
    ]
    return max(errs)


def presets_defaults(spec: Spec) -> dict:
    for preset in presets.PRESETS.values():
        if preset.spec == spec:
            return preset.defaults
    return {}


def _targets() -> list[tuple[str, torch.device]]:
    out = []
    for name, reason in backends.backends().items():
        if reason is not None:
            continue
        devices = [torch.device("cpu")] if name in ("torch", "cpp") else []
        if torch.cuda.is_available() and name in ("torch", "triton", "cuda"):
            devices.append(torch.device("cuda"))
        if name == "triton" and not torch.cuda.is_available():
            devices.append(torch.device("cpu"))  # interpreter mode (TRITON_INTERPRET=1)
        out.extend((name, d) for d in devices)
    return out


def run(family_stride: int = 7, steps: int = 5, seed: int = 0) -> bool:
    """Verify every available backend; print the table; True if all rows pass."""
    specs = [p.spec for p in presets.PRESETS.values()]
    specs += [s for s in list(family())[::family_stride] if s not in specs]
    print(
        f"fastopt verify: {len(specs)} specs ({len(presets.PRESETS)} presets + every {family_stride}th of the family)"
    )
    for name, reason in backends.backends().items():
        if reason is not None:
            print(f"  backend {name}: not available ({reason})")
    rows, ok = [], True
    for name, device in _targets():
        backend = backends.get(name)
        dtypes = (
            [torch.float64, torch.float32] if device.type == "cpu" or name == "torch" else [torch.float32]
        )
        for dtype in dtypes:
            start = time.perf_counter()
            checked, worst, failed = 0, 0.0, []
            for i, spec in enumerate(specs):
                if backend.supports(spec, device, dtype) is not None:
                    continue
                err = _max_error(spec, name, device, dtype, steps, seed + i)
                checked += 1
                worst = max(worst, err) if np.isfinite(err) else float("inf")
                if not err <= TOLERANCE[dtype]:
                    failed.append(spec.short())
            status = "PASS" if not failed and checked else ("FAIL" if failed else "NONE")
            ok &= status != "FAIL"
            rows.append((name, str(device), str(dtype).replace("torch.", ""), checked, worst, status,
                         time.perf_counter() - start, failed[:3]))  # fmt: skip
    print(
        f"\n{'backend':8} {'device':6} {'dtype':8} {'specs':>6} {'max rel err':>12} {'tol':>8}  status  time"
    )
    for name, dev, dt, n, worst, status, secs, failed in rows:
        tol = TOLERANCE[getattr(torch, dt)]
        print(f"{name:8} {dev:6} {dt:8} {n:6d} {worst:12.2e} {tol:8.0e}  {status:6}  {secs:.1f}s")
        for f in failed:
            print(f"    failed: {f}")
    print("\nall backends agree with the reference" if ok else "\nSOME BACKENDS DISAGREE WITH THE REFERENCE")
    return ok


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1 (0 steps would check nothing and pass)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastopt verify", description=__doc__)
    parser.add_argument("--stride", type=_positive, default=7, help="check every Nth spec of the family")
    parser.add_argument("--steps", type=_positive, default=5, help="steps of each spec (at least 1)")
    args = parser.parse_args(argv)
    return 0 if run(args.stride, args.steps) else 1
