"""fastopt under torch.distributed: DDP, FSDP2 (DTensor params) and ZeroRedundancyOptimizer.

Real process groups: gloo on the CPU over loopback with 2 and 3 ranks, and nccl with one
rank when a GPU is present. Spawning ranks is slow, so each (device, world size) job is
spawned once and runs every case of the matrix (tests/dist_worker.py); the tests below
read its per-case results. Every distributed run is compared with a single-process run
of the same optimizer and backend on the same global batches.

Tolerance: the two runs differ only in the order gradients are summed. All-reducing the
ranks' mean gradients rounds differently from one mean over the whole batch, by about
one fp32 ulp (~1e-7 relative) per gradient element. Each rule maps a gradient change of
relative size d to a param change of about lr * d (Adam-type steps are scale-free and
eps keeps them away from 0/0), so 30 steps with lr <= 0.05 on this small, smooth problem
differ by ~1e-7: measured at most 1.8e-7. ATOL = 1e-5 leaves room for other reduction
orders (nccl, other CPUs, more ranks), while faults land far above it: a clipping norm
left unreduced across ranks gives 1.7e-2, state stepped from a stale cache 1.2e-2.
Every case also checks that training moved params by more than 100 * ATOL.
"""

from __future__ import annotations

import json
import socket
import time
import warnings
from typing import Any

import dist_worker as W
import pytest
import torch
import torch.multiprocessing as mp
from optim_db import cpu_backends

from fastopt import backends

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

ATOL = 1e-5
MOVED = 100 * ATOL
NORM_RTOL = 1e-5  # fp32 norms of the same gradients summed in another order
JOB_TIMEOUT_S = 180  # a hung collective must not hang the suite

CPU_BACKENDS = ("torch", "cpp")
GPU_BACKENDS = ("torch", "triton", "cuda")
MODES = ("ddp", "fsdp", "zero")
OPTIMS = ("Adam", "SGD", "AdamW", "Adagrad", "NAdam", "nadam_linf", "adam_l1_clip")
# ZeRO steps each rank's partition with its own optimizer: a clipping norm inside the
# optimizer would cover that partition only (clip with clip_grad_norm_ before step instead)
NO_ZERO = ("adam_l1_clip",)
CKPT_OPTIMS = ("Adam", "Adagrad", "nadam_linf")


def _matrix(optims: tuple[str, ...], backend_names: tuple[str, ...]) -> list[tuple[str, str, str]]:
    return [
        (mode, name, b)
        for mode in MODES
        for name in optims
        for b in backend_names
        if not (mode == "zero" and name in NO_ZERO)
    ]


# (device, world size) -> the cases it runs; ws 3 runs a cheaper subset
JOBS: dict[tuple[str, int], list[tuple[str, str, str]]] = {
    ("cpu", 2): _matrix(OPTIMS, CPU_BACKENDS)
    + [("fsdp_full", n, b) for n in CKPT_OPTIMS for b in CPU_BACKENDS],
    ("cpu", 3): _matrix(("Adam", "adam_l1_clip"), CPU_BACKENDS),
    ("cuda", 1): _matrix(OPTIMS, GPU_BACKENDS),
}
CASES = [(dev, ws, *case) for (dev, ws), cases in JOBS.items() for case in cases]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world_size: int, job: dict[str, Any], out_dir: str) -> dict[str, dict[str, Any]]:
    """Run ``job`` in ``world_size`` spawned ranks; merge their results per case (worst diff
    over ranks, every error)."""
    for attempt in range(3):
        try:
            _run_ranks(world_size, job, out_dir)
            break
        except mp.ProcessRaisedException as exc:
            # the free port was taken by another process between choosing and binding it
            if "EADDRINUSE" not in str(exc) or attempt == 2:
                raise
        except mp.ProcessExitedException as exc:
            # A rank aborting in C++ ("terminate called without an active exception", seen
            # in about one full-suite run in ten on the shared 2-core machine, never when
            # the job was rerun) is retried with fresh processes and a fresh port; a crash
            # of our own would repeat and still fail. Errors raised in Python never get
            # here: the ranks record them as results.
            if exc.signal_name != "SIGABRT" or attempt == 2:
                raise
            warnings.warn(f"distributed job: a rank aborted ({exc}); retrying the job", stacklevel=1)
    merged: dict[str, dict[str, Any]] = {}
    for rank in range(world_size):
        with open(f"{out_dir}/rank{rank}.json") as f:
            for key, res in json.load(f).items():
                into = merged.setdefault(key, {})
                for field, value in (res or {}).items():
                    if field == "error":
                        if value:
                            into["error"] = (into.get("error") or "") + f"[rank {rank}] {value}"
                    elif field.endswith("_min"):
                        into[field] = min(into.get(field, value), value)
                    elif isinstance(value, float):
                        into[field] = max(into.get(field, value), value)
                    else:
                        into[field] = value
    return merged


def _run_ranks(world_size: int, job: dict[str, Any], out_dir: str) -> None:
    ctx = mp.start_processes(
        W.main,
        args=(world_size, _free_port(), job, out_dir),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"distributed job did not finish in {JOB_TIMEOUT_S} s: {job}")


class Jobs:
    """Spawns each job once, on first use, and keeps its results for the tests."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.results: dict[Any, dict[str, dict[str, Any]] | Exception] = {}

    def ckpt(self, tag: str, name: str, backend: str) -> str:
        return str(self.root / f"ckpt-{tag}-{name}-{backend}")

    def ckpt_cases(self) -> list[tuple[str, str]]:
        return [(name, b) for name in CKPT_OPTIMS for b in cpu_backends()]

    def single_process_checkpoints(self) -> None:
        """The 1-rank side of 1 -> 2: a plain model saved with DCP by this process."""
        if "single" not in self.results:
            for name, b in self.ckpt_cases():
                W.save_checkpoint(self.ckpt("ws1", name, b), name, b, "cpu")
            self.results["single"] = {}

    def get(self, device: str, world_size: int) -> dict[str, dict[str, Any]]:
        key = (device, world_size)
        if key in self.results:
            result = self.results[key]
            if isinstance(result, Exception):
                raise RuntimeError(f"the {device} job with {world_size} ranks failed") from result
            return result
        job: dict[str, Any] = dict(device=device, cases=[list(c) for c in JOBS[key]])
        if key == ("cpu", 2):
            self.single_process_checkpoints()
            job["layout"] = list(W.TORCH_TWINS)
            job["cases"].append(["zero_reload", "Adam", "torch"])
            job["load"] = [[self.ckpt("ws1", n, b), n, b] for n, b in self.ckpt_cases()]
            job["save"] = [[self.ckpt("ws2", n, b), n, b] for n, b in self.ckpt_cases()]
        elif key == ("cpu", 3):
            self.get("cpu", 2)  # writes the 2-rank checkpoints
            job["load"] = [[self.ckpt("ws2", n, b), n, b] for n, b in self.ckpt_cases()]
        out = self.root / f"out-{device}-{world_size}"
        out.mkdir()
        try:
            self.results[key] = spawn(world_size, job, str(out))
        except Exception as exc:  # a crashed job fails each of its tests with the cause
            self.results[key] = exc
        return self.get(device, world_size)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    return Jobs(tmp_path_factory.mktemp("dist"))


def _need(device: str, backend: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if device == "cpu" and backend not in cpu_backends():
        pytest.skip(f"backend {backend!r}: {backends.unavailable_reason(backend)}")


def _check(res: dict[str, Any] | None, what: str) -> None:
    assert res is not None, f"{what}: no result"
    if "skip" in res:
        pytest.skip(res["skip"])
    assert not res.get("error"), f"{what}:\n{res['error']}"
    assert res["moved"] > MOVED, f"{what}: params moved only {res['moved']:.2e}; the comparison says nothing"
    assert res["diff"] <= ATOL, (
        f"{what}: differs from the single-process run by {res['diff']:.2e} > {ATOL:.0e}"
    )


@pytest.mark.parametrize(
    "device,world_size,mode,name,backend", CASES, ids=[f"{d}-ws{w}-{m}-{n}-{b}" for d, w, m, n, b in CASES]
)
def test_matches_single_process(jobs: Jobs, device: str, world_size: int, mode: str, name: str, backend: str):
    """Training under DDP / FSDP2 / ZeRO (with a checkpoint halfway) ends where one process
    on the whole batch does."""
    _need(device, backend)
    res = jobs.get(device, world_size).get(f"{mode}/{name}/{backend}")
    _check(res, f"{mode} {name} {backend} on {world_size} {device} ranks")
    if name.endswith("_clip") and mode != "zero":
        # fastopt's cross-rank norm is clip_grad_norm_'s, and clipping was active every step
        assert res["norm_rel_diff"] <= NORM_RTOL, res
        assert res["norm_min"] > W.OPTIMIZERS[name][1]["max_grad_norm"], res


@pytest.mark.parametrize("name", W.TORCH_TWINS)
def test_fsdp_state_dict_layout_matches_torch(jobs: Jobs, name: str):
    """get_state_dict under FSDP2: same keys, types, shapes, dtypes, placements as torch.optim."""
    res = jobs.get("cpu", 2)[f"layout/{name}"]
    assert not res.get("error"), res["error"]


@pytest.mark.parametrize("name,backend", [(n, b) for n in CKPT_OPTIMS for b in CPU_BACKENDS])
@pytest.mark.parametrize("direction", ["1to2", "2to3"])
def test_dcp_checkpoint_reshards(jobs: Jobs, direction: str, name: str, backend: str):
    """DCP: saved by one process (plain model) and loaded by 2 FSDP2 ranks, or saved by 2
    ranks and loaded by 3; the second half of training matches the single-process run."""
    _need("cpu", backend)
    src, ws = {"1to2": ("ws1", 2), "2to3": ("ws2", 3)}[direction]
    results = jobs.get("cpu", ws)
    assert not jobs.get("cpu", 2)[f"save/{jobs.ckpt('ws2', name, backend)}"].get("error")
    _check(results.get(f"load/{jobs.ckpt(src, name, backend)}"), f"{direction} {name} {backend}")


@pytest.mark.parametrize("name,backend", [(n, b) for n in CKPT_OPTIMS for b in CPU_BACKENDS])
def test_dcp_checkpoint_2_ranks_to_one_process(jobs: Jobs, name: str, backend: str):
    """DCP: saved by 2 FSDP2 ranks, loaded into a plain model in this process."""
    _need("cpu", backend)
    save = jobs.get("cpu", 2).get(f"save/{jobs.ckpt('ws2', name, backend)}")
    assert save is not None and not save.get("error"), save
    _check(W.load_checkpoint(jobs.ckpt("ws2", name, backend), name, backend, "cpu"), f"2to1 {name} {backend}")


@pytest.mark.parametrize("name", [n for n in CKPT_OPTIMS if n in W.TORCH_TWINS])
def test_dcp_checkpoint_loads_into_torch_optim(jobs: Jobs, name: str):
    """The same checkpoint tools work: a fastopt FSDP2 checkpoint resumes torch.optim."""
    jobs.get("cpu", 2)
    path = jobs.ckpt("ws2", name, "torch")
    res = W.load_checkpoint(path, name, "torch", "cpu", optim_cls=getattr(torch.optim, name))
    _check(res, f"{name} into torch.optim")


def test_zero_load_state_dict_into_stepped_optimizer(jobs: Jobs):
    """ZeRO's load_state_dict replaces optim.state[param] directly (not through the inner
    optimizer's load_state_dict); rolling back a ZeRO optimizer that has already stepped
    (params and state restored from a consolidated checkpoint) must step the loaded state,
    as it does with torch.optim classes."""
    _check(jobs.get("cpu", 2).get("zero_reload/Adam/torch"), "ZeRO rollback")
