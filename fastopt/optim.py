"""The torch.optim layer: :class:`FusedOptimizer` runs any spec through a backend.

Named optimizers (``fastopt.Adam`` and friends, in :mod:`fastopt.presets`) are thin
subclasses that translate torch.optim's constructor arguments into a spec and fastopt's
generic hyperparameter names, and name the state tensors as torch.optim does, so that
checkpoints move between the two.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import torch

from . import backends, distributed, tensor_lists
from .device_scalars import DeviceScalars
from .scalars import StepScalars, nadam_hyper, nadam_mu, nadam_mu_product, rounding_seed, step_scalars
from .spec import Curvature, Denominator, Momentum, Schedule, Spec, WeightDecay
from .tracked_state import ParamState, TrackedState

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

# role -> state key used when a subclass does not rename it
GENERIC_STATE_KEYS = {
    "m": "exp_avg",
    "v": "exp_avg_sq",
    "vmax": "max_exp_avg_sq",
    "gavg": "grad_avg",
    "u": "acc_delta",
    "master": "master_param",
}
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKEND_NAMES = ("auto", "torch", "cpp", "triton", "cuda")
# Backends whose step() takes the gradient multiplier and found_inf as device tensors
# (and a stochastic-rounding seed), and that give a global grad norm as a device tensor.
_DEVICE_HOOK_BACKENDS = ("triton", "cuda")
# the options that are not hyperparameters (attributes of the optimizer) and their defaults
_OPTIONS: dict[str, Any] = dict(backend="auto", max_grad_norm=None, state_dtype=None, master_weights=False)


def check(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless ``condition`` (torch.optim's wording is kept)."""
    if not condition:
        raise ValueError(message)


# the generic hyperparameters' ranges (lr apart), and the word torch's messages use
_RANGES: dict[str, tuple[float, float]] = dict(
    mu=(0.0, 1.0),
    nu=(0.0, 1.0),
    eps=(0.0, math.inf),
    weight_decay=(0.0, math.inf),
    dampening=(0.0, 1.0),
    lr_decay=(0.0, math.inf),
    initial_accumulator_value=(0.0, math.inf),
    momentum_decay=(0.0, math.inf),
    mu_max=(0.0, 1.0),
    nu_max=(0.0, 1.0),
)
_RANGE_NAMES = {"eps": "epsilon"}


def check_lr(lr: Any) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    check(lr >= 0.0, f"Invalid learning rate: {lr}")


def _group_scalars(
    index: int, spec: Spec, hyper: dict[str, Any], t: int, lr: float, carried: float | None
) -> StepScalars:
    """Param group ``index``'s scalars of step ``t``, or an error naming the group."""
    try:
        return step_scalars(spec, hyper, t, lr=lr, mu_product=carried)
    except (ArithmeticError, ValueError) as exc:  # mu = 1 under bias correction: 0 / 0
        raise ValueError(
            f"param group {index}: its hyperparameters define no step {t} of "
            f"{spec.short()} ({type(exc).__name__}: {exc})"
        ) from exc


def _same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _extent(t: torch.Tensor) -> int:
    """Elements from the first to one past the last that ``t`` addresses (0 if empty)."""
    if t.numel() == 0:
        return 0
    return 1 + sum(st * (sz - 1) for st, sz in zip(t.stride(), t.shape))


# up to this many elements a possibly self-overlapping param has its addresses checked
_EXACT_OVERLAP_CHECK = 1 << 22


def _self_overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (an expanded view, say). Sufficient test:
    with dims sorted by stride, each stride clears everything the smaller ones span; where
    it fails, the addresses themselves decide (up to a size; beyond, "may share")."""
    if t.is_contiguous():
        return False
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < span:
            if t.numel() <= _EXACT_OVERLAP_CHECK:
                return np.unique(_addresses(t)).size < t.numel()
            return True
        span += stride * (size - 1)
    return False


def _addresses(t: torch.Tensor) -> np.ndarray:
    offsets = np.zeros(1, dtype=np.int64)
    for stride, size in zip(t.stride(), t.shape):
        offsets = (offsets[:, None] + np.arange(size, dtype=np.int64) * stride).ravel()
    return t.data_ptr() + offsets * t.element_size()


def _check_no_overlap(params: list[torch.Tensor]) -> None:
    """Refuse params whose elements share memory, within one or across several: an update
    would write such an element more than once, in an order no backend defines."""
    ranges = []
    for i, p in enumerate(params):
        if p.device.type == "meta" or distributed.is_dtensor(p) or p.numel() == 0:
            continue
        if _self_overlapping(p):
            raise ValueError(
                f"param {i} of a group (shape {tuple(p.shape)}, strides {p.stride()}) has elements that "
                "overlap in memory, or may (an expanded view?); step a .clone() of it instead"
            )
        start = p.data_ptr()
        ranges.append((start, start + _extent(p) * p.element_size(), i))
    ranges.sort()
    reaching: list[tuple[int, int]] = []  # (end, index) of the ranges that reach past start
    for start, end, b in ranges:
        # each range is compared with every earlier one it may share memory with (usually
        # none: the params of a model are disjoint)
        reaching = [(e, a) for e, a in reaching if e > start]
        for _, a in reaching:
            pa, pb = params[a], params[b]
            # interleaved strided views may share a range without sharing an element
            both_dense = pa.is_contiguous() and pb.is_contiguous()
            if both_dense or np.intersect1d(_addresses(pa), _addresses(pb)).size:
                raise ValueError(
                    f"params {min(a, b)} and {max(a, b)} of a group overlap in memory; a step would write "
                    "them twice"
                )
        reaching.append((end, b))


def _step_count(step: Any) -> int | None:
    """A saved 'step' as an int (a 1-element real tensor or a number), None if it is none."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_complex():
            return None
        step = float(step)
    if isinstance(step, bool) or not isinstance(step, int | float):
        return None
    if not (math.isfinite(step) and step >= 0 and step == int(step)):
        return None
    return int(step)


def _step_through_contiguous(backend, spec, scalars, params, grads, hvps, state, options) -> None:
    """Step a backend that needs contiguous tensors: non-contiguous ones (channels-last,
    transposed or sliced views, expanded grads) go through contiguous copies, and the
    params' and state's copies are written back."""
    if not tensor_lists.all_contiguous(grads):
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    if hvps is not None and not tensor_lists.all_contiguous(hvps):
        hvps = [h if h.is_contiguous() else h.contiguous() for h in hvps]
    written = [params, *state.values()]
    if all([tensor_lists.all_contiguous(ts) for ts in written]):
        backend.step(spec, scalars, params, grads, hvps, state, **options)
        return
    copies = [[t if t.is_contiguous() else t.contiguous() for t in ts] for ts in written]
    backend.step(spec, scalars, copies[0], grads, hvps, dict(zip(state, copies[1:])), **options)
    for ts, cs in zip(written, copies):
        for t, c in zip(ts, cs):
            if c is not t:
                t.copy_(c)


def _scalar_dtype() -> torch.dtype:
    """The dtype in which torch.optim keeps scalar state ('step', NAdam's 'mu_product')."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _carries_product(spec: Spec) -> bool:
    """torch's NAdam schedule: its correction is the product of the mu_t of the steps taken,
    kept in the state as 'mu_product' (a beta1 changed mid-run changes the later factors)."""
    return spec.momentum != Momentum.NONE and spec.mu_schedule == Schedule.NADAM


class _Bucket:
    """Params of a plan that have taken the same number of steps and carry the same product
    (usually all of them)."""

    __slots__ = ("t", "indices", "carried", "before")

    def __init__(self, t: int, indices: list[int] | None, carried: float | None = None) -> None:
        self.t, self.indices = t, indices
        # a product the rule carries from step to step (NAdam's mu_product), up to step t
        self.carried = carried
        # (t, carried) before the last step, put back if its found_inf turns out set
        self.before = (t, carried)


class _Plan:
    """What one group's step launches: built once while the set of params with gradients
    stays the same, so a step costs one pass over the gradients, not over everything."""

    __slots__ = (
        "spec",
        "params",
        "device",
        "dtype",
        "state",
        "states",
        "steps",
        "buckets",
        "backend",
        "grads",
        "hvps",
        "container",
        "version",
        "scalars",
        "device_scalars",
        "extras",
        "unscale",
        "counters",
    )

    def __init__(
        self, spec: Spec, params: list[torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        self.spec, self.params, self.device, self.dtype = spec, params, device, dtype
        self.state: dict[str, list[torch.Tensor]] | None = None  # created at the first run
        self.states: list[dict[str, Any]] = []
        self.steps: torch.Tensor | None = None
        self.buckets: list[_Bucket] = []
        self.backend: Any = None
        self.grads: list[torch.Tensor] = []
        self.hvps: list[torch.Tensor] | None = None
        self.version = -1  # optimizer.state's change count when the state lists were taken
        self.scalars: dict[int, StepScalars] = {}  # this step's scalars by step number
        # capturable groups: the step's scalars, computed on the device
        self.device_scalars: DeviceScalars | None = None
        # by extra state key, the tensor whose views hold it for every param (or None)
        self.extras: dict[str, torch.Tensor | None] = {}
        # this step's AMP inverse loss scale when the backend writes the unscaled gradients
        # back itself (a float on the host, a device tensor with device hooks), else None
        self.unscale: float | torch.Tensor | None = None
        # the version counters of the packed 'step' and extra tensors after the last step
        # wrote them: the host keeps their values too (bucket.t, bucket.carried), so a change
        # made in place between steps (state["step"].fill_(0)) must rebuild the plan
        self.counters: tuple[int, ...] = ()

    def counter_versions(self) -> tuple[int, ...]:
        """The packed counters' version counters now (an in-place change advances them; a
        replayed CUDA graph's does not, and needs no rebuild: the host does not replay).
        Tensors made under torch.inference_mode() keep no counter: -1, never rebuilt."""
        packed = [self.steps, *self.extras.values()]
        return tuple(-1 if t.is_inference() else t._version for t in packed if t is not None)


class FusedOptimizer(torch.optim.Optimizer):
    """An optimizer for any :class:`~fastopt.spec.Spec`, stepped by a fused backend.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        spec: the update rule (a group may override it with its own ``spec`` key).
        lr: learning rate alpha.
        mu: momentum decay.
        nu: denominator decay.
        eps: the denominator's epsilon.
        weight_decay: L2 or decoupled (per the spec) weight decay coefficient.
        dampening: torch SGD's dampening, for SUM momentum accumulation.
        mu_max, nu_max: caps of the INCREASING schedule (default: mu, nu).
        momentum_decay: psi of the NADAM momentum schedule.
        lr_decay: Adagrad-style lr decay, lr / (1 + (t - 1) lr_decay).
        initial_accumulator_value: start value of a SUM denominator.
        max_grad_norm: if set, gradients are clipped to this global L2 norm first
            (``torch.nn.utils.clip_grad_norm_`` semantics, over all params of the step).
        backend: "auto" (fastest available per device and dtype) or one backend's name.
        state_dtype: dtype of the optimizer state (default: the param's dtype, as torch).
        master_weights: keep fp32 copies of fp16/bf16 params and step those.
        capturable: keep the step count on the device and compute the step's scalars
            there (from a device tensor lr too), so that ``step()`` can be captured in a
            CUDA graph and replayed; Triton and CUDA backends only. A group may set its
            own ``capturable``.

    Example::

        from fastopt import FusedOptimizer, presets
        opt = FusedOptimizer(model.parameters(), spec=presets.spec("adam_linf"), lr=2e-3)
    """

    state_keys: ClassVar[dict[str, str]] = GENERIC_STATE_KEYS
    # torch.amp.GradScaler then hands us grad_scale and found_inf instead of unscaling the
    # gradients itself: unscaling happens inside the fused step, and found_inf skips it
    _step_supports_amp_scaling: ClassVar[bool] = True
    # torch.optim.SGD keeps no 'step' in its state; every other optimizer does
    keeps_step: ClassVar[bool] = True
    # the keyword options that are not hyperparameters, with their defaults
    option_defaults: ClassVar[dict[str, Any]] = _OPTIONS

    def __init__(
        self,
        params: ParamsT,
        spec: Spec | None = None,
        lr: float = 1e-3,
        mu: float = 0.9,
        nu: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        mu_max: float | None = None,
        nu_max: float | None = None,
        momentum_decay: float = 4e-3,
        lr_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        *,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        capturable: bool = False,
    ) -> None:
        if spec is None:
            raise TypeError("FusedOptimizer needs a spec (see fastopt.presets.spec(name))")
        if isinstance(lr, bool) or not isinstance(lr, int | float | torch.Tensor):
            raise TypeError(f"lr must be a number or a 1-element tensor, got {type(lr).__name__}")
        if isinstance(spec, str):  # a key string (what param groups and checkpoints hold)
            spec = Spec.from_key(spec)
        if not isinstance(spec, Spec):
            raise TypeError(f"spec must be a fastopt Spec or its key string, got {type(spec).__name__}")
        defaults = dict(
            spec=spec.key(),
            lr=lr,
            mu=mu,
            nu=nu,
            eps=eps,
            weight_decay=weight_decay,
            dampening=dampening,
            mu_max=mu_max,
            nu_max=nu_max,
            momentum_decay=momentum_decay,
            lr_decay=lr_decay,
            initial_accumulator_value=initial_accumulator_value,
            capturable=capturable,
        )
        self.check_hyper(defaults)
        self._init_options(backend, max_grad_norm, state_dtype, master_weights)
        super().__init__(params, defaults)
        self._track_state()

    # -- options that are not hyperparameters -------------------------------------------
    def _init_options(
        self,
        backend: str,
        max_grad_norm: float | None,
        state_dtype: torch.dtype | None,
        master_weights: bool,
    ) -> None:
        if backend not in _BACKEND_NAMES:
            raise ValueError(f"unknown backend {backend!r}; choose from {_BACKEND_NAMES}")
        if max_grad_norm is not None:
            check(max_grad_norm > 0.0, f"Invalid max_grad_norm value: {max_grad_norm}")
        if state_dtype is not None and state_dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"state_dtype must be a floating-point dtype, got {state_dtype}")
        self.backend = backend
        self.max_grad_norm = max_grad_norm
        self.state_dtype = state_dtype
        self.master_weights = master_weights
        self._plans: dict[int, _Plan] = {}
        # a step whose found_inf stayed on the device: (a host copy of it, event, plans)
        self._skip_pending: tuple | None = None

    def _track_state(self) -> None:
        """``optimizer.state`` as one whose changes (and its params' entries') reach the
        cached plans. Done at construction, so that a handle taken then stays the state."""
        if type(self.state) is not TrackedState:
            self.state = TrackedState(dict, self.state)
            self._plans = {}

    # -- hyperparameter ranges ----------------------------------------------------------
    @staticmethod
    def check_hyper(group: dict[str, Any]) -> None:
        """Raise ValueError naming the first hyperparameter of ``group`` that is out of its
        range. The constructor checks its arguments with it, and every param group is
        checked when it is added and at each step (a user's or a scheduler's edit of a group
        is checked too): an out-of-range value is an error, never a corrupted step."""
        check_lr(group["lr"])
        for key, (low, high) in _RANGES.items():
            value = group.get(key)  # None: the INCREASING schedule's caps default to mu, nu
            if value is not None:
                check(low <= value <= high, f"Invalid {_RANGE_NAMES.get(key, key)} value: {value}")

    def _check_group(self, index: int, group: dict[str, Any], first_step: bool = False) -> None:
        """:meth:`check_hyper` on param group ``index``; with ``first_step``, also that its
        hyperparameters define a first step (mu = 1 under bias correction divides 0 by 0)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
            group = {**group, "lr": 0.0}  # read on the device: a host read would sync
        try:
            self.check_hyper(group)
        except ValueError as exc:
            raise ValueError(f"param group {index}: {exc}") from None
        if first_step:
            _group_scalars(index, self.group_spec(group), self.group_hyper(group), 1, 0.0, None)

    # -- what subclasses translate ------------------------------------------------------
    def group_spec(self, group: dict[str, Any]) -> Spec:
        """The spec that steps this group (a group may hold a Spec or its key string)."""
        spec = group["spec"]
        return spec if isinstance(spec, Spec) else Spec.from_key(spec)

    def group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters under fastopt's generic names."""
        return group

    # -- the product the NAdam schedule carries in the state ----------------------------
    @staticmethod
    def _extra_keys(spec: Spec) -> tuple[str, ...]:
        """State entries beyond the rule's roles and 'step'."""
        return ("mu_product",) if _carries_product(spec) else ()

    def _extra_state(self, spec: Spec, state: dict[str, Any]) -> None:
        if _carries_product(spec) and "mu_product" not in state:
            # in torch's scalar dtype, as torch.optim.NAdam keeps it
            state["mu_product"] = torch.ones((), dtype=_scalar_dtype())

    def _carried(self, group: dict[str, Any], spec: Spec, state: dict[str, Any], t: int) -> float | None:
        """prod_{i <= t} mu_i of a param's ``t`` steps from its 'mu_product', into which
        torch.optim.NAdam multiplies each step's mu_t at that step's beta1 (OneCycleLR's
        cycle_momentum changes it) and with which it steps; None for rules without one.

        Read on the host when a plan takes over the state; the plan carries it on. Where
        the stored product is the current beta1's own to the precision of its dtype (float32
        under torch's default), the float64 value is used: a run resumed from a checkpoint
        then steps as the uninterrupted run did."""
        if not _carries_product(spec):
            return None
        stored = state.get("mu_product")
        if stored is None:
            return 1.0
        value = float(stored)
        exact = nadam_mu_product(t, *nadam_hyper(self.group_hyper(group)))
        info = torch.finfo(stored.dtype) if isinstance(stored, torch.Tensor) else torch.finfo(torch.float64)
        # t roundings of a product of factors below 1; and below the normal range, zero
        if abs(value - exact) <= 2 * (t + 1) * info.eps * exact + info.tiny:
            return exact
        return value

    def _after_step(
        self,
        group: dict[str, Any],
        spec: Spec,
        states: list[dict[str, Any]],
        t: int,
        taken: torch.Tensor | None,
        t_device: torch.Tensor | None,
        carried: float | None,
        packed: dict[str, torch.Tensor | None],
    ) -> float | None:
        """Multiply mu_t into the 'mu_product' of ``states`` after their step number t, and
        return the host's copy of the carried product (``carried``, before the step) after
        it. With a device-side found_inf, ``taken`` is a 0-dim bool device tensor (whether
        the kernels took the step) and the entries live on that device; the host's copy
        assumes the step was taken (it is put back if not). A capturable step gives its step
        number as the device tensor ``t_device`` (the host's t is not replayed). ``packed``:
        by key, the one tensor whose 0-dim views are that entry of every state in ``states``
        (one in-place op updates them all), where the plan packed them."""
        if not _carries_product(spec):
            return carried
        b1, psi = nadam_hyper(self.group_hyper(group))
        mu_t = nadam_mu(t, b1, psi)
        whole = packed.get("mu_product")
        products = [st["mu_product"] for st in states] if whole is None else [whole]
        mu: float | torch.Tensor = mu_t
        if t_device is not None:  # capturable: mu_t from the device's step count
            mu = nadam_mu(t_device.to(products[0].dtype), b1, psi)
        elif taken is not None:
            mu = torch.full((), mu_t, dtype=products[0].dtype, device=taken.device)
        if taken is not None:  # a factor of 1 where found_inf skipped the step
            mu = torch.where(taken, mu, 1.0)
        torch._foreach_mul_(products, mu)
        return None if carried is None else carried * mu_t

    # -- the step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step over every param group.

        With a Hessian-vector curvature (equilibrated SGD) ``closure`` is required and
        must return the loss with its autograd graph intact, without calling backward:
        the optimizer computes the gradient and H u itself (p.grad is overwritten).
        """
        specs = [self.group_spec(g) for g in self.param_groups]
        hvps: dict[torch.Tensor, torch.Tensor] = {}
        if any(s.curvature == Curvature.HVP for s in specs):
            loss, hvps = self._gradient_and_hvp(closure, specs)
        else:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
        self._step_groups(specs, hvps)
        return loss

    @torch.no_grad()
    def step_with_hvps(self, hvps: dict[torch.Tensor, torch.Tensor]) -> None:
        """A step whose HVP-curvature groups use the given H u products (one per param with
        a gradient, each shaped, typed and placed as its param) instead of computing them:
        for curvature estimates made elsewhere. They are used as given: under L2 weight
        decay, ``step()`` adds the decay's own curvature wd u to H u, and so should they."""
        self._step_groups([self.group_spec(g) for g in self.param_groups], hvps)

    # The step hands raw addresses to fused kernels, which torch.compile cannot trace: in a
    # compiled training step it runs as it is, between the compiled graphs around it.
    @torch.compiler.disable
    def _step_groups(self, specs: list[Spec], hvps: dict[torch.Tensor, torch.Tensor]) -> None:
        try:
            self._step_planned(specs, hvps)
        finally:
            # a plan keeps the params and their state, not this step's gradients: once
            # zero_grad(set_to_none=True) drops them their memory is free for the next
            # forward and backward, as with torch.optim
            for plan in self._plans.values():
                plan.grads, plan.hvps = [], None

    def _step_planned(self, specs: list[Spec], hvps: dict[torch.Tensor, torch.Tensor]) -> None:
        self._settle_skipped_step()
        # every group is validated before any tensor of any group is modified
        plans = [self._plan_group(i, g, s, hvps) for i, (g, s) in enumerate(zip(self.param_groups, specs))]
        # the backend choice, the gradient multiplier and the step scalars can fail too: all
        # for every group before any state is created or any group stepped
        ready = [(i, g, p) for i, (g, p) in enumerate(zip(self.param_groups, plans)) if p is not None]
        for i, group, plan in ready:
            if plan.backend is None:
                plan.backend = backends.choose(self.backend, plan.spec, plan.device, plan.dtype)
            if group.get("capturable") and plan.backend.name not in _DEVICE_HOOK_BACKENDS:
                raise ValueError(
                    f"param group {i}: capturable=True needs the triton or cuda backend (params on a "
                    f"CUDA device); this group runs on the {plan.backend.name} backend"
                )
            if self.keeps_step and not group.get("capturable") and backends.capturing(plan.device):
                # its step's scalars are host numbers: a graph would replay this step's bias
                # corrections, schedules and rounding seed forever while 'step' advanced
                raise RuntimeError(
                    f"param group {i}: step() is being captured in a CUDA graph, but the group has "
                    "capturable=False; construct the optimizer with capturable=True"
                )
        hooks = self._device_grad_scale([plan for _, _, plan in ready])
        grad_scale = 1.0
        if hooks is None:
            hooks = {}
            grad_scale = self._grad_scale(plans)
            if grad_scale is None:  # a scaler found inf/nan: skip the whole step
                return
        for i, group, plan in ready:
            self._check_scalars(i, group, plan)
        for i, group, plan in ready:
            if plan.state is None:
                self._materialize(group, plan)
            if group.get("capturable") and len(plan.buckets) > 1:
                raise ValueError(
                    f"param group {i}: capturable=True needs every param of the group at one step "
                    "count and NAdam product (a loaded checkpoint holds several); step them in "
                    "separate groups"
                )
        found_inf = hooks.get("found_inf")
        unscaled_apart = self._choose_unscaling([plan for _, _, plan in ready], hooks.pop("inv_scale", None))
        # device-side counters ('step', NAdam's mu_product) advance only where it is 0
        taken = None if found_inf is None else found_inf.reshape(()) == 0
        for i, group, plan in ready:
            self._run_group(i, group, plan, grad_scale, hooks, taken)
        self._unscale_grads(unscaled_apart, found_inf)
        if found_inf is not None and not backends.capturing(found_inf.device):
            # the kernels skipped the step if found_inf was set; whether they did is read on
            # the host when it is next needed, by then without a wait
            self._await_skip(found_inf, [plan for _, _, plan in ready])
        # creating state above changed optimizer.state: that is no reason to rebuild a
        # plan; a change made between now and the next step is
        version = self.state.version
        for plan in self._plans.values():
            if plan.state is not None:
                plan.version = version
                plan.counters = plan.counter_versions()

    def _check_scalars(self, index: int, group: dict[str, Any], plan: _Plan) -> None:
        self._check_group(index, group)
        # (step number, the product carried into it) of each bucket
        steps: set[tuple[int, float | None]] = set()
        if plan.state is None:  # not yet stepped by this plan: the counts are in the state
            for p in plan.params:
                state = self.state.get(p) or {}
                t = self._steps_from_state(state)
                steps.add((t + 1, self._carried(group, plan.spec, state, t)))
        else:
            steps = {(bucket.t + 1, bucket.carried) for bucket in plan.buckets}
        hyper = self.group_hyper(group)
        plan.scalars = {}
        lr = group["lr"]
        if group.get("capturable") and isinstance(lr, torch.Tensor):
            lr = 1.0  # read on the device (a host read would sync); it is checked >= 0 when set
        for t, carried in steps:
            plan.scalars[t, carried] = _group_scalars(index, plan.spec, hyper, t, float(lr), carried)

    def _plan_group(self, index: int, group: dict[str, Any], spec: Spec, hvps: dict) -> _Plan | None:
        """The group's launch plan with this step's gradients, or None if no param has one.

        The plan (validated params, state lists, step counts) is cached while the set of
        params with gradients stays the same; the gradients are checked every step.
        """
        self._track_state()  # (replaced wholesale by hand?)
        # the usual case, every param with a gradient, in one pass
        grads = tensor_lists.grads(group["params"])
        if grads is not None:
            params = list(group["params"])  # a copy: the plan must not see later edits
        else:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
        if not params:  # (after the above: _step_groups reads self.state.version)
            return None
        plan = self._plans.get(index)
        stale = plan is not None and plan.state is not None
        stale = stale and (plan.version != self.state.version or plan.counters != plan.counter_versions())
        if plan is None or stale or plan.spec != spec or not _same_tensors(plan.params, params):
            plan = self._build_plan(spec, params)
            self._plans[index] = plan
        self._check_grads(plan, grads)
        plan.grads = grads
        plan.hvps = None
        if spec.curvature == Curvature.HVP:
            plan.hvps = [hvps.get(p) for p in params]
            if any(h is None for h in plan.hvps):
                raise RuntimeError("a Hessian-vector product is missing for a param with a gradient")
            self._check_grads(plan, plan.hvps, "Hessian-vector product")  # one given by hand too
        return plan

    def _build_plan(self, spec: Spec, params: list[torch.Tensor]) -> _Plan:
        """Check the params of a group (not their gradients) and their existing state."""
        device, dtype = params[0].device, params[0].dtype
        for p in params:
            if torch.is_complex(p):
                raise RuntimeError(
                    f"fastopt {type(self).__name__} does not support complex parameters; "
                    "step torch.view_as_real(param) instead"
                )
            if p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"fastopt steps floating-point params, got {p.dtype}")
            if p.device != device:
                raise ValueError(
                    f"all params of a param group must be on one device; found {device} and {p.device}"
                )
            if p.dtype != dtype:
                raise ValueError(
                    f"all params of a param group must have one dtype; found {dtype} and {p.dtype} "
                    "(put them in separate param groups)"
                )
            self._check_state(p, spec)
        _check_no_overlap(params)
        return _Plan(spec, params, device, dtype)

    def _check_grads(self, plan: _Plan, grads: list[torch.Tensor], what: str = "gradient") -> None:
        # the usual case in one pass (C++ where fastopt._host is built); the loop below
        # finds what is wrong
        if tensor_lists.all_like(grads, plan.params):
            return
        for p, g in zip(plan.params, grads):
            if (
                g.layout is not torch.strided
                or g.dtype is not p.dtype
                or g.shape != p.shape
                or g.device != p.device
            ):
                if g.is_sparse:
                    raise RuntimeError(f"fastopt {type(self).__name__} does not support sparse {what}s")
                if torch.is_complex(g):
                    raise RuntimeError(f"fastopt {type(self).__name__} does not support complex {what}s")
                raise RuntimeError(
                    f"{what} ({tuple(g.shape)}, {g.dtype}, {g.device}, {g.layout}) does not match its "
                    f"parameter ({tuple(p.shape)}, {p.dtype}, {p.device})"
                )

    def _check_state(self, p: torch.Tensor, spec: Spec) -> None:
        state = self.state.get(p)
        if not state:
            return
        for role in spec.state_roles:
            key = self.state_keys[role]
            value = state.get(key)
            if value is not None and value.shape != p.shape:
                raise ValueError(
                    f"optimizer state {key!r} has shape {tuple(value.shape)} but its param has "
                    f"shape {tuple(p.shape)}"
                )

    def _grad_scale(self, plans: list[_Plan | None]) -> float | None:
        """The gradient multiplier of this step: AMP unscaling times norm clipping.

        None when a GradScaler reported inf/nan gradients (the step is skipped, nothing is
        modified).
        """
        scale = 1.0
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return None
        amp_scale = getattr(self, "grad_scale", None)
        if amp_scale is not None:
            scale = 1.0 / float(amp_scale)
        if self.max_grad_norm is not None:
            grads = [g for plan in plans if plan is not None for g in plan.grads]
            if grads:
                # DTensor grads count as the full tensors they shard (one all-reduce per mesh)
                total = distributed.grad_norm(grads) * scale
                # clip_grad_norm_: coefficient max_norm / (norm + 1e-6), clamped to 1
                coef = self.max_grad_norm / (total + 1e-6)
                if math.isfinite(total) and coef < 1.0:
                    scale *= coef
                elif not math.isfinite(total):
                    scale *= coef  # nan/inf norm: clip_grad_norm_ multiplies by nan/0 too
        return scale

    def _device_grad_scale(self, plans: list[_Plan]) -> dict[str, torch.Tensor | None] | None:
        """The device-tensor hooks of a step without host synchronization, or None where the
        host path (:meth:`_grad_scale`) is taken.

        Taken when every group runs on one device through a backend that reads the
        gradient multiplier and ``found_inf`` from device tensors, and there is something
        to hook (a GradScaler's scale or found_inf, or ``max_grad_norm``). The multiplier
        is the inverse loss scale times ``clip_grad_norm_``'s clamped coefficient, computed
        with a few device operations from a one-launch global norm.
        """
        found_inf = getattr(self, "found_inf", None)
        amp_scale = getattr(self, "grad_scale", None)
        if not plans or (found_inf is None and amp_scale is None and self.max_grad_norm is None):
            return None
        device = plans[0].device
        for plan in plans:
            if plan.backend.name not in _DEVICE_HOOK_BACKENDS or plan.device != device:
                return None
            if distributed.is_dtensor(plan.params[0]):  # the norm needs the mesh's all-reduce
                return None
        for lent in (found_inf, amp_scale):
            if lent is not None and not (isinstance(lent, torch.Tensor) and lent.device == device):
                return None
        inv_scale = None if amp_scale is None else torch.reciprocal(amp_scale.float().reshape(1))
        multiplier = inv_scale
        if self.max_grad_norm is not None:
            norm = plans[0].backend.global_grad_norm([g for plan in plans for g in plan.grads])
            if inv_scale is not None:
                norm = norm * inv_scale
            # clip_grad_norm_: max_norm / (norm + 1e-6) clamped to 1; a nan/inf norm gives
            # nan/0, which clip_grad_norm_ multiplies the gradients by too
            coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            multiplier = coef if inv_scale is None else coef * inv_scale
        return {"grad_scale_ptr": multiplier, "found_inf": found_inf, "inv_scale": inv_scale}

    def _choose_unscaling(self, plans: list[_Plan], inv_scale: torch.Tensor | None) -> list[_Plan]:
        """Under a GradScaler's scale, have each backend that can write the unscaled gradients
        back in the step itself do so, as torch's fused kernels do (one pass over memory, not
        two): the cpp backend on the host path, triton and cuda with device hooks
        (``inv_scale``: the scale's inverse on the device). Returns the plans whose gradients
        :meth:`_unscale_grads` unscales after the step instead.

        A step that writes gradients while other programs of it read them needs gradients
        that share no memory (two params given one gradient tensor would read it unscaled
        once and twice): if any do, or any is not contiguous, no step writes them.
        """
        for plan in plans:
            plan.unscale = None
        amp_scale = getattr(self, "grad_scale", None)
        if amp_scale is None:
            return []
        if any(distributed.is_dtensor(plan.params[0]) for plan in plans):
            return plans  # (shards: their addresses are the local tensors', per rank)
        hooked = inv_scale is not None
        fusing = [
            plan
            for plan in plans
            if (plan.backend.name in _DEVICE_HOOK_BACKENDS) == hooked
            and (hooked or plan.backend.name == "cpp")
        ]
        if not fusing:
            return plans
        read = [plan.grads for plan in plans] + [plan.hvps for plan in plans if plan.hvps is not None]
        if not all(tensor_lists.all_contiguous(ts) for ts in read) or not tensor_lists.disjoint(read):
            return plans
        value = inv_scale if hooked else 1.0 / float(amp_scale)
        for plan in fusing:
            plan.unscale = value
        return [plan for plan in plans if plan.unscale is None]

    def _unscale_grads(self, plans: list[_Plan], found_inf: torch.Tensor | None) -> None:
        """Leave the gradients unscaled after a step a GradScaler handed its scale to, as
        torch's fused optimizers do (and as ``scaler.unscale_`` would have): code that reads
        ``p.grad`` after ``scaler.step(opt)`` sees the true gradient. A skipped step (inf
        or nan found) leaves them as they are. Clipping by ``max_grad_norm`` is applied
        inside the step only. Here for the plans whose step did not write them back (see
        :meth:`_choose_unscaling`)."""
        amp_scale = getattr(self, "grad_scale", None)
        if amp_scale is None:
            return
        grads = [g for plan in plans for g in plan.grads]
        if not grads:
            return
        if found_inf is None:  # the host path: a found inf skipped the step before this
            torch._foreach_mul_(grads, 1.0 / float(amp_scale))
            return
        inv_scale = torch.reciprocal(amp_scale.float().reshape(()))
        factor = torch.where(found_inf.reshape(()) != 0, torch.ones_like(inv_scale), inv_scale)
        torch._foreach_mul_(grads, factor)  # one device (the hooks' condition); any dtypes

    def _await_skip(self, found_inf: torch.Tensor, stepped: list[_Plan]) -> None:
        """Remember a step that the kernels may have skipped: the plans' host step counts
        were advanced as if it was taken and are put back by :meth:`_settle_skipped_step` if
        it was not (the state's own 'step' tensors, on the device, are exact already)."""
        if found_inf.device.type == "cuda":
            # one pinned buffer and event, reused: the previous step's were settled first
            host, event = getattr(self, "_skip_buffers", (None, None))
            if host is None or host.shape != found_inf.shape or host.dtype != found_inf.dtype:
                host = torch.empty(found_inf.shape, dtype=found_inf.dtype, pin_memory=True)
                event = torch.cuda.Event()
                self._skip_buffers = (host, event)
            host.copy_(found_inf, non_blocking=True)
            event.record(torch.cuda.current_stream(found_inf.device))  # where the copy was queued
        else:
            host, event = found_inf.clone(), None
        self._skip_pending = (host, event, stepped)

    def _settle_skipped_step(self) -> None:
        """Put back the host step counts of the last step if its found_inf was set (the wait,
        if any, is for a step issued before everything queued since)."""
        pending = getattr(self, "_skip_pending", None)
        if pending is None or (pending[1] is not None and torch.cuda.is_current_stream_capturing()):
            return  # (waiting on an event is not allowed while a CUDA graph is captured)
        self._skip_pending = None
        host, event, stepped = pending
        if event is not None:
            event.synchronize()
        if float(host.sum()) != 0.0:
            for plan in stepped:
                for bucket in plan.buckets:
                    bucket.t, bucket.carried = bucket.before

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, after settling whether the last step was skipped."""
        self._settle_skipped_step()
        saved = super().state_dict()
        # each param's state as the plain dict torch.optim gives (same tensors)
        saved["state"] = {k: dict(v) if isinstance(v, ParamState) else v for k, v in saved["state"].items()}
        for group in saved["param_groups"]:  # (torch's copies) a group's Spec as its key string:
            if isinstance(group.get("spec"), Spec):  # a checkpoint loads with weights_only
                group["spec"] = group["spec"].key()
        return saved

    def __getstate__(self) -> dict[str, Any]:
        """torch.optim's pickled state (defaults, state, param groups) with the options that
        are not hyperparameters: a deep copy, or an optimizer saved whole, steps on."""
        self._settle_skipped_step()
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in _OPTIONS})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # also how torch's load_state_dict installs the loaded state and groups
        super().__setstate__(state)
        for name, default in _OPTIONS.items():
            if not hasattr(self, name):
                setattr(self, name, default)
        self._track_state()
        self._plans = {}
        self._skip_pending = None

    def _run_group(
        self,
        index: int,
        group: dict[str, Any],
        plan: _Plan,
        grad_scale: float,
        hooks: dict[str, torch.Tensor | None],
        taken: torch.Tensor | None,
    ) -> None:
        if plan.state is None:
            self._materialize(group, plan)
        spec = plan.spec
        hooked = plan.backend.name in _DEVICE_HOOK_BACKENDS
        capturable = bool(group.get("capturable")) and hooked and plan.steps is not None
        for bucket in plan.buckets:
            scalars = plan.scalars.get((bucket.t + 1, bucket.carried))  # by _check_scalars
            if scalars is None:
                hyper = self.group_hyper(group)
                scalars = step_scalars(
                    spec, hyper, bucket.t + 1, lr=float(group["lr"]), mu_product=bucket.carried
                )
            if grad_scale != 1.0:
                scalars = scalars._replace(grad_scale=grad_scale)
            idx = bucket.indices
            if idx is None:  # the usual case: every param of the group at the same step
                grads, hvps, state, states = plan.grads, plan.hvps, plan.state, plan.states
                params = plan.params
            else:
                params = [plan.params[i] for i in idx]
                grads = [plan.grads[i] for i in idx]
                hvps = None if plan.hvps is None else [plan.hvps[i] for i in idx]
                state = {role: [ts[i] for i in idx] for role, ts in plan.state.items()}
                states = [plan.states[i] for i in idx]
            options: dict[str, Any] = {}
            t_device = None
            if capturable:
                # the step count advances on the device first; the scalars are computed
                # there from it, the rounding seed too (a replayed graph reads them anew)
                device_scalars = self._device_scalars(index, group, plan)
                plan.steps.add_(1.0)
                t_device = plan.steps[0]
                options = dict(hooks, scalars_tensor=device_scalars.compute(t_device, group["lr"]))
                if grad_scale != 1.0:  # the host path's multiplier (DTensor clipping)
                    options["grad_scale_ptr"] = torch.full((1,), grad_scale, device=plan.device)
            else:  # the seed makes a resumed run round bf16 state as the original did
                options = dict(hooks if hooked else {}, seed=rounding_seed(bucket.t + 1, index))
            if plan.unscale is not None:
                options["unscale_grads"] = plan.unscale
            self._launch(plan.backend, spec, scalars, params, grads, hvps, state, options)
            bucket.before = (bucket.t, bucket.carried)
            bucket.t += 1
            packed = plan.extras if idx is None else {}  # a bucket holds some of the views
            bucket.carried = self._after_step(
                group, spec, states, bucket.t, taken, t_device, bucket.carried, packed
            )
        if capturable:
            if taken is not None:
                plan.steps.sub_(taken.logical_not().to(plan.steps.dtype))
        elif plan.steps is not None:  # every param's 'step' is a view of this one buffer
            plan.steps.add_(1.0 if taken is None else taken)

    def _device_scalars(self, index: int, group: dict[str, Any], plan: _Plan) -> DeviceScalars:
        """The capturable group's device-side scalars. Made once, from the device's step count
        and the state's carried product (both read on the host: the host's count may lag
        after replays); hyperparameters changed since (a scheduler's ``cycle_momentum``
        changes beta1 before every step) are handed over in place, without a host read."""
        hyper = {k: v for k, v in self.group_hyper(group).items() if k != "lr"}  # lr: per step
        made = plan.device_scalars
        if made is None:
            start = int(float(plan.steps[0])) if plan.steps is not None else plan.buckets[0].t
            # a carried product (NAdam's) continues from the state's, on the device
            product = self._carried(group, plan.spec, plan.states[0], start) if plan.states else None
            made = plan.device_scalars = DeviceScalars(
                plan.spec, hyper, plan.device, index, start, product=product
            )
        elif made.hyper != hyper:
            made.set_hyper(hyper)
        return made

    def _launch(
        self,
        backend: Any,
        spec: Spec,
        scalars: StepScalars,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        hvps: list[torch.Tensor] | None,
        state: dict[str, list[torch.Tensor]],
        options: dict[str, Any],
    ) -> None:
        """Hand one (device, dtype, step) bucket to its backend (``options``: the keyword
        arguments of a device-hook backend's step)."""
        # backends see plain tensors only: DTensors (FSDP2, TP) are stepped shard by shard
        params, grads, hvps, state = distributed.local_tensors(params, grads, hvps, state)
        if getattr(backend, "accepts_strided", False):
            backend.step(spec, scalars, params, grads, hvps, state, **options)
        else:
            _step_through_contiguous(backend, spec, scalars, params, grads, hvps, state, options)

    def _materialize(self, group: dict[str, Any], plan: _Plan) -> None:
        """Create missing state, pack the step counters, bucket params by step count."""
        spec = plan.spec
        hyper = self.group_hyper(group)
        # torch keeps no state at all for a stateless rule (plain SGD): neither do we
        stateless = not (self.keeps_step or spec.state_roles or self.master_weights)
        states, counts = [], []
        for p in plan.params:
            state = {} if stateless else self.state[p]
            counts.append(self._steps_from_state(state))  # before any state is created
            self._init_param_state(group, spec, p, state, hyper)
            states.append(state)
        # a backend with device hooks may skip a step on the device (found_inf): its
        # counters live there, like torch's fused optimizers' 'step'
        scalar_device = plan.device if plan.backend.name in _DEVICE_HOOK_BACKENDS else torch.device("cpu")
        if self.keeps_step:
            # one buffer, each param's 'step' a 0-dim view of it: a step adds 1 once
            # float32 on the device, as torch's fused optimizers keep it; on the CPU torch's
            # scalar dtype (float64 under a float64 default: exact counts past 2^24)
            dtype = torch.float32 if scalar_device.type != "cpu" else _scalar_dtype()
            plan.steps = torch.tensor(counts, dtype=dtype, device=scalar_device)
            for i, state in enumerate(states):
                state["step"] = plan.steps[i]
        plan.extras = {key: self._pack_extra(key, states, scalar_device) for key in self._extra_keys(spec)}
        roles = list(spec.state_roles)
        if self.master_weights and plan.dtype in (torch.float16, torch.bfloat16):
            roles.append("master")
        plan.state = {role: [st[self._state_key(role)] for st in states] for role in roles}
        plan.states = states
        # params step together where they share a step count and a carried product (two
        # params at one count may have multiplied their NAdam products at other beta1s)
        by_count: dict[tuple[int, float | None], list[int]] = defaultdict(list)
        for i, (t, state) in enumerate(zip(counts, states)):
            by_count[t, self._carried(group, spec, state, t)].append(i)
        if len(by_count) == 1:
            ((t, carried),) = by_count
            plan.buckets = [_Bucket(t, None, carried)]
        else:
            plan.buckets = [
                _Bucket(t, idx, carried)
                for (t, carried), idx in sorted(by_count.items(), key=lambda item: item[1][0])
            ]
        if plan.backend is None:
            plan.backend = backends.choose(self.backend, spec, plan.device, plan.dtype)

    @staticmethod
    def _pack_extra(key: str, states: list[dict[str, Any]], device: torch.device) -> torch.Tensor | None:
        """Entry ``key`` of every state as 0-dim views of one tensor on ``device`` (one op per
        step updates them all, not one per param), or None where they are not all 0-dim
        tensors of one dtype (each is then only moved to ``device``)."""
        values = [state.get(key) for state in states]
        if all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in values):
            if len({v.dtype for v in values}) == 1:
                packed = torch.stack(values).to(device)
                for state, view in zip(states, packed.unbind(0)):
                    state[key] = view
                return packed
        for state, value in zip(states, values):
            if isinstance(value, torch.Tensor) and value.device != device:
                state[key] = value.to(device)
        return None

    def _init_param_state(
        self, group: dict[str, Any], spec: Spec, p: torch.Tensor, state: dict[str, Any], hyper: dict
    ) -> None:
        """Create the param's missing state entries."""
        distributed.adopt_state(p, state)  # a loaded unsharded state of a DTensor param
        if self.keeps_step and "step" not in state:
            state["step"] = torch.zeros((), dtype=_scalar_dtype())
        dtype = self.state_dtype or p.dtype
        for role in spec.state_roles:
            key = self.state_keys[role]
            if state.get(key) is None:
                fill = 0.0
                if role == "v" and spec.denominator == Denominator.SUM:
                    fill = float(hyper.get("initial_accumulator_value", 0.0))
                state[key] = torch.full_like(p, fill, dtype=dtype, memory_format=torch.preserve_format)
        if self.master_weights and p.dtype in (torch.float16, torch.bfloat16):
            key = self._state_key("master")
            if key not in state:
                state[key] = p.detach().float()
        self._extra_state(spec, state)

    def _state_key(self, role: str) -> str:
        """The state key of a role (a preset names only the roles torch has)."""
        return self.state_keys.get(role) or GENERIC_STATE_KEYS[role]

    def _steps_from_state(self, state: dict[str, Any]) -> int:
        if self.keeps_step:
            return int(float(state["step"])) if "step" in state else 0  # a tensor, or a number
        # torch SGD: only whether the momentum buffer exists matters
        return 1 if state.get(self.state_keys["m"]) is not None else 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._settle_skipped_step()
        params = param_group["params"]
        if not isinstance(params, torch.Tensor | set):  # torch refuses sets itself
            param_group["params"] = params = list(params)  # a generator is read once
            if len({id(p) for p in params}) != len(params):
                # torch only warns; a fused step would update such a param twice
                raise ValueError("a param group holds the same parameter more than once")
        # checked before torch adds it: a refused group leaves the optimizer as it was
        self._check_group(len(self.param_groups), {**self.defaults, **param_group}, first_step=True)
        super().add_param_group(param_group)
        self._plans = {}

    def _gradient_and_hvp(self, closure, specs) -> tuple[Any, dict]:
        if closure is None:
            raise RuntimeError(
                "curvature=HVP (equilibrated SGD) needs a closure that returns the loss: "
                "optimizer.step(lambda: loss_fn(model(x), y))"
            )
        with torch.enable_grad():
            loss = closure()
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise RuntimeError("the closure must return the loss tensor with its autograd graph")
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            curv = {
                p
                for g, s in zip(self.param_groups, specs)
                if s.curvature == Curvature.HVP
                for p in g["params"]
            }
            # u ~ N(0, I) over every param with a gradient, not only the HVP groups': the
            # estimate of diag(H^2) is E[(H u)^2] with H the whole Hessian (the coupling of an
            # HVP group's params to the others counts, whatever the grouping)
            pairs = [(p, gr) for p, gr in zip(params, grads) if gr is not None]
            us = [torch.randn_like(p) for p, _ in pairs]
            # a gradient without a graph (the loss is linear in that param) has H u = 0
            live = [i for i, (_, gr) in enumerate(pairs) if gr.requires_grad]
            hv: list[torch.Tensor | None] = [None] * len(pairs)
            if live:
                found = torch.autograd.grad(
                    [pairs[i][1] for i in live], [pairs[i][0] for i in live], grad_outputs=[us[i] for i in live],
                    allow_unused=True,
                )  # fmt: skip
                for i, h in zip(live, found):
                    hv[i] = h
        for p, gr in zip(params, grads):
            p.grad = None if gr is None else gr.detach()
        hvps = {
            p: (torch.zeros_like(p) if h is None else h.detach()) for (p, _), h in zip(pairs, hv) if p in curv
        }
        # L2 decay adds wd/2 |p|^2 to the objective whose gradient the rule follows: its
        # Hessian wd I adds wd u (as the gradient gets wd p), so that weight_decay=wd steps as
        # that term in the loss would
        u_of = {p: u for (p, _), u in zip(pairs, us)}
        for group, spec in zip(self.param_groups, specs):
            wd = float(self.group_hyper(group).get("weight_decay", 0.0))
            if spec.curvature == Curvature.HVP and spec.weight_decay == WeightDecay.L2 and wd != 0.0:
                # maximize: the objective is -f + wd/2 |p|^2; only |h| is used, so -h will do
                alpha = -wd if spec.maximize else wd
                for p in group["params"]:
                    if p in hvps:
                        hvps[p].add_(u_of[p], alpha=alpha)
        return loss.detach(), hvps

    # -- checkpoints --------------------------------------------------------------------
    def _saved_group_spec(self, index: int, saved: dict[str, Any]) -> Spec:
        try:
            return self.group_spec({**self.defaults, **saved})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"param group {index} of the state_dict is not one of {type(self).__name__}'s ({exc})"
            ) from exc

    def _check_saved_state(self, key: Any, value: Any, spec: Spec) -> None:
        """A saved param state must hold exactly what this optimizer keeps for its spec."""
        if not isinstance(value, dict):
            raise ValueError(f"state of param {key} is a {type(value).__name__}, not a dict")
        master = self._state_key("master")
        known = {"step", master, *self.state_keys.values(), *self._extra_keys(spec)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"state of param {key} holds {unknown}, which {type(self).__name__} does not keep: "
                "a checkpoint of another optimizer?"
            )
        for name, tensor in value.items():
            if name == "step":
                if _step_count(tensor) is None:
                    raise ValueError(f"state 'step' of param {key} is {tensor!r}, not a step count")
            elif tensor is not None and not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
                what = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"state {name!r} of param {key} is {what}, not a floating-point tensor")
        # a param stepped before must come with all of the rule's state: restarting one
        # accumulator at zero mid-training would silently change the trajectory
        if (_step_count(value.get("step")) or 0) > 0 or set(value) - {"step", master}:
            missing = [self._state_key(r) for r in spec.state_roles if self._state_key(r) not in value]
            if missing:
                raise ValueError(f"state of param {key} lacks {missing}: a checkpoint of another rule?")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's loader, after checking state shapes (nothing changes on error).

        As in torch, load_state_dict pre-hooks see (and may replace) the state_dict first,
        and post-hooks run when it is loaded."""
        self._settle_skipped_step()
        state_dict = state_dict.copy()  # (torch's shallow copy: a hook may edit it)
        pre_hooks, post_hooks = (
            self._optimizer_load_state_dict_pre_hooks,
            self._optimizer_load_state_dict_post_hooks,
        )
        for hook in pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        # torch's loader below must not run the hooks a second time
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        try:
            self._load_checked(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        for hook in post_hooks.values():
            hook(self)

    def _load_checked(self, state_dict: dict[str, Any]) -> None:
        groups = self.param_groups
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or "state" not in state_dict:
            raise ValueError("not an optimizer state_dict: it needs 'state' and 'param_groups'")
        if len(saved_groups) != len(groups):
            raise ValueError(
                f"the state_dict has {len(saved_groups)} param groups, the optimizer {len(groups)}"
            )
        index = {}
        for group, saved in zip(groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError("a param group of the state_dict differs in size from the optimizer's")
            index.update(zip(saved["params"], group["params"]))
        for key, value in state_dict["state"].items():
            p = index.get(key)
            if p is None:
                raise ValueError(f"state_dict state refers to unknown param index {key!r}")
            for name, tensor in value.items():
                if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and tensor.shape != p.shape:
                    raise ValueError(
                        f"state {name!r} of param {key} has shape {tuple(tensor.shape)}, "
                        f"the param {tuple(p.shape)}"
                    )
        specs = [self._saved_group_spec(i, saved) for i, saved in enumerate(saved_groups)]
        spec_of = {pid: spec for saved, spec in zip(saved_groups, specs) for pid in saved["params"]}
        for key, value in state_dict["state"].items():
            self._check_saved_state(key, value, spec_of[key])
        super().load_state_dict(state_dict)
        # torch casts floating state to the param's dtype: put back fp32 master weights and
        # the state dtype this optimizer was asked for, from the saved tensors themselves
        master = self._state_key("master")
        for key, value in state_dict["state"].items():
            p = index[key]
            for name, tensor in value.items():
                if name == "step" or not isinstance(tensor, torch.Tensor):
                    continue
                if name in self._extra_keys(spec_of[key]):  # mu_product: kept as it was saved
                    dtype = tensor.dtype
                elif name == master:
                    dtype = torch.float32
                else:
                    dtype = self.state_dtype
                if dtype is not None and p.is_floating_point() and self.state[p][name].dtype != dtype:
                    self.state[p][name] = tensor.to(device=self.state[p][name].device, dtype=dtype)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._plans = {}
