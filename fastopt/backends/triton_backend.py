"""The Triton backend: one fused multi-tensor launch per (device, dtype) group, any spec.

Runs on CUDA tensors; under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by CI)
on CPU tensors. Math is fp32; params may be fp32, bf16 or fp16; the state may be the
param's dtype, fp32 or bf16 (bf16 state of fp32/fp16 params is stochastically rounded:
see :func:`step`); the role "master" holds fp32 master weights.

Hooks for the optimizer layer (all optional keyword arguments of :func:`step`):

``grad_scale_ptr``
    a one-element device tensor holding the *inverse* loss scale; the kernel multiplies
    every gradient by it (on top of ``scalars.grad_scale``).
``found_inf``
    a one-element device tensor; when it is nonzero the kernel modifies nothing. Neither
    tensor is read on the host, so an AMP step never synchronizes.
``unscale_grads``
    a one-element device tensor (the inverse loss scale): the kernel stores each gradient
    back times it once it has read it, leaving ``p.grad`` unscaled as torch's fused
    optimizers do, without a second pass over the gradients. They must not share memory.
``scalars_tensor``
    the step's scalars as a device tensor (:func:`scalars_tensor` builds one) instead of
    kernel arguments, so that the launch can be captured in a CUDA graph and replayed with
    new values written into that tensor.
``seed``
    the stochastic-rounding seed of this launch, an int in [0, 2**31): the optimizer layer
    passes ``scalars.rounding_seed(t, group_index)``, so that a run resumed from a
    checkpoint (or repeated in the same process) rounds its bf16 state exactly as the
    uninterrupted run does. Without it each launch takes the next value of a process-wide
    counter: fine for training, not reproducible.

:func:`global_grad_norm` gives the global L2 norm of a list of gradients as a device scalar
in one launch, for gradient clipping without a host sync.
"""

from __future__ import annotations

import contextlib
import operator
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from .. import tensor_lists
from ..rule import switches
from ..scalars import StepScalars
from ..spec import Denominator, Extra, Spec
from . import capturing, check_hvps

name = "triton"

try:  # the backend is optional: report why it cannot run rather than fail to import
    import triton.language as tl

    from . import triton_kernels as K

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the installation
    _IMPORT_ERROR = f"triton is not usable: {type(exc).__name__}: {exc}"

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason() -> str | None:
    """None when Triton can run here: a CUDA device, or the interpreter on the CPU."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if _interpreted():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton's interpreter on the CPU)"
    return None


def _device_ok(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type == "cuda" and not _interpreted():
        return None
    if device.type == "cpu" and _interpreted():
        return None
    return f"the Triton backend runs on CUDA tensors (CPU ones only under TRITON_INTERPRET=1), not {device}"


def supports(spec: Spec, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when this backend can step ``spec`` on ``device``/``dtype`` params."""
    reason = unavailable_reason() or _device_ok(device)
    if reason is not None:
        return reason
    if dtype not in _PARAM_DTYPES:
        return f"the Triton backend steps fp32, bf16 and fp16 params, not {dtype}"
    return None


# ---- launch configuration -------------------------------------------------------------
# BLOCK elements per inner iteration, CHUNK elements per program, tensors under BLOCK
# elements packed. Measured on an H100 (bench/gpu_throughput.py --tune, Adam fp32 on one
# 64M tensor, 1000 x 64k and ResNet-50): 4096 x 8 warps (16 elements, four 16-byte
# accesses per array per thread) over 8192-element chunks had the best geometric mean,
# though the spread between the configurations (within 10% on the large sets) is close
# to the run-to-run noise.
_GPU_CONFIG = {"block": 4096, "chunk": 8192, "num_warps": 8, "pack": 1}
# The interpreter runs programs one after another in numpy: small chunks exercise the
# chunking on small test tensors.
_INTERPRETER_CONFIG = {"block": 64, "chunk": 128, "num_warps": 1, "pack": 1}


def launch_config() -> dict[str, int]:
    """Block, chunk, warps and packing of small tensors for the next launch (a copy)."""
    return dict(_INTERPRETER_CONFIG if _interpreted() else _GPU_CONFIG)


# ---- the device-side table: pointers, sizes and (tensor, chunk start) pairs ---------------


class _Table:
    """The device-side description of a group, one int64 buffer with views:

    ``ptrs`` (n, na) addresses; ``sizes`` (n); ``chunks`` (c, 2) (tensor, start) pairs, one
    program each; ``packed_ids`` (k) tensors smaller than ``pack_below`` elements, which are
    not chunked but packed element by element into programs of ``pack_below`` elements
    (so ten thousand tiny tensors take a few programs, not ten thousand), and their prefix
    sums ``packed_offs`` (k + 1).
    """

    __slots__ = (
        "buf", "host", "ptrs", "sizes", "chunks", "packed_ids", "packed_offs", "n_chunks", "n_packed",
        "packed_elems", "n_programs", "search", "aligned", "streams", "uploaded",
    )  # fmt: skip

    def __init__(
        self, ptrs: np.ndarray, sizes: np.ndarray, esizes: list[int], chunk: int, pack_below: int, device
    ):
        ptrs, sizes = _coalesce(ptrs, sizes, esizes)
        n, na = ptrs.shape
        small = sizes < pack_below
        big = np.flatnonzero(~small)
        per = (sizes[big] + chunk - 1) // chunk
        owner = np.repeat(big, per)
        first = np.repeat(np.cumsum(per) - per, per)
        starts = (np.arange(len(owner), dtype=np.int64) - first) * chunk
        chunks = np.stack([owner, starts], axis=1)
        packed_ids = np.flatnonzero(small)
        packed_offs = np.concatenate([[0], np.cumsum(sizes[packed_ids])])
        parts = [ptrs.ravel(), sizes, chunks.ravel(), packed_ids, packed_offs]
        # each part padded to an even count of int64s: every view starts 16-byte aligned,
        # whatever the tensor counts (Triton compiles a variant per pointer alignment)
        padded = [np.concatenate([part, np.zeros(part.size % 2, dtype=np.int64)]) for part in parts]
        host = torch.from_numpy(np.concatenate(padded).astype(np.int64))
        device = torch.device(device)
        if device.type == "cuda":
            # pinned + non_blocking: the upload is queued on the stream, the host goes on
            host = host.pin_memory()
            self.buf = host.to(device, non_blocking=True)
            stream = torch.cuda.current_stream(device)
            self.streams = {stream.cuda_stream}  # the streams whose launches may read buf
            # (an upload being captured runs only in the graph's replays: nothing waits on it)
            self.uploaded = None if capturing(device) else stream.record_event()
        else:
            self.buf = host
            self.streams = self.uploaded = None
        self.host = host  # kept alive until the (asynchronous) upload has been consumed
        views, at = [], 0
        for part, room in zip(parts, padded, strict=True):
            views.append(self.buf[at : at + part.size])
            at += room.size
        self.ptrs, self.sizes, self.chunks, self.packed_ids, self.packed_offs = views
        self.n_chunks = len(owner)
        self.n_packed = len(packed_ids)
        self.packed_elems = int(packed_offs[-1])
        packed_programs = -(-self.packed_elems // pack_below) if self.n_packed else 0
        self.n_programs = self.n_chunks + packed_programs
        # binary-search steps over the packed tensors, rounded up (fewer kernel variants)
        self.search = -(-max(1, self.n_packed - 1).bit_length() // 4) * 4 if self.n_packed else 0
        # 16-byte aligned addresses let the kernel use 16-byte accesses
        self.aligned = bool((ptrs % 16 == 0).all()) if ptrs.size else True

    def share_with_current_stream(self, device: torch.device) -> None:
        """Before a launch that reads the table from a stream other than the one it was
        uploaded on: that stream waits for the upload, and the allocator is told the buffer
        is in use there (freed by the cache, its memory would otherwise go to the upload
        stream's next allocation while this stream's launches still read it)."""
        if self.streams is None:
            return
        stream = torch.cuda.current_stream(device)
        if stream.cuda_stream in self.streams:
            return
        if self.uploaded is not None:
            stream.wait_event(self.uploaded)
        self.buf.record_stream(stream)
        self.streams.add(stream.cuda_stream)


def _coalesce(ptrs: np.ndarray, sizes: np.ndarray, esizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Drop empty tensors and merge runs of tensors that lie back to back in memory in every
    array (params that are views of one flat buffer become one entry: fewer, fuller chunks)."""
    keep = sizes > 0
    ptrs, sizes = ptrs[keep], sizes[keep]
    if len(sizes) < 2:
        return ptrs, sizes
    ends = ptrs[:-1] + sizes[:-1, None] * np.asarray(esizes, dtype=np.int64)[None, :]
    joins = (ends == ptrs[1:]).all(axis=1)
    if not joins.any():
        return ptrs, sizes
    head = np.concatenate([[True], ~joins])
    group = np.cumsum(head) - 1
    merged = np.zeros(int(group[-1]) + 1, dtype=np.int64)
    np.add.at(merged, group, sizes)
    return ptrs[head], merged


# Tables by content (addresses and sizes): a step over the same tensors as an earlier one
# reuses its table without uploading anything. Content keys stay correct whatever the
# caller does; the cost per step is collecting the addresses.
_TABLES: OrderedDict[tuple, _Table] = OrderedDict()
_MAX_TABLES = 64


def _validate(arrays: list[list[torch.Tensor]], names: list[str], sizes: np.ndarray) -> None:
    """Checks done once per new table rather than every step. A step whose gradients are new
    tensors at new addresses (zero_grad(set_to_none=True), then backward) builds a new
    table: whole-list passes, no interpreter work per tensor."""
    params = arrays[0]
    device = params[0].device
    for ts, what in zip(arrays, names, strict=True):  # (one tensor per param: checked by the caller)
        _one_dtype(ts, what)
        if not tensor_lists.all_contiguous(ts):
            raise ValueError(f"fastopt triton: {what} tensors must be contiguous")
        same_device = ts[0].device == device and tensor_lists.one_device(ts)
        if not same_device or not np.array_equal(tensor_lists.numels(ts), sizes):
            raise ValueError(f"fastopt triton: each {what} tensor must match its param's size and device")


def pointer_table(
    arrays: list[list[torch.Tensor]], names: list[str], chunk: int, device, pack_below: int = 0
) -> _Table:
    """The device table of ``arrays`` (one list of tensors per array, the params first), from
    the cache when the same tensors were stepped before. Shared with the CUDA backend."""
    n = len(arrays[0])
    if any(len(ts) != n for ts in arrays):
        raise ValueError("fastopt triton: every role needs one tensor per param")
    ptrs = np.empty((n, len(arrays)), dtype=np.int64)
    for a, ts in enumerate(arrays):
        ptrs[:, a] = tensor_lists.addresses(ts)
    sizes = tensor_lists.numels(arrays[0])
    esizes = [ts[0].element_size() for ts in arrays]
    key = (
        str(device),
        chunk,
        pack_below,
        ptrs.tobytes(),
        sizes.tobytes(),
        tuple(ts[0].dtype for ts in arrays),
    )
    device = torch.device(device)
    captured = capturing(device)
    table = _TABLES.get(key)
    if table is None:
        _validate(arrays, names, sizes)
        table = _Table(ptrs, sizes, esizes, chunk, pack_below, device)
        if not captured:  # (a captured upload runs in replays only: no eager step may use it)
            _TABLES[key] = table
            if len(_TABLES) > _MAX_TABLES:
                _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
        if not captured:  # (torch.cuda.graph synchronizes before it captures)
            table.share_with_current_stream(device)
    if captured:
        _hold_for_graph(table)
    return table


# What a captured CUDA graph reads: a replay reads the table (and the norm's buffers) at the
# addresses it captured, long after the step that built them, and nothing else refers to
# them. Evicted from _TABLES or cleared, their memory would go back to the allocator and the
# replays would step whatever addresses were written there since. A graph is captured once
# and replayed many times: this keeps a few small buffers per graph, for the process.
_HELD_FOR_GRAPHS: list[Any] = []


def _hold_for_graph(obj: Any) -> None:
    if not any(h is obj for h in _HELD_FOR_GRAPHS):
        _HELD_FOR_GRAPHS.append(obj)


def clear_cache() -> None:
    """Forget every cached pointer table (those a CUDA graph captured stay alive)."""
    _TABLES.clear()


# ---- dtypes ---------------------------------------------------------------------------


def _tl(dtype: torch.dtype) -> Any:
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _one_dtype(ts: list[torch.Tensor], what: str) -> torch.dtype:
    dtype = ts[0].dtype
    if not tensor_lists.one_dtype(ts):
        raise ValueError(f"fastopt triton: all {what} tensors of a group must have one dtype")
    return dtype


# ---- the step -------------------------------------------------------------------------


def scalars_tensor(
    scalars: StepScalars, device: torch.device | str, seed: int = 0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A step's scalars as a float64 device tensor laid out as ``triton_kernels.SCALAR_FIELDS``
    (the StepScalars fields, then the stochastic-rounding seed), for ``step(scalars_tensor=)``.

    With ``out`` the values are written into that tensor in place (a pinned host copy,
    non-blocking), which is how a captured CUDA graph receives the next step's values.
    ``seed`` (in [0, 2**31)) is the one a launch reading this tensor rounds bf16 state
    with: write a fresh one every step (``scalars.rounding_seed(t, group_index)``), since a
    replayed graph has no other source of new rounding.
    """
    seed = check_seed(seed)
    values = torch.tensor([float(x) for x in scalars] + [float(seed)], dtype=torch.float64)
    if out is None:
        return values.to(device)
    if out.device.type == "cuda":
        values = values.pin_memory()
    out.copy_(values, non_blocking=True)
    return out


SEED_LIMIT = 1 << 31  # seeds are ints in [0, SEED_LIMIT), like scalars.rounding_seed's

_seed_counter = [0]


def _next_seed() -> int:
    # a fresh seed every launch: rounding errors of successive steps are independent
    _seed_counter[0] = (_seed_counter[0] + 0x9E3779B1) % SEED_LIMIT
    return _seed_counter[0]


def check_seed(seed: Any) -> int:
    """``seed`` as an int, or ValueError unless it is an integer in [0, 2**31) (shared with
    the CUDA backend)."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"fastopt: a stochastic-rounding seed is an int in [0, 2**31), not {seed!r}")
    return value


def step(
    spec: Spec,
    scalars: StepScalars,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    hvps: list[torch.Tensor] | None,
    state: dict[str, list[torch.Tensor]],
    *,
    grad_scale_ptr: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    scalars_tensor: torch.Tensor | None = None,
    stochastic_rounding: bool | None = None,
    seed: int | None = None,
    unscale_grads: torch.Tensor | None = None,
) -> None:
    """One fused step of ``spec`` over a group (see :mod:`fastopt.backends` for the contract).

    Args:
        grad_scale_ptr: optional one-element device tensor; grads are multiplied by it
            (the inverse AMP loss scale) in the kernel.
        found_inf: optional one-element device tensor; nonzero: nothing is modified.
        unscale_grads: optional one-element device tensor; each gradient is written back
            times it in the same pass (the gradients must not share memory).
        scalars_tensor: optional device tensor from :func:`scalars_tensor`; the kernel reads
            the step scalars from it instead of from ``scalars`` (CUDA-graph capture). The
            compile-time switches still come from ``spec`` and ``scalars``: keep
            ``weight_decay`` and ``grad_scale`` nonzero/non-one as at capture time.
        stochastic_rounding: round bf16 state stochastically. Default: when the state is
            bf16 and the params (or master weights) are not, i.e. when bf16 state was chosen
            to save memory; round-to-nearest would let Adam's second moment stall, since
            its per-step change (1 - beta2 = 1e-3) is below bf16's resolution (2**-8).
        seed: the stochastic-rounding seed of this launch, an int in [0, 2**31) (else
            ValueError). An element's random bits are a hash of the seed, its tensor's
            index in the launch's table and its index in that tensor, so the same seed over
            the same tensors rounds identically: pass one (the optimizer layer passes
            ``scalars.rounding_seed(t, group_index)``) for runs that are reproducible and
            resume from a checkpoint bit for bit. (Tensors that lie back to back in memory
            share a table entry: a group laid out differently, e.g. views of one flat
            buffer against separate tensors, draws different bits.) None: the next value
            of a process-wide counter, a new seed every launch, not reproducible. Unused
            without stochastic rounding. With ``scalars_tensor`` the seed is that tensor's
            last field (see :func:`scalars_tensor`) and passing ``seed`` too is a ValueError.
    """
    if seed is not None:
        seed = check_seed(seed)
        if scalars_tensor is not None:
            raise ValueError(
                "fastopt triton: with scalars_tensor the rounding seed is read from that tensor: "
                "pass it to scalars_tensor(seed=), not to step()"
            )
    if not params:
        return
    device = params[0].device
    why = supports(spec, device, params[0].dtype)
    if why is not None:
        raise ValueError(why)
    check_hvps("triton", spec, params, grads, hvps)
    p_dtype = params[0].dtype
    g_dtype = grads[0].dtype
    roles = [r for r in K.STATE_ROLES if r in spec.state_roles]
    missing = [r for r in roles if r not in state]
    if missing:
        raise ValueError(f"fastopt triton: state roles {missing} are missing")
    s_dtype = None
    for r in roles:
        d = state[r][0].dtype
        if s_dtype is not None and d != s_dtype:
            raise ValueError("fastopt triton: every state role of a group must have one dtype")
        s_dtype = d
    if s_dtype is None:
        s_dtype = p_dtype
    if s_dtype not in (p_dtype, torch.float32, torch.bfloat16):
        raise ValueError(f"fastopt triton: state dtype {s_dtype} is not the param dtype, fp32 or bf16")
    master = state.get("master")
    if master is not None and (p_dtype == torch.float32 or master[0].dtype != torch.float32):
        raise ValueError("fastopt triton: master weights are fp32 copies of fp16/bf16 params")
    if stochastic_rounding is None:
        weights_dtype = torch.float32 if master is not None else p_dtype
        stochastic_rounding = s_dtype == torch.bfloat16 and weights_dtype != torch.bfloat16
    sr = bool(stochastic_rounding) and s_dtype == torch.bfloat16

    # pointer-table slots: p, g, then the optional arrays in triton_kernels.ARRAYS order
    arrays = [params, grads]
    slots = {}
    optional = [("h", hvps if spec.curvature == 1 else None)]
    optional += [(r, state[r]) for r in roles]
    optional.append(("master", master))
    for role, ts in optional:
        if ts is not None:
            slots[role] = len(arrays)
            arrays.append(ts)

    cfg = launch_config()
    pack_below = cfg["block"] if cfg["pack"] else 0  # tensors below one block share programs
    table = pointer_table(arrays, ["param", "grad", *slots], cfg["chunk"], device, pack_below=pack_below)
    if table.n_programs == 0:
        return
    with on_device(device):
        _launch(
            table, spec, scalars, len(arrays), slots, (p_dtype, g_dtype, s_dtype), sr, cfg,
            grad_scale_ptr, found_inf, scalars_tensor, seed, unscale_grads,
        )  # fmt: skip


def _launch(
    table: Any,
    spec: Spec,
    scalars: StepScalars,
    n_arrays: int,
    slots: dict[str, int],
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    sr: bool,
    cfg: dict[str, int],
    grad_scale_ptr: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    scalars_tensor: torch.Tensor | None,
    seed: int | None = None,
    unscale_grads: torch.Tensor | None = None,
) -> None:
    """Launch the step kernel over a table (anything with _Table's attributes: tests
    hand-build one to check int64 offsets without 8 GB tensors). ``seed``: see :func:`step`."""
    p_dtype, g_dtype, s_dtype = dtypes
    sw = switches(spec, scalars)
    dynamic_use = False
    if scalars_tensor is not None:
        # a replayed graph keeps its compile-time switches: make them step-independent
        if spec.weight_decay == 1:
            sw["DECOUPLED"] = 1  # multiplying by a decay factor of 1 is exact
        sw["SCALE_GRAD"] = 1  # so is a grad scale of 1
        if spec.extra == Extra.RADAM:
            dynamic_use = True  # the rectification switches on after a few steps
        elif spec.denominator != Denominator.NONE:
            sw["USE_DENOMINATOR"] = 1
    if grad_scale_ptr is not None:
        sw["SCALE_GRAD"] = 1
    launch_seed = 0  # unused: no rounding, or the kernel reads the seed from scalars_tensor
    if sr and scalars_tensor is None:
        launch_seed = _next_seed() if seed is None else seed
    dummy = table.buf
    K.step_kernel[(table.n_programs,)](
        table.ptrs,
        table.sizes,
        table.chunks,
        table.packed_ids,
        table.packed_offs,
        scalars_tensor if scalars_tensor is not None else dummy,
        grad_scale_ptr if grad_scale_ptr is not None else dummy,
        found_inf if found_inf is not None else dummy,
        unscale_grads if unscale_grads is not None else dummy,
        table.n_chunks,
        table.n_packed,
        table.packed_elems,
        *(float(x) for x in scalars[:12]),
        launch_seed,
        NA=n_arrays,
        S_H=slots.get("h", -1),
        S_M=slots.get("m", -1),
        S_V=slots.get("v", -1),
        S_VMAX=slots.get("vmax", -1),
        S_GAVG=slots.get("gavg", -1),
        S_U=slots.get("u", -1),
        S_MASTER=slots.get("master", -1),
        DT_P=_tl(p_dtype),
        DT_G=_tl(g_dtype),
        DT_S=_tl(s_dtype),
        SR=sr,
        ALIGNED=table.aligned,
        SCALARS_FROM_TENSOR=scalars_tensor is not None,
        DYNAMIC_USE_DENOMINATOR=dynamic_use,
        HAS_INV_SCALE=grad_scale_ptr is not None,
        HAS_FOUND_INF=found_inf is not None,
        UNSCALE_GRADS=unscale_grads is not None,
        **sw,
        CHUNK=cfg["chunk"],
        BLOCK=cfg["block"],
        SEARCH=table.search,
        num_warps=cfg["num_warps"],
    )


# ---- global gradient norm ---------------------------------------------------------------

_norm_buffers: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def norm_buffers(device: torch.device, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial sums (fp32, at least ``n_chunks``) and the completion counter (int32,
    zero; each launch leaves it zero again) of a grad-norm launch on ``device``, shared with
    the CUDA backend.

    Eager launches share one pair per (device, stream): launches on one stream run one after
    another, while two streams' launches may run at once. A launch being captured in a CUDA
    graph gets a pair of its own, kept for the process: the graph's replays use it long
    after, and another launch (or a larger pair replacing this one) must not touch it.
    """

    def new_pair(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        partials = torch.empty(size, dtype=torch.float32, device=device)
        return partials, torch.zeros(1, dtype=torch.int32, device=device)

    if capturing(device):
        pair = new_pair(max(n_chunks, 1))
        _hold_for_graph(pair)
        return pair
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    pair = _norm_buffers.get(key)
    if pair is None or pair[0].numel() < n_chunks:
        pair = _norm_buffers[key] = new_pair(max(n_chunks, 1024))
    return pair


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``grads`` together, as a one-element fp32 tensor on their device.

    One launch (per dtype present), no host synchronization: each program squares and sums a
    chunk, and the last one to finish adds the partial sums in a fixed order (so the
    result is deterministic). ``torch.nn.utils.clip_grad_norm_`` semantics are built on it
    by the caller: ``coef = clamp(max_norm / (norm + 1e-6), max=1)``, grads times coef.
    """
    if not grads:
        raise ValueError("global_grad_norm needs at least one tensor")
    device = grads[0].device
    reason = unavailable_reason() or _device_ok(device)
    if reason is not None:
        raise ValueError(reason)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    norms = [_norm_one_dtype(ts, device) for ts in by_dtype.values()]
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.cat(norms)).reshape(1)


# The norm's own chunking, independent of the step's (tunable) launch configuration: the
# partial sums' order, hence the norm's last bits, must not change with that configuration.
_NORM_CONFIG = {"block": 2048, "chunk": 16384, "num_warps": 8}
_INTERPRETER_NORM_CONFIG = {"block": 64, "chunk": 256, "num_warps": 1}


def _norm_one_dtype(ts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    cfg = _INTERPRETER_NORM_CONFIG if _interpreted() else _NORM_CONFIG
    table = pointer_table([ts], ["grad"], cfg["chunk"], device)
    if table.n_chunks == 0:
        return torch.zeros(1, dtype=torch.float32, device=device)
    out = torch.empty(1, dtype=torch.float32, device=device)
    partials, counter = norm_buffers(device, table.n_chunks)
    with on_device(device):
        K.sumsq_kernel[(table.n_chunks,)](
            table.ptrs,
            table.sizes,
            table.chunks,
            partials,
            counter,
            out,
            table.n_chunks,
            DT=_tl(ts[0].dtype),
            ALIGNED=table.aligned,
            CHUNK=cfg["chunk"],
            BLOCK=cfg["block"],
            FINAL_BLOCK=1024,
            num_warps=cfg["num_warps"],
        )
    return out


def on_device(device: torch.device) -> Any:
    """A context that makes ``device`` current for a launch: Triton launches on the current
    device and its current stream, whatever device the pointers it is given are on (the
    CUDA backend takes the device as an argument instead)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
