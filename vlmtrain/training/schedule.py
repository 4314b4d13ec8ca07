"""Learning-rate schedules (bound late, once the number of optimizer steps is known)."""

from __future__ import annotations

import math
import time

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(
    optimizer: Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0,
    seconds: float | None = None, clock=time.monotonic,
) -> LambdaLR:
    """Linear warmup from 0 to the peak lr over warmup_steps, then cosine decay to min_lr_ratio.

    ``seconds`` (``optim.scheduler.seconds``): a time-boxed cosine. The decay's progress is the
    larger of the steps' share of ``total_steps`` and the wall time's share of ``seconds`` (counted
    from when the schedule is built, at the start of fit), so a run on a slower host still
    completes its decay when its time is up (set ``trainer.max_time`` to stop it then) instead of
    being cut mid-schedule. Not for runs that resume: the clock restarts with the process."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps)
    if seconds is not None and not seconds > 0:
        raise ValueError(f"optim.scheduler.seconds must be > 0, got {seconds}")
    start = clock()

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if seconds is not None:
            progress = max(progress, (clock() - start) / seconds)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)
