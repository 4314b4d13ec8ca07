"""The cosine schedule, step-based and time-boxed (``optim.scheduler.seconds``)."""

import math

import pytest
import torch

from vlmtrain.training.schedule import cosine_with_warmup


def lrs(sched, steps):
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_step_cosine():
    lr = lrs(cosine_with_warmup(opt(), total_steps=12, warmup_steps=2), 12)
    assert lr[:2] == [0.5, 1.0]
    assert lr[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lr[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))


def test_time_boxed_cosine_completes_when_time_is_up():
    now = [0.0]
    sched = cosine_with_warmup(opt(), total_steps=1000, warmup_steps=1, seconds=10.0, clock=lambda: now[0])
    now[0] = 5.0  # half the time gone after a few steps: the time share leads
    lr = lrs(sched, 3)
    assert lr[-1] == pytest.approx(0.5)
    now[0] = 10.0
    assert lrs(sched, 1)[0] == pytest.approx(0.5)  # the lr the last step ran at
    assert sched.get_last_lr()[0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="seconds"):
        cosine_with_warmup(opt(), total_steps=10, warmup_steps=0, seconds=0)
