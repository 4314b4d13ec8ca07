"""Micro-batches from encoded samples: right-padded rows (packing comes in vlmtrain.data.packing)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmtrain.data.encode import EncodedSample, PairSample
from vlmtrain.errors import UserError
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
    zero_weight: bool = False
    """A filler micro-batch (``zero_weight_batch``): it runs forward and backward, its loss counts zero."""
    token_type_ids: torch.Tensor | None = None
    """(rows, length) 1 at image positions: only for layouts with token types (CogVLM); None otherwise."""
    supervised_positions: torch.Tensor | None = None
    """(N,) flat positions ``row * length + t`` whose next token is supervised (computed from
    ``labels`` here, on the host), so the loss gathers them without a device sync."""
    tile_index: torch.Tensor | None = None
    """Which tile of ``pixel_values`` each image tile of the text shows, in text order (None: each
    tile once, in order). Preference pairs: both answers reuse the pair's tiles, encoded once."""
    pairs: torch.Tensor | None = None
    """Preference batches: (num_pairs, 2) sample indices of each pair's (chosen, rejected)."""
    ref_logps: torch.Tensor | None = None
    """Preference batches with precomputed reference log-probs: (num_pairs, 2) (chosen, rejected)."""
    image_sizes: list[tuple[int, int]] | None = None
    """Anyres layouts (LLaVA-NeXT): each image's original (height, width) in text order, as the
    model's feature packing takes them (a host list: reading it needs no device sync); None:
    every image is ``tokens_per_tile`` features per tile."""

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

    def pin_memory(self):
        """Page-locked host copies (the DataLoader's pin thread calls this), so ``to`` is asynchronous."""
        for k, v in vars(self).items():
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.pin_memory())
        return self


@dataclass
class Step:
    """One optimizer step's data on one rank."""

    micro_batches: list[Batch]
    skipped: list = field(default_factory=list)
    truncated: int = 0
    """Samples of this step whose trailing text turns were dropped to fit (data.too_long=truncate_text)."""

    def pin_memory(self):
        for mb in self.micro_batches:
            mb.pin_memory()
        return self

    def pad_to(self, n: int) -> None:
        """Append zero-weight micro-batches up to ``n``: every rank of a step must run the same number
        of forwards and backwards, because sharded strategies (FSDP2, ZeRO-3) gather parameters and
        reduce gradients inside each, and packing or skipped samples give ranks different counts."""
        first = self.micro_batches[0]
        for _ in range(n - len(self.micro_batches)):
            self.micro_batches.append(zero_weight_batch(int(first.input_ids[0, 0]), first.pixel_values.shape[-1],
                                                        packed=first.packed,
                                                        token_types=first.token_type_ids is not None))


def blank_tile(tile_size: int) -> torch.Tensor:
    """One black uint8 tile: the vision input of a batch without images (it feeds no token)."""
    return torch.zeros(1, 3, tile_size, tile_size, dtype=torch.uint8)


def zero_weight_batch(pad_id: int, tile_size: int, packed: bool = False, token_types: bool = False) -> Batch:
    """A micro-batch whose loss the training step multiplies by zero: two tokens (one supervised
    position, so the LM head runs too) and one zero tile (the vision tower runs too). Its backward
    reaches every trainable parameter with zero gradient, so a rank with nothing (more) to train on
    still takes part in every gather and reduction of the step."""
    return Batch(
        input_ids=torch.full((1, 2), pad_id, dtype=torch.long),
        labels=torch.tensor([[IGNORE_INDEX, pad_id]]),
        attention_mask=torch.ones(1, 2, dtype=torch.long),
        position_ids=torch.arange(2).unsqueeze(0),
        pixel_values=blank_tile(tile_size),
        dummy_vision=True,
        num_supervised=torch.tensor([0]),
        sample_index=torch.zeros(1, 2, dtype=torch.long),
        datasets=[],
        cu_seq_lens=torch.tensor([0, 2], dtype=torch.int32) if packed else None,
        max_length=2 if packed else 0,
        zero_weight=True,
        token_type_ids=torch.zeros(1, 2, dtype=torch.long) if token_types else None,
    )


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
    position_ids = torch.arange(length).expand(rows, length).clone()
    token_type_ids = None
    if samples[0].token_type_ids is not None:  # CogVLM: types and the samples' own positions (padding: 0)
        token_type_ids = torch.zeros((rows, length), dtype=torch.long)
        position_ids = torch.zeros((rows, length), dtype=torch.long)
        for r, s in enumerate(samples):
            token_type_ids[r, :len(s)], position_ids[r, :len(s)] = s.token_type_ids, s.position_ids
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None]
    dummy = not tiles
    pixel_values = torch.cat(tiles) if tiles else blank_tile(tile_size)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=pixel_values,
        dummy_vision=dummy,
        num_supervised=torch.tensor([s.num_supervised for s in samples], dtype=torch.long),
        sample_index=torch.arange(rows).unsqueeze(1).expand(rows, length).clone(),
        datasets=[s.dataset for s in samples],
        token_type_ids=token_type_ids,
        image_sizes=image_sizes_of(samples),
    )


def image_sizes_of(samples: list[EncodedSample]) -> list[tuple[int, int]] | None:
    """The samples' anyres image sizes in text order (None when they have none)."""
    return [size for s in samples for size in s.image_sizes] or None


def pair_layout(pairs: list[PairSample]) -> tuple[list[EncodedSample], torch.Tensor, torch.Tensor | None,
                                                  torch.Tensor | None]:
    """Pairs as sequences ``chosen_0, rejected_0, chosen_1, ...`` (a pair's two sequences side by
    side: one row each when padded, one after the other in the same buffer when packed), with
    ``pairs`` (num_pairs, 2) their sample indices, ``tile_index`` (each pair's tiles, held once,
    shown to both of its sequences; None without images) and ``ref_logps`` (None unless every
    pair has them)."""
    samples = [s for p in pairs for s in (p.chosen, p.rejected)]
    index = torch.arange(2 * len(pairs)).reshape(-1, 2)
    tiles, offset = [], 0
    for p in pairs:
        n = 0 if p.pixel_values is None else int(p.pixel_values.shape[0])
        own = torch.arange(offset, offset + n)
        tiles += [own, own]
        offset += n
    tile_index = torch.cat(tiles) if offset else None
    refs = [p.ref_logps for p in pairs]
    ref = torch.tensor(refs, dtype=torch.float32) if all(r is not None for r in refs) else None
    return samples, index, tile_index, ref


def with_pairs(batch: Batch, index: torch.Tensor, tile_index: torch.Tensor | None, ref) -> Batch:
    batch.pairs, batch.ref_logps = index, ref
    if not batch.dummy_vision:
        batch.tile_index = tile_index
    return batch


def split_items(items) -> tuple[list, list, bool]:
    """(good samples or pairs, skipped, whether they are pairs); a step mixing both is an error."""
    good = [x for x in items if isinstance(x, (EncodedSample, PairSample))]
    skipped = [x for x in items if not isinstance(x, (EncodedSample, PairSample))]
    kinds = {type(x) for x in good}
    if len(kinds) > 1:
        raise UserError("one step holds both preference pairs and plain samples: train preference data "
                        "(format preference) on its own, with stage=mpo or stage=dpo")
    return good, skipped, PairSample in kinds


def pad_pairs(pairs: list[PairSample], pad_id: int, tile_size: int) -> Batch:
    samples, index, tile_index, ref = pair_layout(pairs)
    return with_pairs(pad_batch(samples, pad_id, tile_size), index, tile_index, ref)


class StepCollator:
    """Splits one step's samples into micro-batches of at most micro_batch_size; counts skips."""

    def __init__(self, micro_batch_size: int, pad_id: int, tile_size: int, token_types: bool = False):
        """``token_types``: the layout's (CogVLM): filler batches carry token types too."""
        if not isinstance(micro_batch_size, int) or isinstance(micro_batch_size, bool) or micro_batch_size < 1:
            raise UserError(f"data.micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
        self.micro_batch_size, self.pad_id, self.tile_size = micro_batch_size, pad_id, tile_size
        self.token_types = token_types

    def __call__(self, items) -> Step:
        good, skipped, paired = split_items(items)
        if not good:
            # every sample of this step was skipped: still run one zero-weight micro-batch, so this
            # rank takes the same collective path as the others
            return Step(micro_batches=[zero_weight_batch(self.pad_id, self.tile_size,
                                                         token_types=self.token_types)], skipped=skipped)
        m = self.micro_batch_size  # pairs per micro-batch for preference data (two rows each)
        build = pad_pairs if paired else pad_batch
        micro = [build(good[i:i + m], self.pad_id, self.tile_size) for i in range(0, len(good), m)]
        return Step(micro_batches=micro, skipped=skipped, truncated=sum(bool(x.truncated) for x in good))
