"""The optimizer table: one entry per torch-twin preset, in the spirit of torch's OptimizerInfo.

Each entry says which constructor options to sweep (crossed into a matrix by the tests),
which bad inputs must raise which error, and the torch.optim class it must equal.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

import fastopt
from fastopt import backends


@dataclasses.dataclass(frozen=True)
class OptimInfo:
    name: str  # the class name in fastopt and torch.optim
    # option axes: each maps an argument to the values to sweep; crossed per entry
    axes: dict[str, tuple[Any, ...]]
    base: dict[str, Any] = dataclasses.field(default_factory=dict)
    # (kwargs, exception type, message regex) that the constructor must raise
    errors: tuple[tuple[dict[str, Any], type[Exception], str], ...] = ()
    # combinations torch itself rejects
    invalid: tuple[dict[str, Any], ...] = ()

    @property
    def fastopt_cls(self) -> type:
        return getattr(fastopt, self.name)

    @property
    def torch_cls(self) -> type:
        return getattr(torch.optim, self.name)

    def option_grid(self) -> list[dict[str, Any]]:
        keys = list(self.axes)
        grid = []
        for values in itertools.product(*(self.axes[k] for k in keys)):
            kw = dict(self.base, **dict(zip(keys, values)))
            if any(all(kw.get(k) == v for k, v in bad.items()) for bad in self.invalid):
                continue
            grid.append(kw)
        return grid


_NEG_LR = ({"lr": -1.0}, ValueError, "Invalid learning rate")
_NEG_WD = ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay")
_NEG_EPS = ({"eps": -1e-8}, ValueError, "Invalid epsilon")
_BAD_BETA0 = ({"betas": (1.0, 0.999)}, ValueError, "Invalid beta parameter at index 0")
_BAD_BETA1 = ({"betas": (0.9, -0.1)}, ValueError, "Invalid beta parameter at index 1")
_MAXIMIZE = (False, True)
_WD = (0.0, 0.1)

OPTIM_DB: tuple[OptimInfo, ...] = (
    OptimInfo(
        "SGD",
        axes=dict(momentum=(0.0, 0.9), nesterov=(False, True), dampening=(0.0, 0.3), weight_decay=_WD,
                  maximize=_MAXIMIZE),
        base=dict(lr=0.05),
        errors=(_NEG_LR, _NEG_WD, ({"momentum": -0.5}, ValueError, "Invalid momentum"),
                ({"nesterov": True, "momentum": 0.0}, ValueError, "Nesterov momentum requires")),
        invalid=({"nesterov": True, "momentum": 0.0}, {"nesterov": True, "dampening": 0.3}),
    ),
    OptimInfo(
        "Adam",
        axes=dict(amsgrad=(False, True), weight_decay=_WD, maximize=_MAXIMIZE, decoupled_weight_decay=(False, True)),
        base=dict(lr=0.01),
        errors=(_NEG_LR, _NEG_WD, _NEG_EPS, _BAD_BETA0, _BAD_BETA1),
    ),
    OptimInfo(
        "AdamW", axes=dict(amsgrad=(False, True), weight_decay=(0.0, 0.05), maximize=_MAXIMIZE), base=dict(lr=0.01),
        errors=(_NEG_LR, _NEG_WD, _BAD_BETA0),
    ),
    OptimInfo(
        "Adagrad",
        axes=dict(lr_decay=(0.0, 0.01), initial_accumulator_value=(0.0, 0.1), weight_decay=_WD, maximize=_MAXIMIZE),
        base=dict(lr=0.05),
        errors=(_NEG_LR, _NEG_WD, ({"lr_decay": -1.0}, ValueError, "Invalid lr_decay"),
                ({"initial_accumulator_value": -1.0}, ValueError, "Invalid initial_accumulator_value")),
    ),
    OptimInfo(
        "RMSprop",
        axes=dict(momentum=(0.0, 0.9), centered=(False, True), weight_decay=_WD, maximize=_MAXIMIZE),
        base=dict(lr=0.005),
        errors=(_NEG_LR, _NEG_WD, _NEG_EPS, ({"alpha": -0.5}, ValueError, "Invalid alpha"),
                ({"momentum": -0.5}, ValueError, "Invalid momentum")),
    ),
    OptimInfo(
        "Adadelta", axes=dict(rho=(0.9, 0.5), weight_decay=_WD, maximize=_MAXIMIZE), base=dict(lr=1.0),
        errors=(_NEG_LR, _NEG_WD, _NEG_EPS, ({"rho": 1.5}, ValueError, "Invalid rho")),
    ),
    OptimInfo(
        "Adamax", axes=dict(weight_decay=_WD, maximize=_MAXIMIZE, betas=((0.9, 0.999), (0.5, 0.9))),
        base=dict(lr=0.01),
        errors=(_NEG_LR, _NEG_WD, _NEG_EPS, _BAD_BETA0, _BAD_BETA1),
    ),
    OptimInfo(
        "NAdam",
        axes=dict(weight_decay=_WD, maximize=_MAXIMIZE, decoupled_weight_decay=(False, True),
                  momentum_decay=(4e-3, 0.1)),
        base=dict(lr=0.01),
        errors=(_NEG_LR, _NEG_WD, _BAD_BETA0, ({"momentum_decay": -0.1}, ValueError, "Invalid momentum_decay")),
    ),
    OptimInfo(
        "RAdam", axes=dict(weight_decay=_WD, maximize=_MAXIMIZE, decoupled_weight_decay=(False, True)),
        base=dict(lr=0.01),
        errors=(_NEG_LR, _NEG_WD, _NEG_EPS, _BAD_BETA1),
    ),
)  # fmt: skip


def cpu_backends() -> list[str]:
    """The backends that can step CPU tensors in this process."""
    names = ["torch"]
    if backends.unavailable_reason("cpp") is None:
        names.append("cpp")
    return names


def matrix() -> list[tuple[OptimInfo, dict[str, Any]]]:
    """Every (optimizer, option combination) of the table."""
    return [(info, kw) for info in OPTIM_DB for kw in info.option_grid()]


def case_id(info: OptimInfo, kw: dict[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in kw.items() if info.base.get(k) != v)
    return f"{info.name}[{opts}]"
