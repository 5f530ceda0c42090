"""Step scalars computed on the device, for capturable steps.

A capturable step (torch.optim's ``capturable=True``; a step that can be recorded in a CUDA
graph and replayed) keeps the step count, and possibly lr, in device tensors. The host then
cannot compute :func:`fastopt.scalars.step_scalars` without reading them back, which would
synchronize and break capture. :class:`DeviceScalars` evaluates the same formulas
(:func:`fastopt.scalars.scalars_for`) with t a 0-dim float64 device tensor, so every value
that depends on the step is a tensor op, and writes them into a fixed float64 tensor laid out
as ``triton_kernels.SCALAR_FIELDS`` (the :class:`StepScalars` fields, then the rounding
seed), which the kernels read through their ``scalars_tensor`` argument.

What is its own here: NAdam's momentum product, carried on the device from step to step (the
host recomputes it from a cache keyed by t), and the writes into the fixed tensor. The two
agree to the last few ulps (libm's and torch's pow/log2 may round differently).
"""

from __future__ import annotations

from typing import Any

import torch

from .scalars import StepScalars, Value, nadam_hyper, nadam_mu_product, rounding_seed, scalars_for
from .spec import Momentum, Schedule, Spec

# Layout of the scalars tensor; the same tuple as ``triton_kernels.SCALAR_FIELDS``, defined
# here too so that this module does not import Triton.
SCALAR_FIELDS = (*StepScalars._fields, "seed")


class DeviceScalars:
    """Step scalars computed on the device from a device step count (capturable steps).

    ``compute(t, lr)`` writes the scalars of step ``t`` into :attr:`out` (the same tensor at
    every call, so a captured graph keeps reading the current values) without any host
    synchronization. Values equal ``step_scalars(spec, hyper, t, lr)`` with ``grad_scale``
    1 (the AMP inverse scale travels separately) and ``use_denominator`` as 1.0 / 0.0; the
    last entry is ``rounding_seed(t, salt)``.

    Host-float hyperparameters, and a host-float ``lr``, are baked into a captured graph as
    constants; pass ``lr`` as a device tensor to change it between replays.
    """

    def __init__(
        self,
        spec: Spec,
        hyper: dict[str, Any],
        device: torch.device | str,
        salt: int = 0,
        start: int = 0,
        product: float | None = None,
    ) -> None:
        """``hyper``: the param group's hyperparameters under fastopt's generic names (mu, nu,
        eps, weight_decay, dampening, mu_max, nu_max, momentum_decay, lr_decay), host floats;
        ``lr`` is given to :meth:`compute`. ``salt``: the rounding seed's salt (the param
        group's index). ``start``: the number of steps already taken (a run resumed from a
        checkpoint at step ``start``); state carried from step to step starts at its value
        there. ``product``: NAdam's prod_{i <= start} mu_i as carried so far; by default the
        product of the schedule at the current beta1."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.spec = spec
        self.hyper = dict(hyper)
        self.device = torch.device(device)
        self.salt = int(salt)
        self.out = torch.zeros(len(SCALAR_FIELDS), dtype=torch.float64, device=self.device)
        self._nadam_prod: torch.Tensor | None = None
        # the product before the last factor, and whether that factor is ours to take anew
        # (not at ``start``: the given product's last factor is not known)
        self._nadam_before: torch.Tensor | None = None
        self._nadam_retake: torch.Tensor | None = None
        self._nadam_last_t: torch.Tensor | None = None
        if spec.momentum != Momentum.NONE and spec.mu_schedule == Schedule.NADAM:
            # prod_{i <= start} mu_i and the step it belongs to: copied to the device once,
            # here, and advanced on the device from then on
            if product is None:
                product = nadam_mu_product(start, *nadam_hyper(self.hyper)) if start > 0 else 1.0
            self._nadam_prod = torch.tensor(float(product), dtype=torch.float64, device=self.device)
            self._nadam_before = self._nadam_prod.clone()
            self._nadam_retake = torch.zeros((), dtype=torch.bool, device=self.device)
            self._nadam_last_t = torch.tensor(float(start), dtype=torch.float64, device=self.device)

    def set_hyper(self, hyper: dict[str, Any]) -> None:
        """Compute with ``hyper`` from the next :meth:`compute` on. State carried on the
        device (NAdam's product) continues: the next step's factor is taken at the new
        hyperparameters, as torch.optim.NAdam multiplies each step's mu_t, at that step's
        beta1, into its product."""
        self.hyper = dict(hyper)

    def compute(self, t: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
        """Write the scalars of step ``t`` into :attr:`out` and return it.

        ``t``: a 0-dim or 1-element float32/float64 device tensor holding the number of the
        step being taken (>= 1, already incremented). Where the spec carries state from step
        to step (NAdam's momentum product) it must equal the previous call's ``t`` (a step
        skipped by a GradScaler's found_inf, tried again: its factor is taken anew) or that plus 1,
        the first call's previous ``t`` being ``start``; a larger jump would leave factors
        out of the product, and cannot be seen without synchronizing.
        ``lr``: the param group's lr, a host float or a 0-dim device tensor.
        """
        t = t.reshape(()).to(dtype=torch.float64)
        base_lr = lr.reshape(()).to(dtype=torch.float64) if isinstance(lr, torch.Tensor) else float(lr)
        values = scalars_for(self.spec, self.hyper, t, base_lr, self._advance_nadam_product)
        seed = rounding_seed(torch.round(t).to(torch.int64), self.salt)
        for slot, value in zip(self.out, (*values, seed)):
            if isinstance(value, torch.Tensor):
                slot.copy_(value)
            else:  # a host constant: fill_ passes it as a kernel argument, no host-to-device copy
                slot.fill_(float(value))
        return self.out

    def _advance_nadam_product(self, t: torch.Tensor, mu_t: Value) -> torch.Tensor:
        """prod_{i <= t} mu_i: mu_t multiplied in when t is a new step; when t repeats (the
        last step was skipped and is taken again) the last factor is taken anew, since beta1
        may have changed between the tries (torch never multiplies a skipped step's mu_t
        in). The same order of operations as the host's nadam_mu_product."""
        prod, before, retake = self._nadam_prod, self._nadam_before, self._nadam_retake
        assert prod is not None and before is not None and retake is not None
        assert self._nadam_last_t is not None
        advance = t > self._nadam_last_t
        before.copy_(torch.where(advance, prod, before))
        retake.logical_or_(advance)
        prod.copy_(torch.where(retake, before * mu_t, prod))
        self._nadam_last_t.copy_(torch.where(advance, t, self._nadam_last_t))
        return prod
