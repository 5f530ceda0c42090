"""Checkpoints survive a killed process, and a bad checkpoint changes nothing.

The kill/resume tests run tests/ckpt_worker.py as real processes, SIGKILL them
mid-training, resume in a fresh process from the last checkpoint and require the losses of
every step any process ran, and the final weights, to be bit-identical to an uninterrupted
run on the same backend.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import signal
import subprocess
import sys
import time

import ckpt_worker
import pytest
import torch
from optim_db import cpu_backends
from test_reliability_hostile import triton_interpreter

import fastopt
from fastopt import backends

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ckpt_worker.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))
CYCLES: list[str] = []  # one entry per kill/resume cycle run, for the summary line


@pytest.fixture(scope="module", autouse=True)
def _report_cycles(request):
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\ncheckpoint kill/resume cycles: {len(CYCLES)} ({', '.join(CYCLES)})")


def _env(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    if backend == "triton":  # Triton's CPU interpreter, chosen before triton is imported
        env["TRITON_INTERPRET"] = "1"
    return env


def _triton_interpretable() -> bool:
    return importlib.util.find_spec("triton") is not None and not torch.cuda.is_available()


def _args(directory, kind, backend, steps, impl="fastopt"):
    return [sys.executable, WORKER, str(directory), "--kind", kind, "--backend", backend, "--steps", str(steps),
            "--impl", impl]  # fmt: skip


def _last_step(trace: str) -> int:
    if not os.path.exists(trace):
        return -1
    with open(trace) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    return int(lines[-1].split()[0]) if lines else -1


def _run_and_kill(directory, kind, backend, steps, kill_at, impl="fastopt") -> None:
    """Start a worker, let it train past ``kill_at`` and SIGKILL it while it trains."""
    cmd = _args(directory, kind, backend, steps, impl) + [
        "--crawl-after",
        str(kill_at),
        "--hang-at",
        str(kill_at + 40),
    ]
    proc = subprocess.Popen(cmd, env=_env(backend), cwd=ROOT)
    trace = os.path.join(directory, "trace.txt")
    deadline = time.monotonic() + 240
    try:
        while _last_step(trace) < kill_at + 2:
            assert proc.poll() is None, f"the worker exited early ({proc.returncode})"
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _trace(directory) -> dict[int, set[str]]:
    seen: dict[int, set[str]] = {}
    with open(os.path.join(directory, "trace.txt")) as f:
        for line in f.read().splitlines():
            step, loss = line.split()
            seen.setdefault(int(step), set()).add(loss)
    return seen


def _uninterrupted(directory, kind, backend, steps, impl="fastopt"):
    with triton_interpreter() if backend == "triton" else contextlib.nullcontext():
        ckpt_worker.train(str(directory), kind, backend, steps, impl)
    return _trace(directory), torch.load(os.path.join(directory, "final.pt"), weights_only=True)


def _chain(tmp_path, kind, backend, steps, kills, impls=None) -> dict:
    """Kill a worker at each of ``kills`` (resuming each time), then let one finish."""
    impls = impls or ["fastopt"] * (len(kills) + 1)
    run = tmp_path / "killed"
    run.mkdir()
    for kill_at, impl in zip(kills, impls):
        _run_and_kill(run, kind, backend, steps, kill_at, impl)
        assert os.path.exists(run / "ckpt.pt"), "no checkpoint survived the kill"
        CYCLES.append(f"{kind}/{backend}")
    subprocess.run(_args(run, kind, backend, steps, impls[-1]), env=_env(backend), cwd=ROOT, check=True)
    return _trace(run), torch.load(run / "final.pt", weights_only=True)


KILL_CASES = [("adam_taso", b, 40, (12, 27) if b == "torch" else (17,)) for b in cpu_backends()]
KILL_CASES.append(("increasing", cpu_backends()[-1], 262, (251,)))  # resumes across mu's step at t = 250


@pytest.mark.parametrize("kind,backend,steps,kills", KILL_CASES, ids=[f"{c[0]}-{c[1]}" for c in KILL_CASES])
def test_killed_training_resumes_bit_identically(tmp_path, kind, backend, steps, kills):
    (tmp_path / "straight").mkdir()
    want_trace, want_final = _uninterrupted(tmp_path / "straight", kind, backend, steps)
    got_trace, got_final = _chain(tmp_path, kind, backend, steps, kills)
    assert sorted(got_trace) == list(range(steps))
    for step, losses in got_trace.items():
        # steps run twice (after the last checkpoint, before the kill) must agree too
        assert losses == want_trace[step], f"step {step}: {losses} != {want_trace[step]}"
    for name, value in want_final.items():
        assert torch.equal(got_final[name], value), name


def test_killed_triton_training_resumes_bit_identically(tmp_path):
    if torch.cuda.is_available() or not _triton_interpretable():
        pytest.skip("Triton's CPU interpreter is not usable here")
    (tmp_path / "straight").mkdir()
    want_trace, want_final = _uninterrupted(tmp_path / "straight", "adam_taso", "triton", 30)
    got_trace, got_final = _chain(tmp_path, "adam_taso", "triton", 30, (11,))
    for step, losses in got_trace.items():
        assert losses == want_trace[step], f"step {step}"
    for name, value in want_final.items():
        assert torch.equal(got_final[name], value), name


def test_killed_runs_move_between_torch_optim_and_fastopt(tmp_path):
    """torch.optim trains and is killed, fastopt resumes from its checkpoint and is killed,
    torch.optim finishes: float64 rounding apart, an uninterrupted torch.optim run."""
    backend = cpu_backends()[-1]
    (tmp_path / "straight").mkdir()
    want_trace, want_final = _uninterrupted(tmp_path / "straight", "adamw_cross", backend, 36, impl="torch")
    got_trace, got_final = _chain(
        tmp_path, "adamw_cross", backend, 36, (9, 22), impls=["torch", "fastopt", "torch"]
    )
    assert sorted(got_trace) == list(range(36))
    for step, losses in got_trace.items():
        want = float.fromhex(next(iter(want_trace[step])))
        for loss in losses:  # 36 float64 steps: differences of a few ulps, amplified little
            assert float.fromhex(loss) == pytest.approx(want, rel=1e-10), step
    for name, value in want_final.items():
        torch.testing.assert_close(got_final[name], value, rtol=1e-10, atol=1e-12)


# ---- bad checkpoints: a clear error, and the optimizer as it was --------------------------


def _trained(cls=fastopt.Adam, dtype=torch.float64, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in [(3, 4), (5,)]]
    opt = cls(params, **kw)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
    return opt, params


def _state_copy(opt):
    return {
        id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for p, s in opt.state.items()
    }


def _assert_same_state(opt, before):
    assert {id(p) for p in opt.state} == set(before)
    for p, s in opt.state.items():
        assert set(s) == set(before[id(p)])
        for k, v in s.items():
            assert torch.equal(v, before[id(p)][k]) and v.dtype == before[id(p)][k].dtype, k


def _damaged(sd, damage):
    sd = {
        "state": {k: dict(v) for k, v in sd["state"].items()},
        "param_groups": [dict(g) for g in sd["param_groups"]],
    }
    damage(sd)
    return sd


DAMAGE = {
    "int_state": (lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3, 4, dtype=torch.int64)), "floating"),
    "complex_state": (
        lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3, 4, dtype=torch.complex128)),
        "floating",
    ),
    "missing_moment": (lambda sd: sd["state"][1].pop("exp_avg_sq"), "lacks"),
    "foreign_key": (lambda sd: sd["state"][1].update(momentum_buffer=torch.zeros(5)), "another optimizer"),
    "bad_step": (lambda sd: sd["state"][0].update(step=torch.tensor(-2.0)), "step count"),
    "vector_step": (lambda sd: sd["state"][0].update(step=torch.ones(2)), "step count|shape"),
    "unknown_param": (lambda sd: sd["state"].update({7: {}}), "unknown param"),
    "group_size": (lambda sd: sd["param_groups"][0].update(params=[0]), "differs in size"),
    "shape": (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(4)), "shape"),
}


@pytest.mark.parametrize("damage,match", DAMAGE.values(), ids=list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_and_nothing_changes(damage, match):
    opt, _ = _trained()
    good = opt.state_dict()
    before, groups = _state_copy(opt), [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(_damaged(good, damage))
    _assert_same_state(opt, before)
    assert [dict(g) for g in opt.param_groups] == groups
    opt.load_state_dict(good)  # the good one still loads


@pytest.mark.parametrize(
    "source",
    [torch.optim.SGD, fastopt.SGD, fastopt.RMSprop],
    ids=lambda c: c.__module__.split(".")[0] + "." + c.__name__,
)
def test_another_optimizers_checkpoint_is_refused(source):
    opt, params = _trained()
    before = _state_copy(opt)
    other = source(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    other.step()
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(other.state_dict())
    _assert_same_state(opt, before)


def test_a_truncated_checkpoint_file_fails_to_load_and_the_optimizer_is_untouched():
    opt, _ = _trained()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    data = buf.getvalue()
    before = _state_copy(opt)
    for cut in (len(data) // 2, len(data) - 20, 10):
        with pytest.raises(Exception, match="(?i)failed|invalid|corrupt|zip|central directory|truncat"):
            opt.load_state_dict(torch.load(io.BytesIO(data[:cut]), weights_only=True))
    _assert_same_state(opt, before)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cls", [fastopt.Adam, fastopt.NAdam, fastopt.SGD])
def test_master_weights_and_state_dtype_survive_a_checkpoint(cls, backend):
    """bf16 params, fp32 master weights and fp32 state: torch's loader casts floating state to
    the param's dtype, which would round the master weights to bf16; fastopt must not."""
    kw = dict(lr=0.01, master_weights=True, state_dtype=torch.float32, backend=backend)
    if cls is fastopt.SGD:
        kw["momentum"] = 0.9
    gen = torch.Generator().manual_seed(1)
    p0 = [torch.randn(s, generator=gen).bfloat16() for s in [(4, 3), (7,)]]
    grads = [[torch.randn(p.shape, generator=gen).bfloat16() for p in p0] for _ in range(8)]

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    straight = [p.clone().requires_grad_() for p in p0]
    run(straight, cls(straight, **kw), grads)
    params = [p.clone().requires_grad_() for p in p0]
    opt = cls(params, **kw)
    run(params, opt, grads[:4])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2 = cls(resumed, **kw)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p in resumed:
        for key, value in opt2.state[p].items():
            if key != "step":
                assert value.dtype == torch.float32, key
    run(resumed, opt2, grads[4:])
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_backends_are_the_ones_available():
    assert cpu_backends()[0] == "torch"
    assert backends.unavailable_reason("torch") is None
