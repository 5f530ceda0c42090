"""The update-rule spec: the discrete switches of Dozat's hyperalgorithm, plus what the
named optimizers of torch.optim need.

A :class:`Spec` is immutable and hashable. It says *which* rule runs; the continuous
hyperparameters (lr, betas, eps, weight decay, ...) live in the optimizer's param groups.
Every backend executes a spec by the same per-element form (see ``fastopt/rule.py`` and
``csrc/update_math.h``); ``fastopt/reference.py`` defines what correct means, written from
the papers' equations.

Dozat's Algorithm 1, in the notation used throughout fastopt::

    h_t    = grad f(theta)  or  H u  (u ~ N(0, 1))                      curvature source
    v_t    = nu_t v_{t-1} + {(1 - nu_t) or 1} |h_t|^p                  denominator
    vbar_t = v_t^(1/p) + eps
    g_t    = {1 or alpha_t / vbar_t} grad                               scaled / unscaled momentum
    m_t    = mu_t m_{t-1} + {(1 - mu_t) or 1} g_t                       mean / sum accumulation
    mbar_t = {mu_{t+1} m_t + {(1 - mu_t) or 1} g_t  or  m_t}            Nesterov / classical
    theta  = theta - {alpha_t / vbar_t or 1} mbar_t
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import itertools
from collections.abc import Iterator


class Momentum(enum.IntEnum):
    """How the momentum vector enters the update."""

    NONE = 0
    CLASSICAL = 1
    NESTEROV = 2


class MomentumInput(enum.IntEnum):
    """What the momentum vector accumulates.

    UNSCALED: the raw gradient; lr and the denominator apply afterwards (Adam, torch SGD).
    SCALED: the whole step lr * g / vbar (Sutskever's classical momentum).
    PRECONDITIONED: g / vbar, with lr applied afterwards (torch.optim.RMSprop's momentum).
    """

    UNSCALED = 0
    SCALED = 1
    PRECONDITIONED = 2


class Accumulation(enum.IntEnum):
    """Weight of the new term in a running accumulator: (1 - decay) or 1."""

    MEAN = 0
    SUM = 1


class Denominator(enum.IntEnum):
    """The adaptive denominator vbar."""

    NONE = 0
    SUM = 1  # AdaGrad: a true sum, never decays
    MEAN = 2  # RMSprop/Adam: a decaying mean, with the nu schedule


class Norm(enum.IntEnum):
    """The norm p of the denominator: L1, L2 or L-infinity.

    L-infinity is the limit p -> inf: a running max v = max(nu_t v, |h|) (Adamax); with a
    SUM denominator it never decays, v = max(v, |h|). Its nu schedule gives nu_t directly
    (a max has no weight (1 - nu) to correct).
    """

    L1 = 1
    L2 = 2
    LINF = 3


class Eps(enum.IntEnum):
    """Where eps goes: OUTSIDE, v^(1/p) + eps; INSIDE, (v + eps)^(1/p) (Adadelta).

    For the L-infinity norm INSIDE adds eps to |h| before the running max, as torch's
    Adamax does.
    """

    OUTSIDE = 0
    INSIDE = 1


class Curvature(enum.IntEnum):
    """What the denominator accumulates: the gradient, or a Hessian-vector product H u
    with u ~ N(0, 1) (equilibrated SGD, Dauphin et al.)."""

    GRADIENT = 0
    HVP = 1


class Schedule(enum.IntEnum):
    """Schedule of a decay parameter (mu for momentum, nu for the denominator).

    CONSTANT: mu_t = mu.
    BIAS_CORRECTION: mu_t = mu (1 - mu^(t-1)) / (1 - mu^t) (Kingma & Ba's correction).
    TRUE_MEAN: mu_t = (t - 1) / t, the limit mu -> 1 of BIAS_CORRECTION.
    INCREASING: mu_t = min(1 - 2^(-1 - log2(floor(t / 250) + 1)), mu_max) (Sutskever et al.,
        whose schedule Dozat adapts). It starts at mu_1 = 0.5, so a MEAN accumulator is
        biased towards zero at first (Dozat's footnote 1: a schedule with mu_1 = 0 is not).
    NADAM: torch.optim.NAdam's momentum schedule mu_t = beta1 (1 - 0.5 * 0.96^(t psi)),
        with the bias correction by the running product of mu (momentum only).
    """

    CONSTANT = 0
    BIAS_CORRECTION = 1
    TRUE_MEAN = 2
    INCREASING = 3
    NADAM = 4


class WeightDecay(enum.IntEnum):
    """L2: wd * theta is added to the gradient. DECOUPLED: theta *= 1 - lr * wd (AdamW)."""

    L2 = 0
    DECOUPLED = 1


class Extra(enum.IntEnum):
    """Rules that add a piece to the hyperalgorithm."""

    NONE = 0
    ADADELTA = 1  # numerator sqrt(u + eps), u the running mean of squared updates
    RADAM = 2  # rectification of the adaptive lr (Liu et al.), SGD-with-momentum early on


class SpecError(ValueError):
    """An invalid combination of switches."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """One update rule: the discrete switches only (hashable, immutable).

    Invalid combinations raise :class:`SpecError` at construction. Combinations that would
    compute the same thing as another spec (a switch that has no effect) are invalid too,
    so :func:`family` lists each distinct algorithm once.
    """

    momentum: Momentum = Momentum.NONE
    momentum_input: MomentumInput = MomentumInput.UNSCALED
    momentum_accumulation: Accumulation = Accumulation.MEAN
    mu_schedule: Schedule = Schedule.CONSTANT
    denominator: Denominator = Denominator.NONE
    norm: Norm = Norm.L2
    eps: Eps = Eps.OUTSIDE
    centered: bool = False
    amsgrad: bool = False
    curvature: Curvature = Curvature.GRADIENT
    nu_schedule: Schedule = Schedule.CONSTANT
    extra: Extra = Extra.NONE
    weight_decay: WeightDecay = WeightDecay.L2
    maximize: bool = False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = _FIELD_TYPES[field.name]
            try:
                if kind is bool and value not in (0, 1):  # (False == 0, True == 1) not "False"
                    raise ValueError(value)
                coerced = kind(value)
            except (ValueError, KeyError, TypeError) as exc:
                raise SpecError(f"Spec.{field.name}: {value!r} is not a {kind.__name__}") from exc
            object.__setattr__(self, field.name, coerced)
        problem = _why_invalid(self)
        if problem:
            raise SpecError(f"invalid Spec ({self.short()}): {problem}")

    # Which state tensors the rule keeps, by role. Backends and the optimizer layer use
    # these names; presets map them onto torch.optim's state keys. (Cached: a step asks
    # several times; a frozen dataclass keeps the value in its __dict__, outside eq and hash.)
    @functools.cached_property
    def state_roles(self) -> tuple[str, ...]:
        roles = []
        if self.momentum != Momentum.NONE:
            roles.append("m")
        if self.denominator != Denominator.NONE:
            roles.append("v")
            if self.amsgrad:
                roles.append("vmax")
            if self.centered:
                roles.append("gavg")
        if self.extra == Extra.ADADELTA:
            roles.append("u")
        return tuple(roles)

    def key(self) -> str:
        """A plain-string form (safe in checkpoints loaded with ``weights_only=True``)."""
        return ",".join(f"{f.name}={int(getattr(self, f.name))}" for f in dataclasses.fields(self))

    @staticmethod
    def from_key(key: str) -> Spec:
        """The spec of a :meth:`key` string."""
        return _spec_from_key(key)

    def replace(self, **changes: object) -> Spec:
        """A copy with some switches changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def short(self) -> str:
        """A compact readable name, used in test ids and benchmark tables."""
        parts = []
        if self.momentum != Momentum.NONE:
            parts.append(
                f"{self.momentum.name.lower()}-{self.momentum_input.name.lower()}"
                f"-{self.momentum_accumulation.name.lower()}-mu:{self.mu_schedule.name.lower()}"
            )
        if self.denominator != Denominator.NONE:
            d = f"{self.denominator.name.lower()}-{self.norm.name}"
            if self.denominator == Denominator.MEAN:
                d += f"-nu:{self.nu_schedule.name.lower()}"
            if self.eps == Eps.INSIDE:
                d += "-epsin"
            if self.centered:
                d += "-centered"
            if self.amsgrad:
                d += "-amsgrad"
            if self.curvature == Curvature.HVP:
                d += "-hvp"
            parts.append(d)
        if self.extra != Extra.NONE:
            parts.append(self.extra.name.lower())
        if self.weight_decay == WeightDecay.DECOUPLED:
            parts.append("decoupled")
        if self.maximize:
            parts.append("maximize")
        return "+".join(parts) or "sgd"


_FIELD_TYPES = {
    "momentum": Momentum,
    "momentum_input": MomentumInput,
    "momentum_accumulation": Accumulation,
    "mu_schedule": Schedule,
    "denominator": Denominator,
    "norm": Norm,
    "eps": Eps,
    "centered": bool,
    "amsgrad": bool,
    "curvature": Curvature,
    "nu_schedule": Schedule,
    "extra": Extra,
    "weight_decay": WeightDecay,
    "maximize": bool,
}

# Defaults of the momentum switches; a spec without momentum must leave them here.
_MOMENTUM_DEFAULTS = dict(
    momentum_input=MomentumInput.UNSCALED,
    momentum_accumulation=Accumulation.MEAN,
    mu_schedule=Schedule.CONSTANT,
)
_DENOMINATOR_DEFAULTS = dict(
    norm=Norm.L2,
    eps=Eps.OUTSIDE,
    centered=False,
    amsgrad=False,
    curvature=Curvature.GRADIENT,
    nu_schedule=Schedule.CONSTANT,
)


@functools.lru_cache(maxsize=1024)
def _spec_from_key(key: str) -> Spec:
    try:
        fields = dict(item.split("=") for item in key.split(","))
        return Spec(**{name: _FIELD_TYPES[name](int(value)) for name, value in fields.items()})
    except (ValueError, KeyError) as exc:
        raise SpecError(f"not a spec key: {key!r}") from exc


def _why_invalid(s: Spec) -> str | None:  # noqa: C901 - one rule per line reads best here
    if s.momentum == Momentum.NONE:
        for name, default in _MOMENTUM_DEFAULTS.items():
            if getattr(s, name) != default:
                return f"{name} has no effect without momentum"
    else:
        if s.momentum_accumulation == Accumulation.SUM and s.mu_schedule in (
            Schedule.BIAS_CORRECTION,
            Schedule.TRUE_MEAN,
            Schedule.NADAM,
        ):
            return f"mu schedule {s.mu_schedule.name} corrects a mean; it needs MEAN accumulation"
        if s.momentum_input == MomentumInput.PRECONDITIONED and s.denominator == Denominator.NONE:
            return "PRECONDITIONED momentum needs a denominator (without one it equals UNSCALED)"
        if s.mu_schedule == Schedule.NADAM and not (
            s.momentum == Momentum.NESTEROV and s.momentum_input == MomentumInput.UNSCALED
        ):
            return "the NADAM schedule is torch's NAdam: Nesterov momentum of the unscaled gradient"
    if s.denominator == Denominator.NONE:
        for name, default in _DENOMINATOR_DEFAULTS.items():
            if getattr(s, name) != default:
                return f"{name} has no effect without a denominator"
    else:
        if s.nu_schedule == Schedule.NADAM:
            return "the NADAM schedule is for momentum only"
        if s.denominator == Denominator.SUM and s.nu_schedule != Schedule.CONSTANT:
            return "a SUM denominator (AdaGrad) never decays, so it takes no nu schedule"
        if s.centered and s.denominator != Denominator.MEAN:
            return "centering subtracts the squared running mean: it needs a MEAN denominator"
        if s.centered and s.nu_schedule in (Schedule.BIAS_CORRECTION, Schedule.TRUE_MEAN):
            # with nu_1 = 0 the first variance estimate is h^2 - h^2 = 0: the step is h / eps
            return f"centering with nu schedule {s.nu_schedule.name} divides by eps at step 1"
        if s.centered and s.norm != Norm.L2:
            return "centering subtracts the squared mean: it needs the L2 norm"
        if s.eps == Eps.INSIDE and s.norm == Norm.L1:
            return "for the L1 norm (v + eps)^1 equals v^1 + eps: eps placement has no effect"
        if s.amsgrad and s.norm == Norm.LINF:
            return "AMSGrad's running max adds nothing to the LINF running max"
        if s.amsgrad and (s.denominator == Denominator.SUM or s.nu_schedule == Schedule.TRUE_MEAN):
            # AMSGrad keeps the max of the stored accumulator (torch: the uncorrected one); a
            # sum of squares, or the true mean's raw sum, only grows: the max is itself
            return "AMSGrad's running max adds nothing to an accumulator that never decreases (a sum)"
    if s.extra == Extra.ADADELTA:
        if not (s.denominator == Denominator.MEAN and s.norm == Norm.L2 and s.momentum == Momentum.NONE):
            return "ADADELTA needs an L2 MEAN denominator and no momentum"
        if s.nu_schedule in (Schedule.BIAS_CORRECTION, Schedule.TRUE_MEAN):
            # the numerator uses u of the previous step, whose correction differs from today's
            return "ADADELTA takes a CONSTANT or INCREASING nu schedule"
    if s.extra == Extra.RADAM:
        ok = (
            s.momentum == Momentum.CLASSICAL
            and s.momentum_input == MomentumInput.UNSCALED
            and s.momentum_accumulation == Accumulation.MEAN
            and s.mu_schedule == Schedule.BIAS_CORRECTION
            and s.denominator == Denominator.MEAN
            and s.norm == Norm.L2
            and s.nu_schedule == Schedule.BIAS_CORRECTION
            and s.eps == Eps.OUTSIDE
            and not s.centered
            and not s.amsgrad
        )
        if not ok:
            return "RADAM rectifies Adam: classical unscaled bias-corrected momentum and L2 denominator"
    return None


def family(include_orthogonal: bool = False) -> Iterator[Spec]:
    """Every valid spec: the whole hyperalgorithm family, each distinct rule once.

    With ``include_orthogonal`` the weight-decay mode and maximize are enumerated too
    (they multiply the family by four); otherwise they stay at L2 / minimize.
    """
    yield from _family(include_orthogonal)


@functools.lru_cache(maxsize=2)
def _family(include_orthogonal: bool) -> tuple[Spec, ...]:
    # enumerating ~400k switch combinations takes seconds: once per process is enough
    return tuple(_enumerate(include_orthogonal))


def _enumerate(include_orthogonal: bool) -> Iterator[Spec]:
    axes = {name: list(kind) if kind is not bool else [False, True] for name, kind in _FIELD_TYPES.items()}
    if not include_orthogonal:
        axes["weight_decay"] = [WeightDecay.L2]
        axes["maximize"] = [False]
    names = list(axes)
    for values in itertools.product(*(axes[n] for n in names)):
        try:
            yield Spec(**dict(zip(names, values)))
        except SpecError:
            continue
