"""Loaders of optimizer steps over the configured mixture."""

from __future__ import annotations

import math

import lightning.pytorch as pl
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from vlmtrain.config import DataConfig
from vlmtrain.data.collate import StepCollator
from vlmtrain.data.mixture import MixtureDataset
from vlmtrain.data.sampler import StepSampler


class VLMDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DataConfig, tokenizer, tokens_per_tile: int, global_batch_size: int, seed: int):
        super().__init__()
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.global_batch_size = global_batch_size
        self.dataset = MixtureDataset(cfg, tokenizer, tokens_per_tile, seed)
        self.sampler: StepSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        if self.sampler is None:
            self.sampler = StepSampler(len(self.dataset), self.global_batch_size, rank, world, self.seed)

    @property
    def micro_batches_per_step(self) -> int:
        return math.ceil(self.global_batch_size / max(1, self.sampler.world_size) / self.cfg.micro_batch_size)

    def collator(self, pad_id: int):
        """The configured step collator (``data.collate``), padded by default."""
        if self.cfg.get("collate") is None:
            return StepCollator(self.cfg.micro_batch_size, pad_id, self.cfg.tile_size)
        return instantiate(self.cfg.collate, pad_id=pad_id, tile_size=self.cfg.tile_size)

    def train_dataloader(self) -> DataLoader:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token")
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collator(pad_id),
            num_workers=self.cfg.num_workers,
            persistent_workers=False,
        )

    def state_dict(self) -> dict:
        if self.sampler is None:
            return {}
        done = 0
        if self.trainer is not None:
            # steps of this epoch taken so far (batch_idx counts from the resumed start)
            done = self.sampler.start_step + self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return {"sampler": self.sampler.state_dict(done)}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is None:
            self.setup()
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
