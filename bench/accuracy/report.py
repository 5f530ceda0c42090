"""Paper-vs-ours tables: the papers' numbers (bench/accuracy/paper/*.csv), cell-by-cell
comparison with a tolerance, the fastopt-vs-torch.optim table, CSV and Markdown output."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import TORCH_IMPL, Options, write_json

PAPER_DIR = Path(__file__).resolve().parent / "paper"
DEFAULT_TOLERANCE = 1.5  # points (or table units) where the paper gives no std
ROUNDING_FLOOR = 0.05  # the papers print one decimal: a std of 0 still allows rounding


def load_paper(name: str) -> list[dict[str, Any]]:
    """Rows of ``paper/<name>.csv``; numeric-looking fields become floats ("" -> None)."""
    with open(PAPER_DIR / f"{name}.csv", newline="") as f:
        rows = list(csv.DictReader(row for row in f if not row.startswith("#")))
    return [{k: _number(v) for k, v in row.items()} for row in rows]


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value); NaN if any value is NaN."""
    if not values:
        return math.nan, math.nan
    if any(not math.isfinite(v) for v in values):
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def compare_row(
    source: str,
    cell: str,
    paper: float | None,
    paper_std: float | None,
    ours: Sequence[float],
    default_tol: float = DEFAULT_TOLERANCE,
    **extra: Any,
) -> dict[str, Any]:
    """One comparison row: the paper's value, ours (mean and std over runs), difference and
    whether ours lies within the paper's +-2 std (+-``default_tol`` without a std).

    A paper value of NaN (a diverged run in the paper) agrees with a NaN of ours.
    """
    mean, std = mean_std(list(ours))
    row: dict[str, Any] = {"source": source, "cell": cell, **extra}
    row.update(paper=paper, paper_std=paper_std, ours=mean, ours_std=std, runs=len(ours))
    if paper is None or not ours:
        row.update(diff=None, tolerance=None, agree="n/a")
        return row
    tol = max(2.0 * paper_std, ROUNDING_FLOOR) if paper_std is not None else default_tol
    if math.isnan(paper) or math.isnan(mean):
        row.update(diff=None, tolerance=tol, agree="yes" if math.isnan(paper) and math.isnan(mean) else "NO")
        return row
    diff = mean - paper
    row.update(diff=diff, tolerance=tol, agree="yes" if abs(diff) <= tol else "NO")
    return row


def agreement(rows: Sequence[dict[str, Any]]) -> str:
    """ "k of n cells agree" over the rows that have a paper value."""
    judged = [r for r in rows if r["agree"] != "n/a"]
    ok = sum(r["agree"] == "yes" for r in judged)
    return f"{ok} of {len(judged)} cells within the paper's tolerance"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 1e6:  # a blown-up but finite value: keep the column readable
            return f"{value:.3g}"
        return f"{value:.{digits}f}"
    return str(value)


# hyperparameter columns are printed exactly (0.0005, 1e-05), not rounded to the table's digits
_EXACT_COLUMNS = {"lr", "mu", "nu", "rho", "momentum"}


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 2) -> str:
    """A Markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            exact = c in _EXACT_COLUMNS and isinstance(v, float) and not math.isnan(v)
            cells.append(f"{v:g}" if exact else _fmt(v, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Write ``rows`` as CSV (columns: the given ones, else the union in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c), 6) if isinstance(r.get(c), float) else r.get(c) for c in columns})


def implementation_rows(
    results: Sequence[dict[str, Any]], config_fields: Sequence[str], metric: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """fastopt vs torch.optim: per configuration, each implementation's metric (mean over
    seeds), mean training-step and optimizer-step time, and the largest metric difference
    to torch.optim. Returns the rows and their column names."""
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        groups[tuple(r.get(f) for f in config_fields)][r["impl"]].append(r)
    impls = sorted({r["impl"] for r in results}, key=lambda i: (i != TORCH_IMPL, i))
    rows = []
    for key, by_impl in groups.items():
        row: dict[str, Any] = dict(zip(config_fields, key))
        for impl in impls:
            runs = by_impl.get(impl, [])
            vals = [float(r[metric]) for r in runs]
            row[f"{metric} [{impl}]"] = mean_std(vals)[0] if runs else None
            row[f"step ms [{impl}]"] = statistics.fmean(r["step_ms"] for r in runs) if runs else None
            row[f"opt.step ms [{impl}]"] = statistics.fmean(r["opt_ms"] for r in runs) if runs else None
        base = row.get(f"{metric} [{TORCH_IMPL}]")
        diffs = [
            abs(row[f"{metric} [{i}]"] - base)
            for i in impls
            if i != TORCH_IMPL and base is not None and row.get(f"{metric} [{i}]") is not None
        ]
        row["max |diff|"] = max(diffs) if diffs else None
        rows.append(row)
    columns = [*config_fields]
    for impl in impls:
        columns += [f"{metric} [{impl}]", f"step ms [{impl}]", f"opt.step ms [{impl}]"]
    columns.append("max |diff|")
    return rows, columns


def implementation_section(
    opts: Options,
    results: Sequence[dict[str, Any]],
    config_fields: Sequence[str],
    metric: str,
    heading: str,
    digits: int = 3,
) -> tuple[str, str]:
    """The fastopt-vs-torch.optim section: writes ``implementations.csv`` and returns
    (heading, Markdown) with a one-line summary above the table."""
    rows, columns = implementation_rows(results, config_fields, metric)
    write_csv(opts.out_dir / "implementations.csv", rows, columns)
    impls = sorted({r["impl"] for r in results} - {TORCH_IMPL})
    summary = []
    diffs = [r["max |diff|"] for r in rows if r["max |diff|"] is not None and math.isfinite(r["max |diff|"])]
    if diffs:
        worst = max(diffs)
        summary.append(
            f"largest |{metric}| difference to torch.optim over {len(diffs)} configurations: {worst:.4g}"
        )
    for impl in impls:
        pairs = [
            (
                r[f"step ms [{impl}]"],
                r[f"step ms [{TORCH_IMPL}]"],
                r[f"opt.step ms [{impl}]"],
                r[f"opt.step ms [{TORCH_IMPL}]"],
            )
            for r in rows
            if r.get(f"step ms [{impl}]") is not None and r.get(f"step ms [{TORCH_IMPL}]") is not None
        ]
        if pairs:
            step = statistics.fmean(a / b for a, b, _, _ in pairs)
            opt_step = statistics.fmean(c / d for _, _, c, d in pairs)
            summary.append(
                f"{impl} / torch.optim time ratio, mean over configurations: whole step {step:.2f}, "
                f"optimizer.step() {opt_step:.2f}"
            )
    note = (
        "Times are wall-clock means over every step of a run (forward, backward and optimizer; and "
        "optimizer.step() alone) on the device recorded above; on a shared CPU they vary with the load."
    )
    body = (
        "\n".join(f"- {line}" for line in summary) + "\n\n" + markdown(rows, columns, digits) + "\n\n" + note
    )
    return heading, body


def write_report(
    opts: Options,
    title: str,
    sections: Sequence[tuple[str, str]],
    env: dict[str, Any],
    wall_seconds: float,
    notes: Sequence[str],
    results: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write ``report.md`` (and ``run.json``) in the experiment's output folder, print it,
    and return its path. ``sections`` are (heading, Markdown body) pairs; ``results`` (the
    grid's cells) give the compute time of all cells, cached ones included."""
    out = opts.out_dir
    cells_seconds = sum(float(r.get("cell_seconds", 0.0)) for r in results)
    # every invocation is kept, so a rerun that only rebuilds the tables from cached cells
    # does not hide how long the run that computed them took
    record = out / "run.json"
    previous = json.loads(record.read_text()).get("invocations", []) if record.exists() else []
    this = {"command": env["command"], "started": env["started"], "wall_seconds": round(wall_seconds, 1)}
    env = {
        **env,
        "wall_seconds": round(wall_seconds, 1),
        "cells": len(results),
        "cells_seconds": round(cells_seconds, 1),
        "invocations": [*previous, this],
    }
    write_json(record, env)
    head = [f"# {title}", ""]
    if opts.quick:
        head += [f"> **Reduced run (`--quick`)**: {notes[0]}", ""]
        notes = notes[1:]
    head += [
        f"- command: `{env['command']}`",
        f"- implementations: {', '.join(env['implementations'])} (fastopt backends here: "
        + ", ".join(f"{k}: {v}" for k, v in env["fastopt_backends"].items())
        + ")",
        f"- device: {env['device']} ({env['device_name']}), torch threads {env['torch_threads']}",
        f"- versions: python {env['python']}, torch {env['torch']}, fastopt {env['fastopt']}, "
        f"numpy {env['numpy']}, scikit-learn {env['scikit-learn']}",
        f"- wall time of this invocation: {wall_seconds / 60:.1f} min; compute time of its {len(results)} cells "
        f"(including any cached from an earlier invocation): {cells_seconds / 60:.1f} min",
        "",
    ]
    body = []
    for heading, text in sections:
        body += [f"## {heading}", "", text, ""]
    if notes:
        body += ["## Choices and notes", ""] + [f"- {n}" for n in notes] + [""]
    text = "\n".join(head + body)
    path = out / "report.md"
    path.write_text(text)
    print(text)
    return path
