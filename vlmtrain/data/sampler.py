"""Which samples form each optimizer step, on each rank.

One item of the loader is one optimizer step's data for this rank (its micro-batches), so the
loss can be normalised over the whole accumulation window before the first backward. The order
is a deterministic function of (seed, epoch); the sampler's state is (epoch, first step), so a
resumed run continues with the next unseen step instead of replaying the epoch. ``len()`` is the
whole epoch; iteration starts at ``start_step``.
"""

from __future__ import annotations

import numpy as np

from vlmtrain.errors import UserError


def balanced_share(chunk: np.ndarray, costs: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's samples of one step's ``chunk``: the same count for every rank, costs spread by
    greedy longest-first assignment (each sample, costliest first, goes to the least loaded rank
    that still has room; ties to the lower rank). Deterministic, so every rank computes the same
    split without communicating."""
    per_rank = len(chunk) // world_size
    loads, counts = np.zeros(world_size), np.zeros(world_size, dtype=np.int64)
    owner = np.empty(len(chunk), dtype=np.int64)
    for pos in np.argsort(-costs[chunk], kind="stable"):
        open_ranks = np.flatnonzero(counts < per_rank)
        r = open_ranks[np.argmin(loads[open_ranks])]
        owner[pos], loads[r], counts[r] = r, loads[r] + costs[chunk[pos]], counts[r] + 1
    return chunk[owner == rank]


class StepSampler:
    def __init__(self, num_samples: int, samples_per_step: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, costs: np.ndarray | None = None):
        if samples_per_step % world_size:
            raise UserError(f"samples per step {samples_per_step} is not divisible by {world_size} ranks")
        if num_samples < samples_per_step:
            raise UserError(
                f"the data has {num_samples} samples, fewer than one optimizer step's "
                f"{samples_per_step} (stage.global_batch_size): lower it or add data"
            )
        self.num_samples, self.samples_per_step = num_samples, samples_per_step
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.start_step = 0, 0
        if costs is not None and len(costs) != num_samples:
            raise ValueError(f"costs for {len(costs)} samples, but the data has {num_samples}")
        self.costs = costs
        """Per-sample compute estimate: when given, ranks share each step by cost (balanced_share)."""

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.samples_per_step  # the last partial step is dropped

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    @property
    def sampler(self) -> StepSampler:
        """Lightning calls ``loader.batch_sampler.sampler.set_epoch(epoch)`` at every epoch start;
        without this the order (and the epoch in every sample key) would never change."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Called at each epoch start; a resumed epoch keeps its start step."""
        if epoch != self.epoch:
            self.epoch, self.start_step = epoch, 0

    def __len__(self) -> int:
        # the whole epoch, also when resumed mid-epoch: the trainer restores how many steps of it
        # were taken, and its schedule (total steps) must not shrink on resume
        return self.steps_per_epoch

    def __iter__(self):
        order, n, epoch = self.order(self.epoch), self.samples_per_step, self.epoch
        for step in range(self.start_step, self.steps_per_epoch):
            chunk = order[step * n:(step + 1) * n]
            if self.costs is not None and self.world_size > 1:
                share = balanced_share(chunk, self.costs, self.rank, self.world_size)
            else:
                share = chunk[self.rank::self.world_size]
            yield [(int(i), epoch) for i in share]

    def state_dict(self, steps_done: int = 0) -> dict:
        """steps_done: optimizer steps of the current epoch already taken (the loader prefetches,
        so the sampler itself cannot know how many of its batches were consumed).

        A checkpoint taken after the epoch's last step points at the next epoch's first step: the
        resumed trainer counts that epoch as done and reuses the loader iterator it created at
        start-up, so that iterator must already be the next epoch's (with loader workers the indices
        are drawn when the iterator is created, not when the epoch starts)."""
        if steps_done >= self.steps_per_epoch:
            return {"epoch": self.epoch + 1, "start_step": 0}
        return {"epoch": self.epoch, "start_step": steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start_step = state["epoch"], state["start_step"]
