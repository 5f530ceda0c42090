"""The distributed side of tests/test_distributed.py: one training problem, run under DDP,
FSDP2 and ZeroRedundancyOptimizer in spawned ranks, and once in a single process.

Every run trains the same small MLP for ``2 * HALF`` steps on the same global batches;
each rank takes its slice of the batch, so the averaged gradients equal the single-process
gradient of the whole batch up to the summation order. Halfway, the optimizer state goes
through a checkpoint (a state_dict round trip, or DCP files), so that every run also
checks that the state survives it. A rank writes ``{case: result}`` as JSON; a result
holds ``diff`` (max |param - single-process param|), ``moved`` (max |param - initial
param|, to show that the comparison is not vacuous) and ``error`` (a traceback or None).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import fastopt
import fastopt.distributed
from fastopt import backends, presets

HALF = 15  # steps before and after the mid-run checkpoint
GLOBAL_BATCH = 12  # divisible by every world size tested (1, 2, 3, 4)
TORCH_TWINS = ("Adam", "SGD", "AdamW", "Adagrad", "NAdam")

# name -> (class, constructor kwargs); the classes take torch.optim's arguments
OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "Adam": (fastopt.Adam, dict(lr=1e-2)),
    "SGD": (fastopt.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "AdamW": (fastopt.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "Adagrad": (fastopt.Adagrad, dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1)),
    "NAdam": (fastopt.NAdam, dict(lr=1e-2)),
    # hyperalgorithm variants through FusedOptimizer
    "nadam_linf": (fastopt.FusedOptimizer, dict(presets.PRESETS["nadam_linf"].defaults, spec=presets.spec("nadam_linf"))),
    # clipped hard enough (global norms are ~0.1-1) that every step is clipped
    "adam_l1_clip": (
        fastopt.FusedOptimizer,
        dict(presets.PRESETS["adam_l1"].defaults, spec=presets.spec("adam_l1"), lr=1e-2, max_grad_norm=0.05),
    ),
}  # fmt: skip


# -- the training problem -------------------------------------------------------------------
def make_model(device: str) -> nn.Module:
    """The same initial MLP in every process. Its sizes shard unevenly over 2, 3 and 4 ranks,
    and the last layer's bias (one element) leaves some ranks an empty shard."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG (pytest's) alone
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))
    return model.to(device)


def batch(step: int, device: str, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch of ``step``."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=gen)
    y = torch.sin(x[:, :1]) + 0.3 * x[:, 1:2] * x[:, 2:3]
    n = GLOBAL_BATCH // world_size
    return x[rank * n : (rank + 1) * n].to(device), y[rank * n : (rank + 1) * n].to(device)


def build(name: str, params: Any, backend: str) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMIZERS[name]
    return cls(params, backend=backend, **kwargs)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    first: int,
    steps: int,
    device: str,
    rank: int = 0,
    world_size: int = 1,
    before_step: Callable[[], None] | None = None,
) -> None:
    for step in range(first, first + steps):
        x, y = batch(step, device, rank, world_size)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        if before_step is not None:
            before_step()
        opt.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, gathered to full tensors, on the CPU in float64."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if fastopt.distributed.is_dtensor(p) else p
        out[name] = p.detach().double().cpu()
    return out


_references: dict[tuple, dict[str, torch.Tensor]] = {}


def reference(name: str, backend: str, device: str, steps: int = 2 * HALF) -> dict[str, torch.Tensor]:
    """Parameters after ``steps`` single-process steps on whole batches (memoized)."""
    key = (name, backend, device, steps)
    if key not in _references:
        model = make_model(device)
        train(model, build(name, model.parameters(), backend), 0, steps, device)
        _references[key] = full_params(model)
    return _references[key]


def compare(model: nn.Module, name: str, backend: str, device: str) -> dict[str, Any]:
    ours, ref, init = full_params(model), reference(name, backend, device), full_params(make_model(device))
    return dict(
        diff=max(float((ours[k] - ref[k]).abs().max()) for k in ref),
        moved=max(float((ref[k] - init[k]).abs().max()) for k in ref),
        error=None,
    )


# -- the three ways to go distributed -------------------------------------------------------
def fsdp_model(device: str, world_size: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world_size,))
    model = make_model(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _norm_check(model: nn.Module, opt: torch.optim.Optimizer, record: dict[str, Any]) -> Callable[[], None]:
    """A before_step hook: fastopt's clipping norm against clip_grad_norm_'s, every step."""

    def check() -> None:
        params = [p for p in model.parameters() if p.grad is not None]
        ours = fastopt.distributed.grad_norm([p.grad for p in params])
        theirs = nn.utils.clip_grad_norm_(params, float("inf"))  # inf: measure, do not clip
        theirs = float(theirs.full_tensor() if fastopt.distributed.is_dtensor(theirs) else theirs)
        record["norm_rel_diff"] = max(record.get("norm_rel_diff", 0.0), abs(ours - theirs) / theirs)
        record["norm_min"] = min(record.get("norm_min", float("inf")), ours)

    return check


def run_ddp(name: str, backend: str, device: str, rank: int, ws: int) -> dict[str, Any]:
    """DDP, with a state_dict round trip into a fresh optimizer halfway."""
    model = make_model(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device == "cuda" else None)
    opt = build(name, ddp.parameters(), backend)
    extra: dict[str, Any] = {}
    hook = _norm_check(ddp, opt, extra) if name.endswith("_clip") else None
    train(ddp, opt, 0, HALF, device, rank, ws, hook)
    saved = copy.deepcopy(opt.state_dict())
    opt = build(name, ddp.parameters(), backend)
    opt.load_state_dict(saved)
    train(ddp, opt, HALF, HALF, device, rank, ws, hook)
    return {**compare(ddp, name, backend, device), **extra}


def run_fsdp(name: str, backend: str, device: str, rank: int, ws: int) -> dict[str, Any]:
    """FSDP2, with a sharded get_state_dict/set_state_dict round trip into a fresh model and
    optimizer halfway; the state must be DTensors laid out like their params."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = fsdp_model(device, ws)
    opt = build(name, model.parameters(), backend)
    extra: dict[str, Any] = {}
    clip = name.endswith("_clip")
    train(model, opt, 0, HALF, device, rank, ws, _norm_check(model, opt, extra) if clip else None)
    model_sd, optim_sd = get_state_dict(model, opt)
    model = fsdp_model(device, ws)
    opt = build(name, model.parameters(), backend)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    train(model, opt, HALF, HALF, device, rank, ws, _norm_check(model, opt, extra) if clip else None)
    result = {**compare(model, name, backend, device), **extra}
    bad = state_layout_errors(opt)
    if bad:
        result["error"] = "; ".join(bad)
    return result


def run_fsdp_full(name: str, backend: str, device: str, rank: int, ws: int) -> dict[str, Any]:
    """FSDP2 resuming from an unsharded single-process checkpoint through the optimizer's own
    load_state_dict (plain tensors of full shape): each rank must keep its shard of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    single = make_model(device)
    single_opt = build(name, single.parameters(), backend)
    train(single, single_opt, 0, HALF, device)
    model = fsdp_model(device, ws)
    set_model_state_dict(model, single.state_dict(), options=StateDictOptions(full_state_dict=True))
    opt = build(name, model.parameters(), backend)
    opt.load_state_dict(copy.deepcopy(single_opt.state_dict()))
    train(model, opt, HALF, HALF, device, rank, ws)
    result = compare(model, name, backend, device)
    bad = state_layout_errors(opt)
    if bad:
        result["error"] = "; ".join(bad)
    return result


def state_layout_errors(opt: torch.optim.Optimizer) -> list[str]:
    """Every state tensor shaped like its DTensor param must be a DTensor of its layout."""
    errors = []
    for p, state in opt.state.items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if not fastopt.distributed.is_dtensor(value):
                errors.append(f"state {key!r} is a plain tensor")
            elif value.placements != p.placements or value.device_mesh != p.device_mesh:
                errors.append(f"state {key!r} has placements {value.placements}, its param {p.placements}")
    return errors


def run_zero(
    name: str, backend: str, device: str, rank: int, ws: int, reload: bool = False
) -> dict[str, Any]:
    """DDP + ZeroRedundancyOptimizer(optimizer_class=fastopt class). Halfway the state is
    consolidated, sent to every rank and loaded into a fresh ZeRO optimizer; with
    ``reload``, instead, training goes on, then params and state are rolled back to the
    halfway checkpoint in the same (already stepped) optimizer."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls, kwargs = OPTIMIZERS[name]
    model = make_model(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device == "cuda" else None)

    def zero() -> ZeroRedundancyOptimizer:
        return ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls, backend=backend, **kwargs)

    opt = zero()
    train(ddp, opt, 0, HALF, device, rank, ws)
    opt.consolidate_state_dict(to=0)
    # rank 0's state_dict shares its own partition's live state tensors: copy it
    box = [copy.deepcopy(opt.state_dict()) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if reload:
        params = [p.detach().clone() for p in ddp.parameters()]
        train(ddp, opt, HALF, 3, device, rank, ws)
        with torch.no_grad():
            for p, saved in zip(ddp.parameters(), params):
                p.copy_(saved)
    else:
        opt = zero()
    opt.load_state_dict(box[0])
    train(ddp, opt, HALF, HALF, device, rank, ws)
    return compare(ddp, name, backend, device)


MODES = {"ddp": run_ddp, "fsdp": run_fsdp, "zero": run_zero, "fsdp_full": run_fsdp_full}


def run_case(mode: str, name: str, backend: str, device: str, rank: int, ws: int) -> dict[str, Any]:
    if mode == "zero_reload":
        return run_zero(name, backend, device, rank, ws, reload=True)
    return MODES[mode](name, backend, device, rank, ws)


# -- checkpoints with torch.distributed.checkpoint -----------------------------------------
def save_checkpoint(path: str, name: str, backend: str, device: str, rank: int = 0, ws: int = 1) -> None:
    """Train HALF steps (FSDP2 when distributed, else a plain model) and save model and
    optimizer with DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = fsdp_model(device, ws) if dist.is_initialized() else make_model(device)
    opt = build(name, model.parameters(), backend)
    train(model, opt, 0, HALF, device, rank, ws)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_checkpoint(
    path: str, name: str, backend: str, device: str, rank: int = 0, ws: int = 1, optim_cls: type | None = None
) -> dict[str, Any]:
    """Load a DCP checkpoint into a fresh model (FSDP2 when distributed, else plain) and
    optimizer (``optim_cls``, e.g. a torch.optim class, instead of the fastopt one), train
    the second half and compare with the single-process run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = fsdp_model(device, ws) if dist.is_initialized() else make_model(device)
    if optim_cls is None:
        opt = build(name, model.parameters(), backend)
    else:
        opt = optim_cls(model.parameters(), **OPTIMIZERS[name][1])
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, HALF, HALF, device, rank, ws)
    return compare(model, name, backend, device)


def layout_errors(name: str, device: str, ws: int) -> list[str]:
    """Differences between the sharded optimizer state_dicts of a fastopt class and its
    torch.optim twin under FSDP2: keys, types, shapes, dtypes and placements."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def describe(opt_cls: type, **extra: Any) -> dict[str, Any]:
        model = fsdp_model(device, ws)
        opt = opt_cls(model.parameters(), **OPTIMIZERS[name][1], **extra)
        _, sd = get_state_dict(model, opt)
        entries = {}
        for fqn, st in sd["state"].items():
            for key, v in st.items():
                placements = v.placements if fastopt.distributed.is_dtensor(v) else None
                entries[f"{fqn}.{key}"] = (type(v).__name__, tuple(v.shape), v.dtype, placements)
        return dict(state=entries, groups=[sorted(g) for g in sd["param_groups"]])

    ours = describe(OPTIMIZERS[name][0], backend="torch")
    theirs = describe(getattr(torch.optim, name))
    errors = [f"{key}: fastopt {ours['state'].get(key)}, torch {theirs['state'].get(key)}"
              for key in sorted(set(ours["state"]) | set(theirs["state"]))
              if ours["state"].get(key) != theirs["state"].get(key)]  # fmt: skip
    if ours["groups"] != theirs["groups"]:
        errors.append(f"param_group keys: fastopt {ours['groups']}, torch {theirs['groups']}")
    return errors


# -- the rank's entry point -----------------------------------------------------------------
def _guard(results: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    start = time.perf_counter()
    try:
        results[key] = dict(fn() or {})
    except Exception:
        results[key] = dict(error=traceback.format_exc())
    results[key]["seconds"] = time.perf_counter() - start


def main(rank: int, world_size: int, port: int, job: dict[str, Any], out_dir: str) -> None:
    """One rank of a job: ``job`` lists "cases" [mode, optimizer, backend], "layout"
    [optimizer], "save" and "load" [path, optimizer, backend]; writes rank<r>.json."""
    device = job["device"]
    torch.set_num_threads(1)  # ranks share two cores
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    results: dict[str, Any] = {}
    try:
        for mode, name, backend in job.get("cases", []):
            reason = _backend_unusable(backend, device)
            if reason is not None:
                results[f"{mode}/{name}/{backend}"] = dict(skip=reason)
                continue
            case = functools.partial(run_case, mode, name, backend, device, rank, world_size)
            _guard(results, f"{mode}/{name}/{backend}", case)
        for name in job.get("layout", []):
            _guard(results, f"layout/{name}", functools.partial(_layout_result, name, device, world_size))
        for path, name, backend in job.get("save", []):
            save = functools.partial(save_checkpoint, path, name, backend, device, rank, world_size)
            _guard(results, f"save/{path}", save)
        for path, name, backend in job.get("load", []):
            load = functools.partial(load_checkpoint, path, name, backend, device, rank, world_size)
            _guard(results, f"load/{path}", load)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _layout_result(name: str, device: str, ws: int) -> dict[str, Any]:
    return dict(error="; ".join(layout_errors(name, device, ws)) or None)


def _backend_unusable(name: str, device: str) -> str | None:
    reason = backends.unavailable_reason(name)
    if reason is None:
        reason = backends.get(name).supports(presets.spec("adam"), torch.device(device), torch.float32)
    return reason
