"""The training loop shared by the experiments: whole-tensor datasets, index-permutation
batches, lr schedules stepped at (possibly virtual) epoch boundaries, step timing."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import batches

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class TrainResult:
    """What a training run measured."""

    epoch_losses: list[float]
    first_loss: float  # mean loss of the first few steps
    last_loss: float  # mean loss of the last few steps
    steps: int
    step_ms: float  # mean wall time of a whole step: forward, backward, optimizer
    opt_ms: float  # mean wall time of optimizer.step() alone
    diverged: bool
    history: list[dict[str, Any]]  # whatever the per-epoch callback returned
    final_lr: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def schedule_boundaries(total_steps: int, virtual_epochs: int) -> list[int]:
    """Step counts after which the lr scheduler steps: ``virtual_epochs`` equal parts.

    With as many virtual epochs as real ones these are the epoch ends; a shortened
    (--quick) run keeps the full run's number of virtual epochs, so its lr follows the
    same trajectory compressed onto fewer steps.
    """
    return [round((j + 1) * total_steps / virtual_epochs) for j in range(virtual_epochs)]


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
    scheduler: Any | None = None,
    virtual_epochs: int | None = None,
    on_epoch: Callable[[int, float], dict[str, Any] | None] | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` on (x, y) for ``epochs`` epochs; ``y`` may be ``x`` (autoencoders).

    The loss is checked once per epoch; a non-finite loss ends training early with
    ``diverged=True`` (what the model then computes is evaluated as it is).
    """
    from tqdm import tqdm

    device = x.device
    n = len(x)
    per_epoch = math.ceil(n / batch_size)
    total = per_epoch * epochs
    bounds = schedule_boundaries(total, virtual_epochs or epochs) if scheduler is not None else []
    next_bound = 0
    step_losses: list[torch.Tensor] = []
    epoch_losses: list[float] = []
    history: list[dict[str, Any]] = []
    opt_seconds = 0.0
    done = 0
    diverged = False
    train_start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=not progress, dynamic_ncols=True)
    model.train()
    for epoch in range(epochs):
        epoch_sum = torch.zeros((), device=device)
        for idx in batches(n, batch_size, generator, device):
            xb, yb = x[idx], y[idx]
            if augment is not None:
                xb = augment(xb, generator)
            loss = loss_fn(model(xb), xb if y is x else yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            opt_seconds += time.perf_counter() - t0
            detached = loss.detach()
            epoch_sum += detached * len(idx)
            step_losses.append(detached)
            done += 1
            while next_bound < len(bounds) and done >= bounds[next_bound]:
                scheduler.step()
                next_bound += 1
            bar.update(1)
        epoch_loss = float(epoch_sum) / n
        epoch_losses.append(epoch_loss)
        bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.4g}")
        if on_epoch is not None:
            record = on_epoch(epoch + 1, epoch_loss)
            model.train()
            if record is not None:
                history.append(record)
        if not math.isfinite(epoch_loss):
            diverged = True
            break
    _sync(device)
    seconds = time.perf_counter() - train_start
    bar.close()
    losses = torch.stack(step_losses).float().cpu().numpy()
    k = max(1, min(20, len(losses) // 5))
    return TrainResult(
        epoch_losses=epoch_losses,
        first_loss=float(np.mean(losses[:k])),
        last_loss=float(np.mean(losses[-k:])),
        steps=done,
        step_ms=1e3 * seconds / max(done, 1),
        opt_ms=1e3 * opt_seconds / max(done, 1),
        diverged=diverged,
        history=history,
        final_lr=float(opt.param_groups[0]["lr"]),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, batch_size: int = 1000
) -> tuple[float, float, int]:
    """(accuracy %, mean loss, number correct) of a classifier on (x, y)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        yb = y[i : i + batch_size]
        loss_sum += float(loss_fn(out, yb)) * len(yb)
        correct += int((out.argmax(1) == yb).sum())
    return 100.0 * correct / len(x), loss_sum / len(x), correct


@torch.no_grad()
def reconstruction_mse(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean squared reconstruction error per pixel of an autoencoder on ``x``."""
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        total += float(((model(xb) - xb) ** 2).sum())
    return total / x.numel()


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """``model.features`` of every row of ``x`` as a float64 numpy array."""
    model.eval()
    parts = [model.features(x[i : i + batch_size]).double().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(parts).numpy()
