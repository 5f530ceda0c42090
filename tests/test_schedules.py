"""Learning-rate schedules: the papers' formulas, and both directions of scheduler use."""

from __future__ import annotations

import math

import pytest
import torch

import fastopt
from fastopt import schedules


def test_step_decay_halves_every_five():
    assert [schedules.step_decay_lr(1.0, k) for k in (0, 4, 5, 9, 10)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_exponential_decay_variants():
    assert schedules.exponential_decay_lr(1.0, 3) == pytest.approx(math.exp(-0.3))
    # Dozat: x0.94 every two epochs
    assert schedules.exponential_decay_lr(2.0, 5, rate=0.94, every=2) == pytest.approx(2.0 * 0.94**2)


def test_taso_matches_the_papers_limits():
    lr_i, total = 0.05, 100
    # eq. (1) at k = beta k_t: the sigmoid is exactly at its midpoint
    assert schedules.taso_lr(lr_i, 70, total) == pytest.approx(lr_i / 2 + lr_i / 20)
    # eqs. (2)-(7): with alpha beta > 6 and alpha (1 - beta) > 6, the ends are within 5 %
    first, last = schedules.taso_lr(lr_i, 1, total), schedules.taso_lr(lr_i, total, total)
    assert abs(first - (lr_i + lr_i / 20)) / (lr_i + lr_i / 20) < 0.05
    assert abs(last - lr_i / 20) / (lr_i / 20) < 0.05
    values = [schedules.taso_lr(lr_i, k, total) for k in range(1, total + 1)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing


def test_taso_scheduler_on_fastopt_sets_group_lr():
    p = torch.zeros(2, requires_grad=True)
    opt = fastopt.SGD([p], lr=0.05, momentum=0.9)
    sched = schedules.TASO(opt, total=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert seen == pytest.approx([schedules.taso_lr(0.05, k, 10) for k in range(1, 11)])


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
        lambda o: schedules.ExponentialDecay(o, rate=0.94, every=2),
    ],
)
def test_schedulers_give_the_same_trajectory_on_fastopt_and_torch(make_sched):
    p0 = torch.randn(5, dtype=torch.float64)
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    oa, ob = fastopt.Adam([a], lr=0.1), torch.optim.Adam([b], lr=0.1)
    sa, sb = make_sched(oa), make_sched(ob)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        g = torch.randn(5, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        sa.step()
        sb.step()
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_scheduler_state_round_trip():
    """Resumed as torch's schedulers are: the optimizer's state (its lr) and the scheduler's."""
    p = torch.zeros(1, requires_grad=True)
    opt = fastopt.SGD([p], lr=1.0)
    sched = schedules.StepDecay(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.step()
        sched.step()
    opt2 = fastopt.SGD([p], lr=1.0)
    sched2 = schedules.StepDecay(opt2, step_size=1, gamma=0.5)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5**4)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda o: schedules.StepDecay(o, step_size=3, gamma=0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5)),
        (
            lambda o: schedules.ExponentialDecay(o, rate=0.9),
            lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
        ),
    ],
    ids=["step", "exponential"],
)  # fmt: skip
def test_schedulers_chain_with_a_warmup_as_torch_s_do(ours, theirs):
    """In a ChainedScheduler after LinearLR's warmup, the decay multiplies the warmed-up lr
    (a closed-form schedule would overwrite the warmup)."""
    lrs = []
    for make in (ours, theirs):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
        sched = torch.optim.lr_scheduler.ChainedScheduler([warmup, make(opt)])
        seq = []
        for _ in range(10):
            seq.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        lrs.append(seq)
    assert lrs[0][1] != lrs[0][0] and lrs[0][0] < 0.2  # the warmup is there
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-12)


def test_taso_chains_with_a_warmup():
    """TASO after a warmup: the product of the two factors at every step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
    sched = torch.optim.lr_scheduler.ChainedScheduler([warmup, schedules.TASO(opt, total=10)])
    for k in range(12):
        factor = 0.1 + 0.9 * min(k, 4) / 4
        assert opt.param_groups[0]["lr"] == pytest.approx(
            factor * schedules.taso_lr(1.0, k + 1, 10), rel=1e-12
        )
        opt.step()
        sched.step()


def test_taso_settles_at_its_final_lr_far_past_the_end():
    """Steps far beyond k_t (a scheduler stepped per batch with total in epochs): the
    sigmoid's term vanishes instead of overflowing math.exp."""
    assert schedules.taso_lr(1.0, 2930, 100) == 1.0 / 20
    opt = fastopt.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = schedules.TASO(opt, total=2)
    for _ in range(200):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0 / 20)


def test_invalid_schedule_arguments():
    opt = fastopt.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="total"):
        schedules.TASO(opt, total=0)
    with pytest.raises(ValueError, match="step_size"):
        schedules.StepDecay(opt, step_size=0)
    for bad in (dict(gamma=-0.5), dict(gamma=0.0), dict(step_size=2.5)):
        with pytest.raises(ValueError, match="gamma|step_size"):
            schedules.StepDecay(opt, **bad)
    for bad in (dict(alpha=float("nan")), dict(final_ratio=-0.1)):
        with pytest.raises(ValueError, match="TASO"):
            schedules.TASO(opt, total=10, **bad)
    with pytest.raises(ValueError, match="step_size"):
        schedules.step_decay_lr(1.0, 3, step_size=0)
    with pytest.raises(ValueError, match="every"):
        schedules.exponential_decay_lr(1.0, 3, every=0)
    with pytest.raises(ValueError, match="k must be"):
        schedules.step_decay_lr(1.0, -5)
    with pytest.raises(ValueError, match="counts from 1"):
        schedules.taso_lr(1.0, 0, 10)


@pytest.mark.parametrize(
    "make",
    [
        lambda o, last: schedules.StepDecay(o, step_size=2, gamma=0.5, last_epoch=last),
        lambda o, last: schedules.ExponentialDecay(o, rate=0.5, last_epoch=last),
        lambda o, last: schedules.TASO(o, total=8, last_epoch=last),
    ],
    ids=["step", "exponential", "taso"],
)
def test_a_scheduler_made_with_last_epoch_resumes_the_uninterrupted_run(make):
    """The resume idiom torch documents: the optimizer's checkpoint, then the scheduler made
    with last_epoch = the epochs done - 1. The lrs go on exactly as without the break."""
    p = torch.zeros(1, requires_grad=True)
    opt = fastopt.SGD([p], lr=1.0)
    sched = make(opt, -1)
    lrs, saved = [], None
    for epoch in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if epoch == 2:
            saved = opt.state_dict()
    resumed = fastopt.SGD([p], lr=1.0)
    resumed.load_state_dict(saved)  # holds initial_lr, which last_epoch >= 0 needs
    sched = make(resumed, 2)
    again = []
    for _ in range(3, 8):
        again.append(resumed.param_groups[0]["lr"])
        resumed.step()
        sched.step()
    assert again == pytest.approx(lrs[3:], rel=1e-12)
