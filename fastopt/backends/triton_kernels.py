"""Triton kernels: the whole rule family as one multi-tensor kernel, plus a global L2 norm.

The per-element rule is not rewritten here. :func:`compile_rule` takes the code object of
:func:`fastopt.rule.update` and gives it a globals dict in which ``sqrt``, ``divide``, ``maximum``
and ``absolute`` are Triton device functions; ``triton.jit`` then reads the rule's own source
(through ``inspect``, which follows the code object back to ``fastopt/rule.py``) and resolves
those names through the new globals. The rule's upper-case switches arrive as ``tl.constexpr``
values from the kernel, so every ``if`` on them is resolved at compile time and each spec
compiles to straight-line code.

Multi-tensor layout (built by :mod:`fastopt.backends.triton_backend`): one launch per
(device, dtype) group reads a device-side int64 table:

* ``ptrs[t, a]``: address of array ``a`` (param, grad, state roles, ...) of tensor ``t``;
* ``sizes[t]``: its element count;
* ``chunks[c] = (t, start)``: program ``c`` steps elements ``[start, start + CHUNK)`` of
  tensor ``t``, so programs do equal work however uneven the tensors are.

Offsets are int64 throughout, so tensors over 2**31 elements index correctly.
"""

from __future__ import annotations

import types

import triton
import triton.language as tl

from .. import rule
from ..scalars import StepScalars

# Array slots of the pointer table, in this order; absent roles take no slot.
ARRAYS = ("p", "g", "h", "m", "v", "vmax", "gavg", "u", "master")
STATE_ROLES = ("m", "v", "vmax", "gavg", "u")
# Layout of the capturable scalars tensor: the StepScalars fields, then the rounding seed.
SCALAR_FIELDS = (*StepScalars._fields, "seed")
N_SCALARS = len(SCALAR_FIELDS)
SWITCHES = rule.SWITCHES


@triton.jit
def _sqrt(x):
    # correctly rounded, like torch.sqrt (tl.sqrt may lower to an approximation)
    return tl.sqrt_rn(x)


@triton.jit
def _divide(a, b):
    # correctly rounded, like torch's division (fp32 ``/`` lowers to div.full.f32, 2 ulp)
    return tl.div_rn(a, b)


@triton.jit
def _maximum(a, b):
    # torch.maximum propagates NaN from either side; tl.maximum does not by default
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _absolute(x):
    return tl.abs(x)


def compile_rule() -> triton.JITFunction:
    """:func:`fastopt.rule.update` compiled for Triton from its own source."""
    fn = rule.update
    scope = {
        "__name__": __name__,  # Triton names and caches the function by its module
        "__builtins__": fn.__globals__["__builtins__"],
        "tl": tl,  # Triton's interpreter looks for triton.language among the globals
        "sqrt": _sqrt,
        "divide": _divide,
        "maximum": _maximum,
        "absolute": _absolute,
    }
    clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__qualname__ = "rule_update"
    clone.__doc__ = fn.__doc__
    return triton.jit(clone)


update = compile_rule()


@triton.jit
def _array(ptrs, t, NA: tl.constexpr, SLOT: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Base pointer of array SLOT of tensor t, typed DT."""
    base = tl.load(ptrs + t * NA + SLOT).to(tl.pointer_type(DT))
    if ALIGNED:
        # every address is 16-byte aligned (checked on the host): 16-byte accesses
        base = tl.multiple_of(base, 16)
    return base


@triton.jit
def _round(x, DT: tl.constexpr):
    """fp32 -> DT, rounding to nearest even. bf16 by hand: the bits are rounded to a value
    that bf16 holds exactly, so the final conversion is exact whatever rounding the
    conversion itself uses (Triton's interpreter truncates)."""
    if DT == tl.bfloat16:
        raw = x.to(tl.uint32, bitcast=True)
        raw = (raw + 0x7FFF + ((raw >> 16) & 1)) & 0xFFFF0000
        y = raw.to(tl.float32, bitcast=True)
        return tl.where(x != x, x, y).to(DT)  # NaN: the rounding could carry it to infinity
    else:
        return x.to(DT)


@triton.jit
def _hash(x):
    """A 32-bit integer hash (xor-shift-multiply, 'lowbias32'): counter-based random bits
    for stochastic rounding, cheap next to memory traffic. (Triton's philox is a jit
    function of triton.language, unusable by the interpreter unless triton was imported
    with TRITON_INTERPRET already set.)"""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _store(base, offs, x, mask, bits, SR: tl.constexpr):
    """Store fp32 x to base's element type; SR: stochastic rounding to bf16 with the
    random ``bits`` (adding 16 random low bits before truncating rounds up with probability
    equal to the discarded fraction, so the rounding error has mean zero)."""
    if SR:
        raw = x.to(tl.uint32, bitcast=True)
        raw = (raw + (bits & 0xFFFF)) & 0xFFFF0000
        y = raw.to(tl.float32, bitcast=True)
        y = tl.where(x != x, x, y)  # a NaN with only low mantissa bits must stay NaN
        tl.store(base + offs, y.to(base.dtype.element_ty), mask=mask)
    else:
        tl.store(base + offs, _round(x, base.dtype.element_ty), mask=mask)


@triton.jit
def _scalar(scalars, i: tl.constexpr, host_value, FROM_TENSOR: tl.constexpr):
    if FROM_TENSOR:
        return tl.load(scalars + i).to(tl.float32)
    else:
        return host_value


@triton.jit
def _load(base, offs, mask, PRESENT: tl.constexpr, placeholder):
    if PRESENT:
        return tl.load(base + offs, mask=mask).to(tl.float32)
    else:
        return placeholder


@triton.jit
def _block(
    offs, mask, t, scalars, seed,
    lr, weight_decay, decay_factor, grad_scale, m_decay, m_weight, m_out, g_out,
    v_decay, v_weight, v_scale, eps, unscale,
    p_base, g_base, w_base, h_base, m_base, v_base, vmax_base, gavg_base, u_base,
    HAS_MASTER: tl.constexpr, HAS_H: tl.constexpr, HAS_M: tl.constexpr, HAS_V: tl.constexpr,
    HAS_VMAX: tl.constexpr, HAS_GAVG: tl.constexpr, HAS_U: tl.constexpr, SR: tl.constexpr,
    DYNAMIC_USE_DENOMINATOR: tl.constexpr, UNSCALE_GRADS: tl.constexpr,
    MOMENTUM: tl.constexpr, MOMENTUM_INPUT: tl.constexpr, DENOMINATOR: tl.constexpr,
    NORM: tl.constexpr, EPS_INSIDE: tl.constexpr, CENTERED: tl.constexpr, AMSGRAD: tl.constexpr,
    HVP: tl.constexpr, ADADELTA: tl.constexpr, USE_DENOMINATOR: tl.constexpr, HAS_L2: tl.constexpr,
    DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, SCALE_GRAD: tl.constexpr,
):  # fmt: skip
    """Load, update and store the elements ``offs`` (``mask``: None for a full block); with
    UNSCALE_GRADS also store the gradient times ``unscale`` back (AMP's unscaled p.grad)."""
    p = tl.load(w_base + offs, mask=mask).to(tl.float32)
    g = tl.load(g_base + offs, mask=mask).to(tl.float32)
    if UNSCALE_GRADS:
        # stored at once: the raw gradient need not stay live (in registers) through the rule
        tl.store(g_base + offs, _round(g * unscale, g_base.dtype.element_ty), mask=mask)
    # unused roles get a placeholder: the rule passes them through untouched
    h = _load(h_base, offs, mask, HAS_H, g)
    m = _load(m_base, offs, mask, HAS_M, p)
    v = _load(v_base, offs, mask, HAS_V, p)
    vmax = _load(vmax_base, offs, mask, HAS_VMAX, p)
    gavg = _load(gavg_base, offs, mask, HAS_GAVG, p)
    u = _load(u_base, offs, mask, HAS_U, p)

    if DYNAMIC_USE_DENOMINATOR:
        # RAdam under a CUDA graph: whether the rectified step applies changes with the
        # step number, so both forms are computed and the scalars tensor picks one.
        use = tl.load(scalars + 12) != 0
        p1, m1, v1, vmax1, gavg1, u1 = update(
            p, g, h, m, v, vmax, gavg, u,
            lr, weight_decay, decay_factor, grad_scale,
            m_decay, m_weight, m_out, g_out, v_decay, v_weight, v_scale, eps,
            MOMENTUM, MOMENTUM_INPUT, DENOMINATOR, NORM, EPS_INSIDE, CENTERED, AMSGRAD,
            HVP, ADADELTA, 1, HAS_L2, DECOUPLED, MAXIMIZE, SCALE_GRAD,
        )  # fmt: skip
        p0, m0, v0, vmax0, gavg0, u0 = update(
            p, g, h, m, v, vmax, gavg, u,
            lr, weight_decay, decay_factor, grad_scale,
            m_decay, m_weight, m_out, g_out, v_decay, v_weight, v_scale, eps,
            MOMENTUM, MOMENTUM_INPUT, DENOMINATOR, NORM, EPS_INSIDE, CENTERED, AMSGRAD,
            HVP, ADADELTA, 0, HAS_L2, DECOUPLED, MAXIMIZE, SCALE_GRAD,
        )  # fmt: skip
        p = tl.where(use, p1, p0)
        m = tl.where(use, m1, m0)
        v = tl.where(use, v1, v0)
        vmax = tl.where(use, vmax1, vmax0)
        gavg = tl.where(use, gavg1, gavg0)
        u = tl.where(use, u1, u0)
    else:
        p, m, v, vmax, gavg, u = update(
            p, g, h, m, v, vmax, gavg, u,
            lr, weight_decay, decay_factor, grad_scale,
            m_decay, m_weight, m_out, g_out, v_decay, v_weight, v_scale, eps,
            MOMENTUM, MOMENTUM_INPUT, DENOMINATOR, NORM, EPS_INSIDE, CENTERED, AMSGRAD,
            HVP, ADADELTA, USE_DENOMINATOR, HAS_L2, DECOUPLED, MAXIMIZE, SCALE_GRAD,
        )  # fmt: skip

    if SR:
        # one random word per element and step; each state role takes its own rehash. A
        # key per (seed, tensor) first, the offset mixed in after a hash of its own: XORing
        # offset and tensor index into one word would give element o of one tensor the bits
        # of element o ^ D of another, D fixed by the two indices (correlated tensors)
        key = _hash(seed.to(tl.uint32) ^ (t * 0x297A2D39).to(tl.uint32))
        r0 = _hash(_hash(offs.to(tl.uint32) ^ key) + ((offs >> 32).to(tl.uint32) * 0x2C1B3C6D ^ key))
        r1 = _hash(r0 ^ 0x68E31DA4)
        r2 = _hash(r0 ^ 0x1B56C4E9)
        r3 = _hash(r0 ^ 0x3F84D5B5)
    else:
        r0 = offs
        r1 = offs
        r2 = offs
        r3 = offs
    tl.store(w_base + offs, _round(p, w_base.dtype.element_ty), mask=mask)
    if HAS_MASTER:
        tl.store(p_base + offs, _round(p, p_base.dtype.element_ty), mask=mask)
    if HAS_M:
        _store(m_base, offs, m, mask, r0, SR)
    if HAS_V:
        _store(v_base, offs, v, mask, r1, SR)
    if HAS_VMAX:
        _store(vmax_base, offs, vmax, mask, r2, SR)
    if HAS_GAVG:
        _store(gavg_base, offs, gavg, mask, r3, SR)
    if HAS_U:
        _store(u_base, offs, u, mask, r0, SR)


# The rule's switches and the layout flags, passed on unchanged by the helpers below.
@triton.jit
def _tensor_block(
    offs, mask, t, ptrs, scalars, seed,
    lr, weight_decay, decay_factor, grad_scale, m_decay, m_weight, m_out, g_out,
    v_decay, v_weight, v_scale, eps, unscale,
    NA: tl.constexpr, S_H: tl.constexpr, S_M: tl.constexpr, S_V: tl.constexpr, S_VMAX: tl.constexpr,
    S_GAVG: tl.constexpr, S_U: tl.constexpr, S_MASTER: tl.constexpr,
    DT_P: tl.constexpr, DT_G: tl.constexpr, DT_S: tl.constexpr, SR: tl.constexpr, ALIGNED: tl.constexpr,
    DYNAMIC_USE_DENOMINATOR: tl.constexpr, UNSCALE_GRADS: tl.constexpr,
    MOMENTUM: tl.constexpr, MOMENTUM_INPUT: tl.constexpr, DENOMINATOR: tl.constexpr,
    NORM: tl.constexpr, EPS_INSIDE: tl.constexpr, CENTERED: tl.constexpr, AMSGRAD: tl.constexpr,
    HVP: tl.constexpr, ADADELTA: tl.constexpr, USE_DENOMINATOR: tl.constexpr, HAS_L2: tl.constexpr,
    DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, SCALE_GRAD: tl.constexpr,
):  # fmt: skip
    """Elements ``offs`` of tensor(s) ``t``: a scalar t with a block of offsets (a chunk of a
    large tensor), or one t per element (packed small tensors)."""
    p_base = _array(ptrs, t, NA, 0, DT_P, ALIGNED)
    g_base = _array(ptrs, t, NA, 1, DT_G, ALIGNED)
    # absent arrays alias the param pointer; their flags keep them from being touched
    w_base = p_base
    if S_MASTER >= 0:
        w_base = _array(ptrs, t, NA, S_MASTER, tl.float32, ALIGNED)
    h_base = g_base
    if S_H >= 0:
        h_base = _array(ptrs, t, NA, S_H, DT_G, ALIGNED)
    m_base = p_base
    if S_M >= 0:
        m_base = _array(ptrs, t, NA, S_M, DT_S, ALIGNED)
    v_base = p_base
    if S_V >= 0:
        v_base = _array(ptrs, t, NA, S_V, DT_S, ALIGNED)
    vmax_base = p_base
    if S_VMAX >= 0:
        vmax_base = _array(ptrs, t, NA, S_VMAX, DT_S, ALIGNED)
    gavg_base = p_base
    if S_GAVG >= 0:
        gavg_base = _array(ptrs, t, NA, S_GAVG, DT_S, ALIGNED)
    u_base = p_base
    if S_U >= 0:
        u_base = _array(ptrs, t, NA, S_U, DT_S, ALIGNED)
    _block(
        offs, mask, t, scalars, seed,
        lr, weight_decay, decay_factor, grad_scale, m_decay, m_weight, m_out, g_out,
        v_decay, v_weight, v_scale, eps, unscale,
        p_base, g_base, w_base, h_base, m_base, v_base, vmax_base, gavg_base, u_base,
        S_MASTER >= 0, S_H >= 0, S_M >= 0, S_V >= 0, S_VMAX >= 0, S_GAVG >= 0, S_U >= 0, SR,
        DYNAMIC_USE_DENOMINATOR, UNSCALE_GRADS,
        MOMENTUM, MOMENTUM_INPUT, DENOMINATOR, NORM, EPS_INSIDE, CENTERED, AMSGRAD,
        HVP, ADADELTA, USE_DENOMINATOR, HAS_L2, DECOUPLED, MAXIMIZE, SCALE_GRAD,
    )  # fmt: skip


@triton.jit(do_not_specialize=["seed", "n_chunks", "n_packed", "packed_elems"])
def step_kernel(
    ptrs,
    sizes,
    chunks,
    packed_ids,  # small tensors, packed element by element after the chunks' programs
    packed_offs,  # their exclusive prefix sums (n_packed + 1 entries)
    scalars,  # device StepScalars (SCALAR_FIELDS order) when SCALARS_FROM_TENSOR
    inv_scale_ptr,  # device scalar multiplying the grads, when HAS_INV_SCALE
    found_inf_ptr,  # device flag: nonzero leaves everything untouched, when HAS_FOUND_INF
    unscale_ptr,  # device scalar: each gradient is stored back times it, when UNSCALE_GRADS
    n_chunks,
    n_packed,
    packed_elems,
    lr,
    weight_decay,
    decay_factor,
    grad_scale,
    m_decay,
    m_weight,
    m_out,
    g_out,
    v_decay,
    v_weight,
    v_scale,
    eps,
    seed,
    # layout: number of slots per tensor, slot (or -1) and element type of each array
    NA: tl.constexpr,
    S_H: tl.constexpr,
    S_M: tl.constexpr,
    S_V: tl.constexpr,
    S_VMAX: tl.constexpr,
    S_GAVG: tl.constexpr,
    S_U: tl.constexpr,
    S_MASTER: tl.constexpr,
    DT_P: tl.constexpr,
    DT_G: tl.constexpr,
    DT_S: tl.constexpr,
    SR: tl.constexpr,  # stochastic rounding of the bf16 state
    ALIGNED: tl.constexpr,
    SCALARS_FROM_TENSOR: tl.constexpr,
    DYNAMIC_USE_DENOMINATOR: tl.constexpr,  # RAdam's switch read from the scalars tensor
    HAS_INV_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    UNSCALE_GRADS: tl.constexpr,  # write p.grad back unscaled (AMP), in the same pass
    # the rule's switches
    MOMENTUM: tl.constexpr,
    MOMENTUM_INPUT: tl.constexpr,
    DENOMINATOR: tl.constexpr,
    NORM: tl.constexpr,
    EPS_INSIDE: tl.constexpr,
    CENTERED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HVP: tl.constexpr,
    ADADELTA: tl.constexpr,
    USE_DENOMINATOR: tl.constexpr,
    HAS_L2: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    SEARCH: tl.constexpr,  # binary-search steps over the packed tensors (0: none packed)
):
    c = tl.program_id(0).to(tl.int64)
    skip = False
    if HAS_FOUND_INF:
        # an overflowed AMP step: no element is loaded or stored, and no host sync
        skip = tl.load(found_inf_ptr).to(tl.float32) != 0

    # step scalars: host arguments, or a device tensor so that a CUDA graph can replay them
    lr = _scalar(scalars, 0, lr, SCALARS_FROM_TENSOR)
    weight_decay = _scalar(scalars, 1, weight_decay, SCALARS_FROM_TENSOR)
    decay_factor = _scalar(scalars, 2, decay_factor, SCALARS_FROM_TENSOR)
    grad_scale = _scalar(scalars, 3, grad_scale, SCALARS_FROM_TENSOR)
    m_decay = _scalar(scalars, 4, m_decay, SCALARS_FROM_TENSOR)
    m_weight = _scalar(scalars, 5, m_weight, SCALARS_FROM_TENSOR)
    m_out = _scalar(scalars, 6, m_out, SCALARS_FROM_TENSOR)
    g_out = _scalar(scalars, 7, g_out, SCALARS_FROM_TENSOR)
    v_decay = _scalar(scalars, 8, v_decay, SCALARS_FROM_TENSOR)
    v_weight = _scalar(scalars, 9, v_weight, SCALARS_FROM_TENSOR)
    v_scale = _scalar(scalars, 10, v_scale, SCALARS_FROM_TENSOR)
    eps = _scalar(scalars, 11, eps, SCALARS_FROM_TENSOR)
    if HAS_INV_SCALE:
        grad_scale = grad_scale * tl.load(inv_scale_ptr).to(tl.float32)
    if SCALARS_FROM_TENSOR:
        seed = tl.load(scalars + 13).to(tl.int64)
    unscale = 1.0
    if UNSCALE_GRADS:
        unscale = tl.load(unscale_ptr).to(tl.float32)

    # (names differ between the two branches: Triton merges variables assigned in both)
    if c < n_chunks:
        # a chunk of one tensor: full blocks without a mask (a mask would keep accesses
        # scalar), then a masked tail
        t = tl.load(chunks + 2 * c)
        start = tl.multiple_of(tl.load(chunks + 2 * c + 1), CHUNK)
        stop = tl.minimum(tl.load(sizes + t), start + CHUNK)
        if HAS_FOUND_INF:
            stop = tl.where(skip, start, stop)
        full = (stop - start) // BLOCK * BLOCK
        for i in tl.range(0, full, BLOCK):
            _tensor_block(
                start + i + tl.arange(0, BLOCK), None, t, ptrs, scalars, seed,
                lr, weight_decay, decay_factor, grad_scale, m_decay, m_weight, m_out, g_out,
                v_decay, v_weight, v_scale, eps, unscale,
                NA, S_H, S_M, S_V, S_VMAX, S_GAVG, S_U, S_MASTER, DT_P, DT_G, DT_S, SR, ALIGNED,
                DYNAMIC_USE_DENOMINATOR, UNSCALE_GRADS,
                MOMENTUM, MOMENTUM_INPUT, DENOMINATOR, NORM, EPS_INSIDE, CENTERED, AMSGRAD,
                HVP, ADADELTA, USE_DENOMINATOR, HAS_L2, DECOUPLED, MAXIMIZE, SCALE_GRAD,
            )  # fmt: skip
        if full < stop - start:
            offs = start + full + tl.arange(0, BLOCK)
            _tensor_block(
                offs, offs < stop, t, ptrs, scalars, seed,
                lr, weight_decay, decay_factor, grad_scale, m_decay, m_weight, m_out, g_out,
                v_decay, v_weight, v_scale, eps, unscale,
                NA, S_H, S_M, S_V, S_VMAX, S_GAVG, S_U, S_MASTER, DT_P, DT_G, DT_S, SR, ALIGNED,
                DYNAMIC_USE_DENOMINATOR, UNSCALE_GRADS,
                MOMENTUM, MOMENTUM_INPUT, DENOMINATOR, NORM, EPS_INSIDE, CENTERED, AMSGRAD,
                HVP, ADADELTA, USE_DENOMINATOR, HAS_L2, DECOUPLED, MAXIMIZE, SCALE_GRAD,
            )  # fmt: skip
    elif SEARCH > 0:
        # small tensors packed: element e of their concatenation belongs to the tensor k
        # with packed_offs[k] <= e < packed_offs[k + 1], found by binary search, so a block
        # serves many tensors at once instead of one program each
        e = (c - n_chunks) * BLOCK + tl.arange(0, BLOCK)
        limit = packed_elems
        if HAS_FOUND_INF:
            limit = tl.where(skip, 0, limit)
        mask = e < limit
        lo = tl.full([BLOCK], 0, tl.int64)
        hi = tl.full([BLOCK], 0, tl.int64) + n_packed
        for _ in range(SEARCH):
            mid = (lo + hi) // 2
            right = tl.load(packed_offs + mid) <= e
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        tp = tl.load(packed_ids + lo)
        _tensor_block(
            e - tl.load(packed_offs + lo), mask, tp, ptrs, scalars, seed,
            lr, weight_decay, decay_factor, grad_scale, m_decay, m_weight, m_out, g_out,
            v_decay, v_weight, v_scale, eps, unscale,
            NA, S_H, S_M, S_V, S_VMAX, S_GAVG, S_U, S_MASTER, DT_P, DT_G, DT_S, SR, False,
            DYNAMIC_USE_DENOMINATOR, UNSCALE_GRADS,
            MOMENTUM, MOMENTUM_INPUT, DENOMINATOR, NORM, EPS_INSIDE, CENTERED, AMSGRAD,
            HVP, ADADELTA, USE_DENOMINATOR, HAS_L2, DECOUPLED, MAXIMIZE, SCALE_GRAD,
        )  # fmt: skip


@triton.jit
def _add(a, b):
    # the reduction's combiner; not tl.sum, a jit function of triton.language that Triton's
    # interpreter cannot call unless triton was imported with TRITON_INTERPRET already set
    return a + b


@triton.jit
def sumsq_kernel(
    ptrs,
    sizes,
    chunks,
    partials,  # fp32 [n_chunks]
    counter,  # int32 [1], zero before and after each launch
    out,  # fp32 [1]: the global L2 norm
    n_chunks,
    DT: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    FINAL_BLOCK: tl.constexpr,
):
    """Sum of squares of each chunk; the last program to finish adds the partials in a fixed
    order (deterministic, unlike atomically added floats) and writes the square root."""
    c = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks + 2 * c)
    start = tl.multiple_of(tl.load(chunks + 2 * c + 1), CHUNK)
    stop = tl.minimum(tl.load(sizes + t), start + CHUNK)
    base = _array(ptrs, t, 1, 0, DT, ALIGNED)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    full = (stop - start) // BLOCK * BLOCK
    for i in tl.range(0, full, BLOCK):
        x = tl.load(base + start + i + tl.arange(0, BLOCK)).to(tl.float32)
        acc += x * x
    offs = start + full + tl.arange(0, BLOCK)
    x = tl.load(base + offs, mask=offs < stop, other=0.0).to(tl.float32)
    acc += x * x
    tl.store(partials + c, tl.reduce(acc, 0, _add))
    # acq_rel: this program's partial is visible to whichever program finishes last
    done = tl.atomic_add(counter, 1, sem="acq_rel")
    if done == n_chunks - 1:
        total = tl.full([FINAL_BLOCK], 0.0, tl.float32)
        for j in tl.range(0, n_chunks, FINAL_BLOCK):
            idx = j + tl.arange(0, FINAL_BLOCK)
            total += tl.load(partials + idx, mask=idx < n_chunks, other=0.0, cache_modifier=".cg")
        tl.store(out, tl.sqrt_rn(tl.reduce(total, 0, _add)))
        tl.store(counter, 0)  # ready for the next launch (and for CUDA graph replays)
