"""``python -m fastopt verify``: passes on correct backends, fails on a wrong one, refuses
settings that would check nothing. (The CPU backends only: the interpreted Triton kernels
have their own tests and would take minutes here.)"""

from __future__ import annotations

import pytest
import torch
from optim_db import cpu_backends

from fastopt import verify
from fastopt.optim import FusedOptimizer


@pytest.fixture
def cpu_targets(monkeypatch):
    monkeypatch.setattr(verify, "_targets", lambda: [(b, torch.device("cpu")) for b in cpu_backends()])


def test_verify_passes_on_the_cpu_backends(cpu_targets, capsys):
    assert verify.run(family_stride=400, steps=2)
    out = capsys.readouterr().out
    for backend in cpu_backends():
        assert f"{backend:8} cpu    float64" in out and f"{backend:8} cpu    float32" in out
    assert "FAIL" not in out and "all backends agree" in out


class _OffByOnePercent(FusedOptimizer):
    def __init__(self, params, lr, **kw):
        super().__init__(params, lr=lr * 1.01, **kw)


def test_verify_fails_on_a_wrong_backend(cpu_targets, monkeypatch, capsys):
    monkeypatch.setattr(verify, "FusedOptimizer", _OffByOnePercent)
    assert not verify.run(family_stride=2000, steps=2)
    out = capsys.readouterr().out
    assert "FAIL" in out and "SOME BACKENDS DISAGREE" in out


@pytest.mark.parametrize("args", [["--steps", "0"], ["--steps", "-1"], ["--stride", "0"]])
def test_verify_refuses_settings_that_check_nothing(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        verify.main(args)
    assert exit_info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
