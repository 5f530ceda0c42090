"""What every experiment shares: run options, optimizer construction for each
implementation, the on-disk cell cache and the record of the environment."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fastopt

TORCH_IMPL = "torch.optim"
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}


@dataclasses.dataclass
class Options:
    """The command-line options an experiment runs with."""

    experiment: str
    quick: bool = False
    device: str = "cpu"
    backend: str = "auto"
    impl: str = "fastopt"
    data_dir: str | None = None
    out: str = "bench/results/accuracy"
    threads: int = 1
    seeds: list[int] | None = None
    progress: bool = True

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    @property
    def out_dir(self) -> Path:
        """Where this experiment's tables, plots and cell cache go."""
        return Path(self.out) / self.experiment / self.mode


def _backends_module() -> Any:
    # fastopt/__init__ may rebind the name ``fastopt.backends``; the module itself is stable
    return importlib.import_module("fastopt.backends")


def available_backends(device: str) -> list[str]:
    """fastopt backends that can run on this device type here, fastest first."""
    fb = _backends_module()
    order = _AUTO_ORDER.get(torch.device(device).type, ("torch",))
    return [name for name in order if fb.unavailable_reason(name) is None]


def implementations(opts: Options) -> list[str]:
    """The implementations to run: "torch.optim" and/or "fastopt:<backend>".

    ``--backend auto`` resolves to the fastest available backend for ``--impl fastopt``,
    and to every available backend for ``--impl both``.
    """
    if opts.impl == "torch":
        return [TORCH_IMPL]
    if opts.backend == "auto":
        found = available_backends(opts.device)
        fast = [f"fastopt:{found[0]}"] if opts.impl == "fastopt" else [f"fastopt:{b}" for b in found]
    else:
        reason = _backends_module().unavailable_reason(opts.backend)
        if reason is not None:
            raise SystemExit(f"fastopt backend {opts.backend!r} is not available here: {reason}")
        fast = [f"fastopt:{opts.backend}"]
    if opts.impl == "fastopt":
        return fast
    return [TORCH_IMPL, *fast]


def primary_impl(impls: list[str]) -> str:
    """The implementation the paper comparison uses: fastopt's fastest backend if it ran."""
    return next((i for i in impls if i != TORCH_IMPL), TORCH_IMPL)


@dataclasses.dataclass(frozen=True)
class OptimizerRecipe:
    """One optimizer configuration, buildable by torch.optim and/or fastopt.

    ``torch_class`` names a torch.optim class that fastopt mirrors under the same name
    (fastopt.Adam, ...); ``spec`` is a fastopt Spec run by FusedOptimizer with fastopt's
    generic hyperparameters ``spec_kwargs``. A recipe with only a spec has no torch.optim
    twin; one with both uses the spec for fastopt and the class for torch.optim (they
    compute the same rule, see the experiment that builds it).
    """

    torch_class: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()
    spec: fastopt.Spec | None = None
    spec_kwargs: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def torch_like(name: str, **kwargs: Any) -> OptimizerRecipe:
        """A torch.optim class (run by fastopt under the same name)."""
        return OptimizerRecipe(torch_class=name, kwargs=tuple(sorted(kwargs.items())))

    @staticmethod
    def from_spec(
        spec: fastopt.Spec, twin: tuple[str, dict[str, Any]] | None = None, **kwargs: Any
    ) -> OptimizerRecipe:
        """A fastopt spec, optionally with a torch.optim class computing the same rule."""
        name, tkw = twin if twin else (None, {})
        return OptimizerRecipe(name, tuple(sorted(tkw.items())), spec, tuple(sorted(kwargs.items())))

    def supports(self, impl: str) -> bool:
        """Whether ``impl`` can run this recipe."""
        return self.torch_class is not None if impl == TORCH_IMPL else True

    def build(self, impl: str, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer of this recipe under implementation ``impl``."""
        if impl == TORCH_IMPL:
            if self.torch_class is None:
                raise ValueError("this configuration has no torch.optim equivalent")
            return getattr(torch.optim, self.torch_class)(params, **dict(self.kwargs))
        backend = impl.split(":", 1)[1]
        if self.spec is not None:
            return fastopt.FusedOptimizer(params, spec=self.spec, backend=backend, **dict(self.spec_kwargs))
        return getattr(fastopt, self.torch_class)(params, backend=backend, **dict(self.kwargs))


def resolved_backend(opt: torch.optim.Optimizer) -> str:
    """The backend that actually steps ``opt``'s first param group ("torch.optim" for torch)."""
    if not isinstance(opt, fastopt.FusedOptimizer):
        return TORCH_IMPL
    group = opt.param_groups[0]
    p = group["params"][0]
    chosen = _backends_module().choose(opt.backend, opt.group_spec(group), p.device, p.dtype)
    return f"fastopt:{chosen.name}"


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy; return a CPU generator for the batch order."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


# --- the cell cache ---------------------------------------------------------------------------


def cell_key(cell: dict[str, Any]) -> str:
    """A file-name-safe, stable key of a cell's configuration."""
    parts = []
    for k in sorted(cell):
        v = cell[k]
        v = f"{v:g}" if isinstance(v, float) else str(v)
        parts.append(f"{k}={v}")
    return "__".join(parts).replace("/", "-").replace(":", "-").replace(" ", "")


def run_grid(
    opts: Options,
    cells: Sequence[dict[str, Any]],
    run_cell: Callable[[dict[str, Any]], dict[str, Any]],
    desc: str,
) -> list[dict[str, Any]]:
    """Run every cell not already cached under ``<out>/cells/`` and return all results.

    Each result is the cell's configuration merged with what ``run_cell`` returned. A cell
    is cached as one JSON file as soon as it finishes, so an interrupted grid resumes
    where it stopped; delete the file (or the folder) to recompute.
    """
    from tqdm import tqdm

    folder = opts.out_dir / "cells"
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    cached = sum((folder / f"{cell_key(c)}.json").exists() for c in cells)
    if cached:
        print(f"[{opts.experiment}] {cached}/{len(cells)} cells cached in {folder}; running the rest")
    bar = tqdm(cells, desc=desc, unit="cell", disable=not opts.progress, dynamic_ncols=True)
    for i, cell in enumerate(bar):
        path = folder / f"{cell_key(cell)}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
            continue
        bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in cell.items())[:80])
        start = time.perf_counter()
        out = {**cell, **run_cell(cell), "cell_seconds": time.perf_counter() - start}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=_json_default))
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cell
        results.append(out)
        if not opts.progress:  # a plain line per cell for log files
            print(
                f"[{desc}] {i + 1}/{len(cells)} {_brief(cell)} -> {_brief(out, metrics_of=cell)}", flush=True
            )
    return results


def _brief(values: dict[str, Any], metrics_of: dict[str, Any] | None = None) -> str:
    """A one-line summary: the configuration, or the scalar results not in it."""
    items = [(k, v) for k, v in values.items() if metrics_of is None or k not in metrics_of]
    items = [
        (k, v)
        for k, v in items
        if isinstance(v, int | float | str) and not isinstance(v, bool) or k == "diverged"
    ]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# --- the run record ---------------------------------------------------------------------------


def environment(opts: Options, impls: list[str]) -> dict[str, Any]:
    """Versions, device and options of this run (saved beside every table)."""
    import sklearn

    info: dict[str, Any] = {
        "command": "python -m bench.accuracy " + " ".join(sys.argv[1:]),
        "experiment": opts.experiment,
        "mode": opts.mode,
        "implementations": impls,
        "backend_option": opts.backend,
        "fastopt_backends": {k: v or "available" for k, v in _backends_module().backends().items()},
        "device": opts.device,
        "device_name": _device_name(opts.device),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastopt": getattr(fastopt, "__version__", "?"),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return info


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
