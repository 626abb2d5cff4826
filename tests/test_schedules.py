"""WarmupDecayLR against the formulas written out here, and its edge cases."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lars_plugins import LARS, WarmupDecayLR
from checkpoints import weights_only_round_trip


def lrs(steps, **kw):
    opt = LARS([torch.nn.Parameter(torch.ones(2, 2))], lr=10.0)
    sched = WarmupDecayLR(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_poly_is_the_papers_schedule():
    got = lrs(14, total_steps=10, warmup_steps=4, decay="poly", power=2.0)
    warm = [10.0 * (t + 1) / 4 for t in range(4)]
    decay = [10.0 * (1 - (t - 4) / 6) ** 2 for t in range(4, 10)]
    assert got == pytest.approx(warm + decay + [0.0] * 4)  # flat at the floor after total_steps


def test_warmup_from_a_stated_start_is_torchs_linear_warmup():
    got = lrs(6, total_steps=10, warmup_steps=4, decay="constant", warmup_start=0.1)
    assert got == pytest.approx([1.0, 1.0 + 9.0 / 4, 1.0 + 2 * 9.0 / 4, 1.0 + 3 * 9.0 / 4, 10.0, 10.0])
    # torch's own LinearLR with the same start gives the same warm-up
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=10.0)
    linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
    expected = []
    for _ in range(5):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        linear.step()
    assert got[:5] == pytest.approx(expected)
    assert lrs(2, total_steps=4, warmup_steps=2, warmup_start=0.0)[0] == 0.0
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="warmup_start must be None"):
            WarmupDecayLR(LARS([torch.nn.Parameter(torch.ones(2, 2))]), total_steps=4, warmup_steps=2,
                          warmup_start=bad)


def test_cosine_with_floor_never_climbs_again():
    got = lrs(30, total_steps=20, decay="cosine", min_lr_ratio=0.1)
    expected = [10.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 20) / 20))) for t in range(30)]
    assert got == pytest.approx(expected)
    assert all(a >= b for a, b in zip(got, got[1:]))


def test_warmup_equal_to_the_run_and_linear_and_constant():
    # All warm-up: no division by zero; past total_steps the LR is at its floor, as for every decay.
    assert lrs(5, total_steps=3, warmup_steps=3) == pytest.approx([10 / 3, 20 / 3, 10.0, 0.0, 0.0])
    assert lrs(3, total_steps=2, decay="linear") == pytest.approx([10.0, 5.0, 0.0])
    assert lrs(3, total_steps=2, decay="constant") == pytest.approx([10.0, 10.0, 10.0])


def test_layer_decay_ratios_survive_and_state_loads_weights_only():
    opt = LARS([{"params": [torch.nn.Parameter(torch.ones(2, 2))], "lr": 1.0},
                {"params": [torch.nn.Parameter(torch.ones(2, 2))], "lr": 0.25}], lr=1.0)
    sched = WarmupDecayLR(opt, total_steps=10, warmup_steps=2)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.25 * opt.param_groups[0]["lr"])
    state = weights_only_round_trip(sched.state_dict())
    # Resume into a new optimizer at its initial LRs: the schedule goes on from step 5, not from 0.
    resumed_opt = LARS([{"params": [torch.nn.Parameter(torch.ones(2, 2))], "lr": 1.0},
                        {"params": [torch.nn.Parameter(torch.ones(2, 2))], "lr": 0.25}], lr=1.0)
    fresh = WarmupDecayLR(resumed_opt, total_steps=10, warmup_steps=2)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 5
    resumed_opt.step()
    fresh.step()  # step 6 of 10 after 2 warm-up steps: cosine half way, 0.5 of each group's LR
    cosine = 0.5 * (1 + math.cos(math.pi * (6 - 2) / (10 - 2)))
    assert [g["lr"] for g in resumed_opt.param_groups] == pytest.approx([1.0 * cosine, 0.25 * cosine])
    assert cosine == pytest.approx(0.5)


@pytest.mark.parametrize("kw,word", [
    (dict(total_steps=0), "total_steps"), (dict(total_steps=5, warmup_steps=6), "warmup_steps"),
    (dict(total_steps=5, decay="exp"), "decay"), (dict(total_steps=5, power=0), "power"),
    (dict(total_steps=5, min_lr_ratio=2), "min_lr_ratio"), (dict(total_steps=5.0), "total_steps"),
])
def test_bad_arguments(kw, word):
    with pytest.raises(ValueError, match=word):
        WarmupDecayLR(LARS([torch.nn.Parameter(torch.ones(2, 2))]), **kw)


def test_stepping_less_often_than_the_optimizer_warns_once():
    opt = LARS([torch.nn.Parameter(torch.ones(2, 2))], lr=10.0)
    sched = WarmupDecayLR(opt, total_steps=20, warmup_steps=5)
    with pytest.warns(UserWarning, match="stepped once for 3 optimizer steps.*total_steps=20.*interval='step'"):
        for _ in range(2):  # a cadence: twice in a row
            for _ in range(3):
                opt.step()
            sched.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        for _ in range(3):
            opt.step()
        sched.step()
    assert "_step_hook" not in sched.state_dict()  # the counter's hook stays out of checkpoints


def test_stepping_with_the_optimizer_or_more_often_is_silent():
    opt = LARS([torch.nn.Parameter(torch.ones(2, 2))], lr=10.0)
    sched = WarmupDecayLR(opt, total_steps=20, warmup_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            opt.step()
            sched.step()
        sched.step()  # a scheduler step with no optimizer step between (a skipped AMP step)
        loaded = WarmupDecayLR(opt, total_steps=20, warmup_steps=5)
        loaded.load_state_dict(weights_only_round_trip(sched.state_dict()))
        opt.step()
        loaded.step()  # the loaded scheduler still counts this optimizer's steps
    assert loaded.last_epoch == sched.last_epoch + 1


def test_a_scheduler_started_late_by_sequential_lr_is_not_mistaken_for_slow_stepping():
    opt = LARS([torch.nn.Parameter(torch.ones(2, 2))], lr=10.0)
    first = torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=3)
    second = WarmupDecayLR(opt, total_steps=6, decay="linear")  # idle for 3 optimizer steps, then started
    both = torch.optim.lr_scheduler.SequentialLR(opt, [first, second], milestones=[3])
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(8):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            both.step()
    assert lrs == pytest.approx([5.0, 5.0, 5.0] + [10.0 * (1 - t / 6) for t in range(5)])
