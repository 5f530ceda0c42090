"""PNG figures: Becher & Ponti's bubble maps (Fig. 3) and t-SNE panels (Fig. 2), and
training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def bubble_maps(
    panels: Mapping[str, Mapping[tuple[float, int], tuple[float, float]]],
    lrs: Sequence[float],
    batch_sizes: Sequence[int],
    path: Path,
    title: str,
) -> Path:
    """One bubble map per panel: x = batch size, y = learning rate, colour = mean accuracy,
    bubble size = std over seeds. Near-chance cells (< 15 %) are drawn as a small grey x,
    as the paper leaves them out.

    ``panels`` maps a panel title to {(lr, batch size): (mean, std)}.
    """
    plt = _pyplot()
    names = list(panels)
    cols = 2 if len(names) > 3 else 1
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.2 * cols, 3.0 * rows), squeeze=False, layout="constrained"
    )
    scatter = None
    for ax, name in zip(axes.flat, names):
        xs, ys, cs, ss, dead = [], [], [], [], []
        for (lr, bs), (mean, std) in panels[name].items():
            if lr not in lrs or bs not in batch_sizes:
                continue
            x, y = batch_sizes.index(bs), lrs.index(lr)
            if not np.isfinite(mean) or mean < 15.0:
                dead.append((x, y))
                continue
            xs.append(x)
            ys.append(y)
            cs.append(mean)
            ss.append(40.0 + 60.0 * min(std if np.isfinite(std) else 0.0, 25.0))  # std capped at 25 points
        scatter = ax.scatter(
            xs, ys, c=cs, s=ss, cmap="viridis", vmin=40, vmax=95, edgecolors="k", linewidths=0.4
        )
        if dead:
            ax.scatter(*zip(*dead), marker="x", color="0.6", s=20)
        ax.set_xticks(range(len(batch_sizes)), [str(b) for b in batch_sizes])
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_xlim(-0.5, len(batch_sizes) - 0.5)
        ax.set_ylim(-0.5, len(lrs) - 0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("batch size", fontsize=8)
        ax.set_ylabel("learning rate", fontsize=8)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    if scatter is not None:
        fig.colorbar(scatter, ax=axes, shrink=0.8, label="mean accuracy (%)")
    fig.suptitle(title + "  (bubble size: std; x: near chance)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tsne_grid(
    embeddings: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    rows: Sequence[str],
    cols: Sequence[str],
    path: Path,
    title: str,
) -> Path:
    """A grid of t-SNE scatter plots coloured by class: ``embeddings[(row, col)] = (xy, labels)``."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.4 * len(cols), 2.4 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if (r, c) in embeddings:
                xy, labels = embeddings[(r, c)]
                if np.ptp(xy) == 0.0:
                    ax.text(
                        0.5,
                        0.5,
                        "collapsed:\nall features equal",
                        ha="center",
                        va="center",
                        transform=ax.transAxes,
                        fontsize=8,
                        color="0.4",
                    )
                else:
                    ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=3, vmin=0, vmax=9)
            if i == 0:
                ax.set_title(c, fontsize=9)
            if j == 0:
                ax.set_ylabel(r, fontsize=9)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def curves(
    series: Mapping[str, Sequence[float]],
    path: Path,
    title: str,
    ylabel: str,
    log: bool = False,
    reference: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Line plot of per-epoch values, one line per label; a ``reference`` series of the
    same label (the paper's) is drawn dashed in the same colour."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, values in series.items():
        (line,) = ax.plot(range(1, len(values) + 1), values, label=label, linewidth=1)
        ref = (reference or {}).get(label)
        if ref:
            ax.plot(range(1, len(ref) + 1), ref, linestyle="--", linewidth=0.8, color=line.get_color())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
