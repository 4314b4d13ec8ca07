"""Micro-batches from encoded samples: right-padded rows (packing comes in vlmtrain.data.packing)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmtrain.data.encode import EncodedSample
from vlmtrain.training.loss import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor
    dummy_vision: bool
    """True when no sample has an image: pixel_values is one zero tile that feeds no token."""
    num_supervised: torch.Tensor
    """(num_samples,) supervised tokens per sample, for the loss weights."""
    sample_index: torch.Tensor
    """(rows, length) which sample each token belongs to."""
    datasets: list[str] = field(default_factory=list)
    cu_seq_lens: torch.Tensor | None = None
    """Packed rows only (one row): (num_samples + 1,) int32 sample boundaries; None for padded rows."""
    max_length: int = 0
    """Packed rows only: the longest sample's length (a Python int, so kernels need no device sync)."""
    supervised_positions: torch.Tensor | None = None
    """(N,) flat positions ``row * length + t`` whose next token is supervised (computed from
    ``labels`` here, on the host), so the loss gathers them without a device sync."""

    def __post_init__(self):
        if self.supervised_positions is None:
            rows, cols = (self.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
            self.supervised_positions = rows * self.labels.shape[1] + cols

    @property
    def packed(self) -> bool:
        return self.cu_seq_lens is not None

    def to(self, device):
        for k, v in vars(self).items():
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device, non_blocking=True))
        return self


@dataclass
class Step:
    """One optimizer step's data on one rank."""

    micro_batches: list[Batch]
    skipped: list = field(default_factory=list)
    truncated: int = 0
    """Samples of this step whose trailing text turns were dropped to fit (data.too_long=truncate_text)."""


def pad_batch(samples: list[EncodedSample], pad_id: int, tile_size: int, pad_multiple: int = 8) -> Batch:
    length = max(len(s) for s in samples)
    length = -(-length // pad_multiple) * pad_multiple
    rows = len(samples)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s)
        input_ids[r, :n], labels[r, :n], attention_mask[r, :n] = s.input_ids, s.labels, 1
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None]
    dummy = not tiles
    pixel_values = torch.cat(tiles) if tiles else torch.zeros(1, 3, tile_size, tile_size)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        position_ids=torch.arange(length).expand(rows, length).clone(),
        pixel_values=pixel_values,
        dummy_vision=dummy,
        num_supervised=torch.tensor([s.num_supervised for s in samples], dtype=torch.long),
        sample_index=torch.arange(rows).unsqueeze(1).expand(rows, length).clone(),
        datasets=[s.dataset for s in samples],
    )


class StepCollator:
    """Splits one step's samples into micro-batches of at most micro_batch_size; counts skips."""

    def __init__(self, micro_batch_size: int, pad_id: int, tile_size: int):
        self.micro_batch_size, self.pad_id, self.tile_size = micro_batch_size, pad_id, tile_size

    def __call__(self, items) -> Step:
        good = [x for x in items if isinstance(x, EncodedSample)]
        skipped = [x for x in items if not isinstance(x, EncodedSample)]
        if not good:
            # every sample of this step was skipped: still run one zero-weight micro-batch, so this
            # rank takes the same collective path as the others
            good = [EncodedSample(torch.tensor([self.pad_id]), torch.tensor([IGNORE_INDEX]), None)]
        m = self.micro_batch_size
        micro = [pad_batch(good[i:i + m], self.pad_id, self.tile_size) for i in range(0, len(good), m)]
        return Step(micro_batches=micro, skipped=skipped, truncated=sum(bool(x.truncated) for x in good))
