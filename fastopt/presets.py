"""Named optimizers: each is a point in the spec family.

``PRESETS`` maps a name to its spec, its default hyperparameters (fastopt's generic
names) and the torch.optim class it equals, if any. The classes below take torch.optim's
constructor arguments, defaults and error messages, keep torch's state keys, and differ
from torch only in running a fused backend.

Where a paper writes a rule differently from torch, the preset follows torch:

- SGD momentum accumulates the unscaled gradient with weight 1 - dampening and starts the
  buffer at the first gradient (Sutskever's classical momentum accumulates lr * g: the
  ``momentum_scaled``/``nag_scaled`` presets). With a constant lr the two are equal.
- RMSprop's momentum buffer accumulates g / vbar and lr multiplies afterwards; Dozat's
  scaled momentum would fold lr in (PRECONDITIONED vs SCALED momentum input).
- Adamax adds eps to |g| inside the running max (Eps.INSIDE), Kingma & Ba add nothing.
- NAdam uses torch's momentum schedule mu_t = beta1 (1 - 0.5 * 0.96^(t psi)) (Dozat's
  Nadam uses a constant or bias-corrected mu: the ``nadam_dozat`` preset).
- AMSGrad keeps the max of the *uncorrected* second moment, then bias-corrects it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from .optim import FusedOptimizer, ParamsT, check, check_lr
from .spec import (
    Accumulation,
    Curvature,
    Denominator,
    Eps,
    Extra,
    Momentum,
    MomentumInput,
    Norm,
    Schedule,
    Spec,
    WeightDecay,
)

M, MI, A, D, N, S = Momentum, MomentumInput, Accumulation, Denominator, Norm, Schedule

_ADAM_MOMENTUM = dict(momentum=M.CLASSICAL, mu_schedule=S.BIAS_CORRECTION)
_ADAM_DENOM = dict(denominator=D.MEAN, nu_schedule=S.BIAS_CORRECTION)
_NAG_ADAM_MOMENTUM = dict(momentum=M.NESTEROV, mu_schedule=S.BIAS_CORRECTION)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named rule: its spec, default hyperparameters and the torch.optim twin."""

    spec: Spec
    defaults: dict[str, Any]
    torch_name: str | None
    summary: str


def _p(torch_name: str | None, summary: str, defaults: dict[str, Any], **switches: Any) -> Preset:
    return Preset(Spec(**switches), defaults, torch_name, summary)


_ADAM_H = dict(lr=1e-3, mu=0.9, nu=0.999, eps=1e-8)
PRESETS: dict[str, Preset] = {
    "sgd": _p("SGD", "plain SGD", dict(lr=1e-3)),
    "momentum": _p(
        "SGD", "SGD with momentum (torch: unscaled, decaying sum)", dict(lr=1e-3, mu=0.9),
        momentum=M.CLASSICAL, momentum_accumulation=A.SUM,
    ),
    "nesterov": _p(
        "SGD", "SGD with Nesterov momentum (torch)", dict(lr=1e-3, mu=0.9),
        momentum=M.NESTEROV, momentum_accumulation=A.SUM,
    ),
    "momentum_scaled": _p(
        None, "classical momentum of the scaled step lr * g (Sutskever)", dict(lr=1e-3, mu=0.9),
        momentum=M.CLASSICAL, momentum_input=MI.SCALED, momentum_accumulation=A.SUM,
    ),
    "nag_scaled": _p(
        None, "Nesterov momentum of the scaled step (Sutskever's NAG)", dict(lr=1e-3, mu=0.9),
        momentum=M.NESTEROV, momentum_input=MI.SCALED, momentum_accumulation=A.SUM,
    ),
    "adagrad": _p("Adagrad", "AdaGrad (L2)", dict(lr=1e-2, eps=1e-10), denominator=D.SUM),
    "adagrad_l1": _p(None, "AdaGrad with the L1 norm", dict(lr=1e-2, eps=1e-10), denominator=D.SUM, norm=N.L1),
    "adagrad_linf": _p(
        None, "AdaGrad with the L-inf norm (never-decaying running max)", dict(lr=1e-2, eps=1e-10),
        denominator=D.SUM, norm=N.LINF,
    ),
    "rmsprop": _p("RMSprop", "RMSprop", dict(lr=1e-2, nu=0.99, eps=1e-8), denominator=D.MEAN),
    "rmsprop_centered": _p(
        "RMSprop", "centered RMSprop (Graves)", dict(lr=1e-2, nu=0.99, eps=1e-8), denominator=D.MEAN, centered=True
    ),
    "adadelta": _p(
        "Adadelta", "Adadelta (Zeiler)", dict(lr=1.0, nu=0.9, eps=1e-6),
        denominator=D.MEAN, eps=Eps.INSIDE, extra=Extra.ADADELTA,
    ),
    "adam": _p("Adam", "Adam", _ADAM_H, **_ADAM_MOMENTUM, **_ADAM_DENOM),
    "amsgrad": _p("Adam", "AMSGrad", _ADAM_H, **_ADAM_MOMENTUM, **_ADAM_DENOM, amsgrad=True),
    "adamw": _p(
        "AdamW", "AdamW (decoupled decay)", dict(_ADAM_H, weight_decay=1e-2),
        **_ADAM_MOMENTUM, **_ADAM_DENOM, weight_decay=WeightDecay.DECOUPLED,
    ),
    "adamax": _p(
        "Adamax", "Adamax (L-inf Adam, torch's eps inside the max)", dict(_ADAM_H, lr=2e-3),
        **_ADAM_MOMENTUM, denominator=D.MEAN, norm=N.LINF, eps=Eps.INSIDE,
    ),
    "nadam": _p(
        "NAdam", "NAdam with torch's momentum schedule", dict(_ADAM_H, lr=2e-3),
        momentum=M.NESTEROV, mu_schedule=S.NADAM, **_ADAM_DENOM,
    ),
    "radam": _p("RAdam", "RAdam (rectified Adam)", _ADAM_H, **_ADAM_MOMENTUM, **_ADAM_DENOM, extra=Extra.RADAM),
    # Dozat, Table 3 (CM rows): the three norms of bias-corrected Adam, lr .001/.002/.005 as
    # in Table 2. The L-inf denominator is Adamax's running max with the scheduled nu_t
    # applied to it directly (fastopt's reading: the paper leaves p -> inf with a decaying
    # mean open; taken as the limit of the means, bias correction would vanish)
    "adam_l1": _p(None, "Adam with the L1 norm (Dozat)", dict(_ADAM_H, lr=1e-3), **_ADAM_MOMENTUM, **_ADAM_DENOM, norm=N.L1),
    "adam_linf": _p(
        None, "Adam with the L-inf norm and bias-corrected nu (Dozat)", dict(_ADAM_H, lr=5e-3),
        **_ADAM_MOMENTUM, **_ADAM_DENOM, norm=N.LINF,
    ),
    # Dozat, Table 3: NAG with the three norms, both schedules bias-corrected
    "nadam_dozat": _p(
        None, "Nesterov-Adam, L2 (Dozat)", dict(_ADAM_H, lr=2e-3), **_NAG_ADAM_MOMENTUM, **_ADAM_DENOM
    ),
    "nadam_l1": _p(
        None, "Nesterov-Adam, L1 (Dozat)", dict(_ADAM_H, lr=1e-3), **_NAG_ADAM_MOMENTUM, **_ADAM_DENOM, norm=N.L1
    ),
    "nadam_linf": _p(
        None, "Nesterov-Adam, L-inf (Dozat)", dict(_ADAM_H, lr=5e-3), **_NAG_ADAM_MOMENTUM, **_ADAM_DENOM, norm=N.LINF
    ),
    # Dauphin et al.: equilibrated SGD, a true mean of (H u)^2
    "egd": _p(
        None, "equilibrated SGD: true mean of squared Hessian-vector products", dict(lr=1e-2, nu=0.999, eps=1e-4),
        denominator=D.MEAN, nu_schedule=S.TRUE_MEAN, curvature=Curvature.HVP,
    ),
}  # fmt: skip


def spec(name: str) -> Spec:
    """The spec of a named preset."""
    try:
        return PRESETS[name].spec
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


def make(name: str, params: ParamsT, **kwargs: Any) -> FusedOptimizer:
    """A :class:`FusedOptimizer` for a named preset; kwargs override its defaults."""
    preset = PRESETS[name] if name in PRESETS else None
    if preset is None:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return FusedOptimizer(params, spec=preset.spec, **{**preset.defaults, **kwargs})


# --- torch.optim twins ---------------------------------------------------------------------
# Their group dicts hold exactly torch's keys, so state_dicts move between the two; the
# spec of a group is derived from those keys (cached, the spec is hashable).

_TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable")


class _TorchTwin(FusedOptimizer):
    """Base of the presets that mirror a torch.optim class."""

    def __init__(self, params: ParamsT, defaults: dict[str, Any], options: dict[str, Any]) -> None:
        if options.pop("differentiable", False):
            raise NotImplementedError(f"fastopt {type(self).__name__} does not support differentiable=True")
        if defaults.get("fused") and defaults.get("foreach"):  # contradictory: torch refuses it
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self.check_hyper(defaults)
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:  # as Python's own message: a misspelt option must not go unnoticed
            raise TypeError(
                f"{type(self).__name__}.__init__() got an unexpected keyword argument {unknown[0]!r}"
            )
        self._init_options(
            **{name: options.get(name, default) for name, default in self.option_defaults.items()}
        )
        torch_optimizer_init = super(FusedOptimizer, self).__init__
        torch_optimizer_init(params, defaults)
        self._track_state()

    def group_spec(self, group: dict[str, Any]) -> Spec:
        return _cached_spec(type(self), *(group.get(k) for k in self._spec_keys))

    _spec_keys: tuple[str, ...] = ()

    @staticmethod
    def spec_from(*values: Any) -> Spec:  # overridden per class
        raise NotImplementedError


@functools.lru_cache(maxsize=512)
def _cached_spec(cls: type, *values: Any) -> Spec:
    return cls.spec_from(*values)


def _flags(foreach, fused, capturable, differentiable) -> dict[str, Any]:
    return dict(foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)


def _check_betas(group: dict[str, Any]) -> None:
    betas = group["betas"]
    for k, beta in enumerate(betas):
        # read on the host every step: from a device tensor that would be a host sync each
        # step, and an error while a CUDA graph is being captured
        if isinstance(beta, torch.Tensor) and beta.device.type != "cpu":
            raise ValueError(
                f"betas[{k}] is a tensor on {beta.device}: fastopt reads the betas on the host at "
                "every step; pass a float (or a CPU tensor)"
            )
    check(0.0 <= betas[0] < 1.0, f"Invalid beta parameter at index 0: {betas[0]}")
    check(0.0 <= betas[1] < 1.0, f"Invalid beta parameter at index 1: {betas[1]}")


def _check_common(group: dict[str, Any], eps: bool = True) -> None:
    """torch.optim's checks of lr, eps and weight_decay."""
    check_lr(group["lr"])
    if eps:
        check(0.0 <= group["eps"], f"Invalid epsilon value: {group['eps']}")
    check(0.0 <= group["weight_decay"], f"Invalid weight_decay value: {group['weight_decay']}")


class SGD(_TorchTwin):
    """torch.optim.SGD, fused. Momentum is a decaying sum of the unscaled gradient."""

    state_keys = {"m": "momentum_buffer"}
    keeps_step = False
    _spec_keys = ("momentum", "nesterov", "maximize")

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
        weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
        foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None, **options: Any,
    ) -> None:  # fmt: skip
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        )  # fmt: skip
        super().__init__(params, defaults, dict(options, differentiable=differentiable))

    @staticmethod
    def check_hyper(group: dict[str, Any]) -> None:
        _check_common(group, eps=False)
        check(group["momentum"] >= 0.0, f"Invalid momentum value: {group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    @staticmethod
    def spec_from(momentum, nesterov, maximize) -> Spec:
        if momentum == 0:
            return Spec(maximize=bool(maximize))
        kind = M.NESTEROV if nesterov else M.CLASSICAL
        return Spec(momentum=kind, momentum_accumulation=A.SUM, maximize=bool(maximize))

    def group_hyper(self, group):
        return dict(
            lr=group["lr"],
            mu=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
        )


class _AdamFamily(_TorchTwin):
    state_keys = {"m": "exp_avg", "v": "exp_avg_sq", "vmax": "max_exp_avg_sq"}

    @staticmethod
    def check_hyper(group: dict[str, Any]) -> None:
        _check_common(group)
        _check_betas(group)

    def group_hyper(self, group):
        b1, b2 = group["betas"]
        return dict(
            lr=group["lr"], mu=float(b1), nu=float(b2), eps=group["eps"], weight_decay=group["weight_decay"],
            momentum_decay=group.get("momentum_decay", 4e-3),
        )  # fmt: skip


class Adam(_AdamFamily):
    """torch.optim.Adam, fused (amsgrad, maximize, decoupled_weight_decay as in torch)."""

    _spec_keys = ("amsgrad", "maximize", "decoupled_weight_decay")

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None, maximize: bool = False,
        capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
        decoupled_weight_decay: bool = False, **options: Any,
    ) -> None:  # fmt: skip
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            **_flags(foreach, fused, capturable, differentiable), decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        super().__init__(params, defaults, dict(options, differentiable=differentiable))

    @staticmethod
    def spec_from(amsgrad, maximize, decoupled) -> Spec:
        wd = WeightDecay.DECOUPLED if decoupled else WeightDecay.L2
        return Spec(
            **_ADAM_MOMENTUM, **_ADAM_DENOM, amsgrad=bool(amsgrad), maximize=bool(maximize), weight_decay=wd
        )


class AdamW(Adam):
    """torch.optim.AdamW, fused: Adam with decoupled weight decay (default 0.01)."""

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
        foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
        fused: bool | None = None, **options: Any,
    ) -> None:  # fmt: skip
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            **options,
        )  # fmt: skip


class Adamax(_AdamFamily):
    """torch.optim.Adamax, fused (eps is added to |g| inside the running max)."""

    state_keys = {"m": "exp_avg", "v": "exp_inf"}
    _spec_keys = ("maximize",)

    def __init__(
        self, params: ParamsT, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0, foreach: bool | None = None, *, maximize: bool = False,
        differentiable: bool = False, capturable: bool = False, **options: Any,
    ) -> None:  # fmt: skip
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, maximize=maximize,
            differentiable=differentiable, capturable=capturable,
        )  # fmt: skip
        super().__init__(params, defaults, dict(options, differentiable=differentiable))

    @staticmethod
    def spec_from(maximize) -> Spec:
        return PRESETS["adamax"].spec.replace(maximize=bool(maximize))


class NAdam(_AdamFamily):
    """torch.optim.NAdam, fused, with torch's momentum schedule and 'mu_product' state."""

    _spec_keys = ("maximize", "decoupled_weight_decay")

    def __init__(
        self, params: ParamsT, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False, *,
        foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
        differentiable: bool = False, **options: Any,
    ) -> None:  # fmt: skip
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable,
        )  # fmt: skip
        super().__init__(params, defaults, dict(options, differentiable=differentiable))

    @staticmethod
    def check_hyper(group: dict[str, Any]) -> None:
        _AdamFamily.check_hyper(group)
        psi = group.get("momentum_decay", 4e-3)  # absent from checkpoints of older torch
        check(0.0 <= psi, f"Invalid momentum_decay value: {psi}")

    @staticmethod
    def spec_from(maximize, decoupled) -> Spec:
        wd = WeightDecay.DECOUPLED if decoupled else WeightDecay.L2
        return PRESETS["nadam"].spec.replace(maximize=bool(maximize), weight_decay=wd)


class RAdam(_AdamFamily):
    """torch.optim.RAdam, fused."""

    _spec_keys = ("maximize", "decoupled_weight_decay")

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0, decoupled_weight_decay: bool = False, *, foreach: bool | None = None,
        maximize: bool = False, capturable: bool = False, differentiable: bool = False, **options: Any,
    ) -> None:  # fmt: skip
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
            capturable=capturable, decoupled_weight_decay=decoupled_weight_decay, differentiable=differentiable,
        )  # fmt: skip
        super().__init__(params, defaults, dict(options, differentiable=differentiable))

    @staticmethod
    def spec_from(maximize, decoupled) -> Spec:
        wd = WeightDecay.DECOUPLED if decoupled else WeightDecay.L2
        return PRESETS["radam"].spec.replace(maximize=bool(maximize), weight_decay=wd)


class Adagrad(_TorchTwin):
    """torch.optim.Adagrad, fused (lr_decay and initial_accumulator_value as in torch)."""

    state_keys = {"v": "sum"}
    _spec_keys = ("maximize",)

    def __init__(
        self, params: ParamsT, lr: float = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
        initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
        maximize: bool = False, differentiable: bool = False, fused: bool | None = None, **options: Any,
    ) -> None:  # fmt: skip
        defaults = dict(
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
            differentiable=differentiable, fused=fused,
        )  # fmt: skip
        super().__init__(params, defaults, dict(options, differentiable=differentiable))
        # torch creates Adagrad's state in the constructor; so do we (same checkpoint layout)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_param_state(
                    group, self.group_spec(group), p, self.state[p], self.group_hyper(group)
                )

    @staticmethod
    def check_hyper(group: dict[str, Any]) -> None:
        _check_common(group)
        check(0.0 <= group["lr_decay"], f"Invalid lr_decay value: {group['lr_decay']}")
        initial = group["initial_accumulator_value"]
        check(0.0 <= initial, f"Invalid initial_accumulator_value value: {initial}")

    def share_memory(self) -> None:
        """Move the accumulators into shared memory (Hogwild training), as torch's Adagrad."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    @staticmethod
    def spec_from(maximize) -> Spec:
        return PRESETS["adagrad"].spec.replace(maximize=bool(maximize))

    def group_hyper(self, group):
        return dict(
            lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"], lr_decay=group["lr_decay"],
            initial_accumulator_value=group["initial_accumulator_value"],
        )  # fmt: skip


class RMSprop(_TorchTwin):
    """torch.optim.RMSprop, fused (centered and momentum as in torch)."""

    state_keys = {"m": "momentum_buffer", "v": "square_avg", "gavg": "grad_avg"}
    _spec_keys = ("momentum", "centered", "maximize")

    def __init__(
        self, params: ParamsT, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0,
        momentum: float = 0, centered: bool = False, capturable: bool = False, foreach: bool | None = None,
        maximize: bool = False, differentiable: bool = False, **options: Any,
    ) -> None:  # fmt: skip
        defaults = dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
        )  # fmt: skip
        super().__init__(params, defaults, dict(options, differentiable=differentiable))

    @staticmethod
    def check_hyper(group: dict[str, Any]) -> None:
        _check_common(group)
        check(0.0 <= group["momentum"], f"Invalid momentum value: {group['momentum']}")
        check(0.0 <= group["alpha"], f"Invalid alpha value: {group['alpha']}")

    @staticmethod
    def spec_from(momentum, centered, maximize) -> Spec:
        base = dict(denominator=D.MEAN, centered=bool(centered), maximize=bool(maximize))
        if momentum > 0:
            # torch: buf = momentum * buf + g / vbar; p -= lr * buf
            base.update(momentum=M.CLASSICAL, momentum_input=MI.PRECONDITIONED, momentum_accumulation=A.SUM)
        return Spec(**base)

    def group_hyper(self, group):
        return dict(
            lr=group["lr"], mu=group["momentum"], nu=group["alpha"], eps=group["eps"],
            weight_decay=group["weight_decay"],
        )  # fmt: skip


class Adadelta(_TorchTwin):
    """torch.optim.Adadelta, fused."""

    state_keys = {"v": "square_avg", "u": "acc_delta"}
    _spec_keys = ("maximize",)

    def __init__(
        self, params: ParamsT, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0,
        foreach: bool | None = None, *, capturable: bool = False, maximize: bool = False,
        differentiable: bool = False, **options: Any,
    ) -> None:  # fmt: skip
        defaults = dict(
            lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize, capturable=capturable,
            foreach=foreach, differentiable=differentiable,
        )  # fmt: skip
        super().__init__(params, defaults, dict(options, differentiable=differentiable))

    @staticmethod
    def check_hyper(group: dict[str, Any]) -> None:
        _check_common(group)
        check(0.0 <= group["rho"] <= 1.0, f"Invalid rho value: {group['rho']}")

    @staticmethod
    def spec_from(maximize) -> Spec:
        return PRESETS["adadelta"].spec.replace(maximize=bool(maximize))

    def group_hyper(self, group):
        return dict(lr=group["lr"], nu=group["rho"], eps=group["eps"], weight_decay=group["weight_decay"])


TORCH_TWINS: dict[str, type[_TorchTwin]] = {
    cls.__name__: cls for cls in (SGD, Adam, AdamW, Adamax, NAdam, RAdam, Adagrad, RMSprop, Adadelta)
}
