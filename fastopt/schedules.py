"""Learning-rate schedules, as plain functions and as torch lr_schedulers.

The functions give the lr at a step or epoch ``k`` from the initial lr (0-based; TASO's
``k`` counts from 1 as in the paper); the scheduler classes wrap them for any optimizer
whose lr lives in ``param_groups`` (every fastopt and torch.optim optimizer), and their
state goes into checkpoints like torch's. Like torch's StepLR and ExponentialLR they are
chainable: each step multiplies the group's current lr by the schedule's change, so
another scheduler's factor (a warmup in ``ChainedScheduler``) is kept.

- step decay (Becher & Ponti): lr_0 * gamma^floor(k / step_size), gamma 0.5 every 5 epochs;
- exponential decay: lr_0 * rate^floor(k / every): Becher & Ponti's exp(-0.1) per epoch,
  Dozat's 0.94 every two epochs;
- TASO (Macedo et al., eq. 1): lr_i / (1 + exp(alpha (k / k_t - beta))) + lr_f, with
  alpha = 25, beta = 0.7 and lr_f = lr_i / 20 by default.

The decay parameters mu and nu have their own schedules (constant, bias correction, true
mean, increasing): they are part of the update rule, see :class:`fastopt.spec.Schedule`.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler


def constant_lr(lr0: float, k: int) -> float:
    """The constant schedule."""
    return lr0


def _check_period(name: str, value: int, k: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")


def step_decay_lr(lr0: float, k: int, step_size: int = 5, gamma: float = 0.5) -> float:
    """lr_0 * gamma^floor(k / step_size)."""
    _check_period("step_size", step_size, k)
    return lr0 * gamma ** (k // step_size)


def exponential_decay_lr(lr0: float, k: int, rate: float = math.exp(-0.1), every: int = 1) -> float:
    """lr_0 * rate^floor(k / every)."""
    _check_period("every", every, k)
    return lr0 * rate ** (k // every)


def taso_lr(
    lr_i: float, k: int, total: int, alpha: float = 25.0, beta: float = 0.7, lr_f: float | None = None
) -> float:
    """TASO's sigmoid (eq. 1). ``k`` counts from 1 as in the paper; ``total`` is k_t."""
    if total <= 0:
        raise ValueError(f"TASO needs the total number of epochs or steps, got {total}")
    if k < 1:
        raise ValueError(f"TASO's k counts from 1, got {k}")
    if lr_f is None:
        lr_f = lr_i / 20.0
    # past e^709 (k well beyond k_t) the sigmoid's term is below any lr: it has settled at lr_f
    exponent = alpha * (k / total - beta)
    return (lr_i / (1.0 + math.exp(exponent)) if exponent < 700.0 else 0.0) + lr_f


class _FunctionScheduler(LRScheduler):
    """A scheduler that sets each group's lr to f(initial_lr, k) at step k."""

    def __init__(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1) -> None:
        super().__init__(optimizer, last_epoch)

    def lr_at(self, lr0: float, k: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        # chainable, as torch's StepLR: the current lr times f's change since the last step
        # (alone, that is f itself up to rounding)
        k, out = self.last_epoch, []
        if getattr(self, "_is_initial", False) and k > 0:
            # made with last_epoch = k - 1 to resume: the optimizer's lr (from its checkpoint)
            # is already step k's; stepping it once more would skip a value
            return [float(group["lr"]) for group in self.optimizer.param_groups]
        for group, lr0 in zip(self.optimizer.param_groups, self.base_lrs):
            before = lr0 if k == 0 else self.lr_at(lr0, k - 1)
            now = self.lr_at(lr0, k)
            out.append(float(group["lr"]) * (now / before) if before != 0.0 else now)
        return out

    def _get_closed_form_lr(self) -> list[float]:
        return [self.lr_at(lr0, self.last_epoch) for lr0 in self.base_lrs]


class StepDecay(_FunctionScheduler):
    """Multiply the lr by ``gamma`` every ``step_size`` scheduler steps (default: x0.5 every 5)."""

    def __init__(self, optimizer, step_size: int = 5, gamma: float = 0.5, last_epoch: int = -1) -> None:
        _check_period("step_size", step_size, 0)
        if not gamma > 0.0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, lr0: float, k: int) -> float:
        return step_decay_lr(lr0, k, self.step_size, self.gamma)


class ExponentialDecay(_FunctionScheduler):
    """Multiply the lr by ``rate`` every ``every`` scheduler steps (default: x exp(-0.1) each)."""

    def __init__(self, optimizer, rate: float = math.exp(-0.1), every: int = 1, last_epoch: int = -1) -> None:
        if not 0.0 < rate <= 1.0 or every < 1:
            raise ValueError(f"need 0 < rate <= 1 and every >= 1, got rate={rate}, every={every}")
        self.rate, self.every = rate, every
        super().__init__(optimizer, last_epoch)

    def lr_at(self, lr0: float, k: int) -> float:
        return exponential_decay_lr(lr0, k, self.rate, self.every)


class TASO(_FunctionScheduler):
    """TASO's sigmoidal schedule over ``total`` scheduler steps (epochs in the paper).

    The paper's k counts epochs from 1: after the i-th ``scheduler.step()`` the lr is the
    value for k = i + 1, so the first epoch trains at k = 1.
    """

    def __init__(
        self, optimizer, total: int, alpha: float = 25.0, beta: float = 0.7,
        final_ratio: float = 1.0 / 20.0, last_epoch: int = -1,
    ) -> None:  # fmt: skip
        if total < 1:
            raise ValueError(f"TASO needs the total number of epochs or steps, got {total}")
        if not (math.isfinite(alpha) and math.isfinite(beta) and final_ratio >= 0.0):
            raise ValueError(
                f"TASO needs finite alpha and beta and final_ratio >= 0, got {alpha}, {beta}, {final_ratio}"
            )
        self.total, self.alpha, self.beta, self.final_ratio = total, alpha, beta, final_ratio
        super().__init__(optimizer, last_epoch)

    def lr_at(self, lr0: float, k: int) -> float:
        return taso_lr(lr0, k + 1, self.total, self.alpha, self.beta, lr0 * self.final_ratio)
