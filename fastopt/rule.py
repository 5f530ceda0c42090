"""The per-element update rule, written once for the Python-driven backends.

:func:`update` is plain Python over an array-like type: it uses only ``+ - *``, unary
minus and the helpers :func:`sqrt`, :func:`divide`, :func:`maximum` and :func:`absolute`,
which it looks up as module globals. It runs as it is on torch tensors. The torch backend traces it
with symbolic values into a program of in-place ``torch._foreach_*`` ops
(:mod:`fastopt.backends.foreach_program`); the Triton backend compiles the very same source
with those helpers bound to Triton's, so the rule exists once for both. The C++ backends share ``csrc/update_math.h``, which mirrors this function line
for line. Upper-case arguments are the spec's switches (compile-time constants for Triton
and C++); the rest are tensors or :class:`~fastopt.scalars.StepScalars` fields.

Integer codes of the switches are the enum values of :mod:`fastopt.spec`.
"""

from __future__ import annotations

import inspect
import math


def sqrt(x):
    return math.sqrt(x) if isinstance(x, float | int) else x.sqrt()


def divide(a, b):
    # a helper, not ``/``: Triton's fp32 ``/`` is an approximate division (within 2 ulp),
    # where torch, NumPy and nvcc round the quotient correctly; the Triton kernels bind this
    # to a correctly rounded one
    return a / b


def maximum(a, b):
    return a.maximum(b)


def absolute(x):
    return x.abs()


def update(
    p, g, h, m, v, vmax, gavg, u,
    lr, weight_decay, decay_factor, grad_scale,
    m_decay, m_weight, m_out, g_out,
    v_decay, v_weight, v_scale, eps,
    MOMENTUM, MOMENTUM_INPUT, DENOMINATOR, NORM, EPS_INSIDE, CENTERED, AMSGRAD,
    HVP, ADADELTA, USE_DENOMINATOR, HAS_L2, DECOUPLED, MAXIMIZE, SCALE_GRAD,
):  # fmt: skip
    """One step for one element (or one list of tensors). Returns p, m, v, vmax, gavg, u.

    Inputs that a spec does not use (m without momentum, h without HVP curvature, ...) are
    passed through untouched and may be any placeholder.
    """
    if SCALE_GRAD:
        g = g * grad_scale
    if MAXIMIZE:
        g = -g
    if HAS_L2:
        g = g + p * weight_decay
    if DECOUPLED:
        p = p * decay_factor
    # curvature source of the denominator: the gradient or a Hessian-vector product
    if HVP:
        c = h
    else:
        c = g

    # adaptive denominator -> precond = 1 / vbar (times Adadelta's numerator)
    precond = g  # placeholder, overwritten whenever it is used
    if DENOMINATOR != 0:
        if NORM == 3:
            a = absolute(c)
            if EPS_INSIDE:
                a = a + eps
            v = maximum(v * v_decay, a)
        else:
            # the weight first, as torch's addcmul: (w c) c is finite up to |c| ~ sqrt(max / w)
            if NORM == 2:
                a = c * v_weight * c
            else:
                a = absolute(c) * v_weight
            v = v * v_decay + a
        if CENTERED:
            gavg = gavg * v_decay + c * v_weight
        if AMSGRAD:
            vmax = maximum(vmax, v)
            w = vmax
        else:
            w = v
        x = w * v_scale
        if CENTERED:
            mean = gavg * v_scale
            x = x - mean * mean
        if NORM == 2:
            if EPS_INSIDE:
                root = sqrt(x + eps)
            elif CENTERED:
                root = sqrt(x) + eps
            else:
                # the root before the bias correction's scale, as torch's Adam: v * v_scale
                # overflows fp32 for gradients sqrt(v_scale) times smaller
                root = sqrt(w) * sqrt(v_scale) + eps
        elif NORM == 3:
            if EPS_INSIDE:
                root = x
            else:
                root = x + eps
        else:
            root = x + eps
        if ADADELTA:
            precond = divide(sqrt(u * v_scale + eps), root)
        else:
            precond = divide(1.0, root)

    # momentum, then the step
    if DENOMINATOR != 0 and USE_DENOMINATOR:
        s = g * precond
    else:
        s = g
    if MOMENTUM != 0:
        if MOMENTUM_INPUT == 0:
            x_in = g
        elif MOMENTUM_INPUT == 2:
            x_in = s
        else:
            x_in = s * lr
        m = m * m_decay + x_in * m_weight
        if MOMENTUM == 2:
            mbar = m * m_out + x_in * g_out
        else:
            mbar = m * m_out
        if MOMENTUM_INPUT == 0:
            if DENOMINATOR != 0 and USE_DENOMINATOR:
                step = mbar * precond * lr
            else:
                step = mbar * lr
        elif MOMENTUM_INPUT == 2:
            step = mbar * lr
        else:
            step = mbar
    else:
        step = s * lr
    if ADADELTA:
        u = u * v_decay + s * v_weight * s
    p = p - step
    return p, m, v, vmax, gavg, u


# update()'s switches, in order: its upper-case arguments
SWITCHES = tuple(n for n in inspect.signature(update).parameters if n.isupper())


def switches(spec, scalars) -> dict[str, int]:
    """The compile-time switches of :func:`update` for a spec and a step's scalars."""
    return dict(
        MOMENTUM=int(spec.momentum),
        MOMENTUM_INPUT=int(spec.momentum_input),
        DENOMINATOR=int(spec.denominator),
        NORM=int(spec.norm),
        EPS_INSIDE=int(spec.eps),
        CENTERED=int(spec.centered),
        AMSGRAD=int(spec.amsgrad),
        HVP=int(spec.curvature),
        ADADELTA=int(spec.extra == 1),
        USE_DENOMINATOR=int(scalars.use_denominator),
        HAS_L2=int(scalars.weight_decay != 0.0),
        DECOUPLED=int(spec.weight_decay == 1 and scalars.decay_factor != 1.0),
        MAXIMIZE=int(spec.maximize),
        SCALE_GRAD=int(scalars.grad_scale != 1.0),
    )
