"""Loaders of optimizer steps over the configured mixture."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from functools import partial

import lightning.pytorch as pl
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from vlmtrain.config import DataConfig
from vlmtrain.data.collate import Step, StepCollator
from vlmtrain.data.mixture import MixtureDataset
from vlmtrain.data.sampler import StepSampler
from vlmtrain.errors import UserError

log = logging.getLogger(__name__)

# Lightning cannot see that our loader resumes mid-epoch (its position lives in this module's
# state_dict, restored with the checkpoint), and would warn about every exact resume
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def init_loader_worker(worker_id: int, rank: int = 0) -> None:
    """A loader worker ignores the preemption signals: a scheduler signals the whole process group,
    and a worker that died of it would take the main process down before it saves (the main
    process alone handles them, ``vlmtrain.training.checkpointing.Preemption``). Then Lightning's
    per-worker seeding, which a worker_init_fn of our own replaces."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank=rank)


class VLMDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DataConfig, tokenizer, tokens_per_tile, global_batch_size: int, seed: int,
                 tile_cost: float = 0.0):
        """tokens_per_tile: the model family's ImageLayout (or InternVL's tokens per tile);
        tile_cost: a tile's ViT work in LLM tokens (``flops.tile_cost_in_tokens``), for data.balance_ranks."""
        super().__init__()
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.global_batch_size, self.tile_cost = global_batch_size, tile_cost
        self.dataset = MixtureDataset(cfg, tokenizer, tokens_per_tile, seed)
        self.sampler: StepSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        if self.sampler is None:
            costs = self.measure_costs(rank, world) if self.cfg.balance_ranks and world > 1 else None
            self.sampler = StepSampler(len(self.dataset), self.global_batch_size, rank, world, self.seed, costs=costs)

    def measure_costs(self, rank: int, world: int) -> np.ndarray:
        """Every sample's cost (``MixtureDataset.cost``): each rank measures every world-th sample,
        then the ranks exchange their parts (a collective: every rank calls it)."""
        t0 = time.perf_counter()
        mine = np.array([self.dataset.cost(i, self.tile_cost) for i in range(rank, len(self.dataset), world)])
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        costs = np.zeros(len(self.dataset))
        for r, part in enumerate(parts):
            costs[r::world] = part
        log.info("data.balance_ranks: costs of %d samples measured in %.1fs (mean %.0f tokens)",
                 len(costs), time.perf_counter() - t0, costs.mean())
        return costs

    @property
    def micro_batches_per_step(self) -> int:
        return math.ceil(self.global_batch_size / max(1, self.sampler.world_size) / self.cfg.micro_batch_size)

    def collator(self, pad_id: int):
        """The configured step collator (``data.collate``), padded by default."""
        token_types = self.dataset.layout.token_types  # CogVLM: filler batches carry token types too
        if self.cfg.collate is None:
            return StepCollator(self.cfg.micro_batch_size, pad_id, self.cfg.tile_size, token_types)
        try:
            return instantiate(self.cfg.collate, pad_id=pad_id, tile_size=self.cfg.tile_size, token_types=token_types)
        except InstantiationException as e:
            if isinstance(e.__cause__, UserError):  # a value the user gave: one line, not Hydra's wrapper
                raise e.__cause__ from None
            raise

    def train_dataloader(self) -> DataLoader:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise UserError("the tokenizer has no pad token")
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collator(pad_id),
            num_workers=self.cfg.num_workers,
            persistent_workers=bool(self.cfg.persistent_workers and self.cfg.num_workers > 0),
            prefetch_factor=self.cfg.prefetch_factor if self.cfg.num_workers > 0 else None,
            worker_init_fn=partial(init_loader_worker, rank=self.trainer.global_rank if self.trainer else 0),
            pin_memory=torch.cuda.is_available(),  # asynchronous host-to-device copies (Batch.pin_memory)
            # its own generator: creating the loader's iterator must not draw from the global RNG,
            # or a resumed run's drop-path masks would differ from the uninterrupted run's
            generator=torch.Generator().manual_seed(self.seed),
        )

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """A Step stays on the host: the training step moves each micro-batch when it runs it, and
        sums the step's loss weight from the host copy of its counts (no device sync for that)."""
        if isinstance(batch, Step):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def state_dict(self) -> dict:
        if self.sampler is None:
            return {}
        done = 0
        if self.trainer is not None:
            # optimizer steps of this epoch already taken: the loop's progress counts from the epoch
            # start (restored on resume); "processed" is bumped right after training_step, so a
            # checkpoint written in on_train_batch_end counts the step it follows
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed  # type: ignore[attr-defined]
        return {"sampler": self.sampler.state_dict(done)}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is None:
            self.setup()
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
