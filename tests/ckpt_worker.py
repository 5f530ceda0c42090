"""A training process for the checkpoint tests: trains, checkpoints, and may be killed.

    python tests/ckpt_worker.py DIR --kind KIND --backend NAME --steps N [--impl torch]
        [--save-every K] [--crawl-after S] [--hang-at H]

Resumes from DIR/ckpt.pt when it exists. Every step appends "step loss.hex()" to
DIR/trace.txt (flushed, so a killed process leaves what it did); checkpoints are written
to a temporary file and renamed over DIR/ckpt.pt, so a kill mid-write leaves the previous
one intact. After ``--crawl-after`` each step sleeps a little, leaving the test time to kill
the process mid-training; ``--hang-at`` stops it there for good (it never finishes by
itself). At the end the model is saved as DIR/final.pt.

The batch of step s is drawn from a generator seeded with s, so a resumed run sees the
data an uninterrupted one would, without checkpointing any RNG state.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastopt  # noqa: E402
from fastopt import schedules  # noqa: E402
from fastopt.spec import Denominator, Momentum, Schedule, Spec  # noqa: E402

# Nesterov momentum with Sutskever's increasing mu (it steps up at t = 250, 750, ...) and a
# bias-corrected nu: the schedules' progress lives in the step counts of the checkpoint
INCREASING = Spec(
    momentum=Momentum.NESTEROV,
    mu_schedule=Schedule.INCREASING,
    denominator=Denominator.MEAN,
    nu_schedule=Schedule.BIAS_CORRECTION,
)
KINDS = ("adam_taso", "increasing", "adamw_cross")


def build(kind: str, backend: str, impl: str, steps: int, dtype: torch.dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    params = list(model.parameters())
    if kind == "adam_taso":
        opt = fastopt.Adam(params, lr=0.02, amsgrad=True, backend=backend)
        sched = schedules.TASO(opt, total=steps)
    elif kind == "increasing":
        opt = fastopt.FusedOptimizer(params, spec=INCREASING, lr=0.01, mu=0.99, nu=0.999, backend=backend)
        sched = schedules.StepDecay(opt, step_size=100, gamma=0.7)
    elif kind == "adamw_cross":  # torch.optim and fastopt take turns on one checkpoint
        cls = torch.optim.AdamW if impl == "torch" else fastopt.AdamW
        extra = {} if impl == "torch" else {"backend": backend}
        opt = cls(params, lr=0.01, weight_decay=0.05, **extra)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    else:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    return model, opt, sched


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 6, generator=gen, dtype=dtype)
    return x, (x[:, :1] * x[:, 1:2] - x[:, 2:3]).sin()


def save_atomically(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: the old checkpoint stays whole until this instant


def train(directory: str, kind: str, backend: str, steps: int, impl: str = "fastopt", save_every: int = 5,
          crawl_after: int | None = None, hang_at: int | None = None) -> None:  # fmt: skip
    dtype = torch.float32 if backend == "triton" else torch.float64
    model, opt, sched = build(kind, backend, impl, steps, dtype)
    ckpt = os.path.join(directory, "ckpt.pt")
    start = 0
    if os.path.exists(ckpt):
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        start = saved["step"]
    with open(os.path.join(directory, "trace.txt"), "a") as trace:
        for step in range(start, steps):
            if hang_at is not None and step >= hang_at:
                while True:
                    time.sleep(1.0)
            x, y = batch(step, dtype)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            trace.write(f"{step} {float(loss.detach()).hex()}\n")
            trace.flush()
            if (step + 1) % save_every == 0:
                state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
                save_atomically(dict(state, scheduler=sched.state_dict(), step=step + 1), ckpt)
            if crawl_after is not None and step >= crawl_after:
                time.sleep(0.02)
    torch.save(model.state_dict(), os.path.join(directory, "final.pt"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("directory")
    ap.add_argument("--kind", choices=KINDS, required=True)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--impl", choices=("fastopt", "torch"), default="fastopt")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--crawl-after", type=int)
    ap.add_argument("--hang-at", type=int)
    a = ap.parse_args()
    train(a.directory, a.kind, a.backend, a.steps, a.impl, a.save_every, a.crawl_after, a.hang_at)


if __name__ == "__main__":
    main()
