"""Packed micro-batches: a step's samples laid back to back in buffers of bounded tokens and tiles.

InternVL 2.5 trains on packed buffers of up to 16384 tokens and 48 tiles. Each buffer is one row
(``Batch`` of one row): samples keep their own position ids (restarting at 0) and
``cu_seq_lens`` marks their boundaries, so the language model's packed attention
(``vlmtrain.models.attention``) lets each sample attend only to itself; the ViT sees tiles as a
batch, so isolation there is automatic. ``sample_index`` maps every token to its sample, so the
loss weights f(num_supervised) of each sample apply unchanged and packing needs no loss change.

Samples are placed first-fit in their order into the open buffers; a sample never splits (an image's
tokens always stay together). One that alone exceeds a budget is skipped and counted, like the
encoder's too-long policy.
"""

from __future__ import annotations

import torch

from vlmtrain.data.collate import (
    Batch,
    Step,
    blank_tile,
    image_sizes_of,
    pair_layout,
    split_items,
    with_pairs,
    zero_weight_batch,
)
from vlmtrain.data.encode import EncodedSample, PairSample
from vlmtrain.data.mixture import Skipped
from vlmtrain.errors import UserError
from vlmtrain.training.loss import IGNORE_INDEX


def _num_tiles(s: EncodedSample | PairSample) -> int:
    return 0 if s.pixel_values is None else int(s.pixel_values.shape[0])


def plan_buffers(samples: list[EncodedSample], max_tokens: int, max_tiles: int) -> list[list[int]]:
    """First-fit: indices of ``samples`` per buffer; every sample must fit the budgets alone."""
    buffers: list[list[int]] = []
    used: list[tuple[int, int]] = []
    for i, s in enumerate(samples):
        n, t = len(s), _num_tiles(s)
        for b, (bn, bt) in enumerate(used):
            if bn + n <= max_tokens and bt + t <= max_tiles:
                buffers[b].append(i)
                used[b] = (bn + n, bt + t)
                break
        else:
            buffers.append([i])
            used.append((n, t))
    return buffers


def pack_samples(samples: list[EncodedSample], tile_size: int) -> Batch:
    """One packed row holding ``samples`` back to back."""
    lengths = [len(s) for s in samples]
    total = sum(lengths)
    labels = torch.cat([s.labels for s in samples]).clone()
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    # a sample's first token is never a target (num_supervised excludes it); this also keeps the
    # last token of one sample from predicting the first token of the next
    labels[starts] = IGNORE_INDEX
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None]
    dummy = not tiles
    token_types = positions = None
    if samples[0].token_type_ids is not None:  # CogVLM: each sample's types and own positions
        token_types = torch.cat([s.token_type_ids for s in samples]).unsqueeze(0)  # type: ignore[misc]  # stubs narrower than the code's use
        positions = torch.cat([s.position_ids for s in samples]).unsqueeze(0)  # type: ignore[misc]  # stubs narrower than the code's use
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return Batch(
        input_ids=torch.cat([s.input_ids for s in samples]).unsqueeze(0),
        labels=labels.unsqueeze(0),
        attention_mask=torch.ones(1, total, dtype=torch.long),
        position_ids=positions if positions is not None else torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
        pixel_values=torch.cat(tiles) if tiles else blank_tile(tile_size),
        dummy_vision=dummy,
        num_supervised=torch.tensor([s.num_supervised for s in samples], dtype=torch.long),
        sample_index=torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(lengths)).unsqueeze(0),
        datasets=[s.dataset for s in samples],
        cu_seq_lens=cu,
        max_length=max(lengths),
        token_type_ids=token_types,
        image_sizes=image_sizes_of(samples),
    )


def pack_pairs(pairs: list[PairSample], tile_size: int) -> Batch:
    """One packed row holding ``pairs``, each pair's chosen and rejected sequences side by side and
    its tiles once (``Batch.tile_index`` shows them to both)."""
    samples, index, tile_index, ref = pair_layout(pairs)
    return with_pairs(pack_samples(samples, tile_size), index, tile_index, ref)


class PackedStepCollator:
    """One step's samples -> packed micro-batches (one row each) of at most max_tokens / max_tiles."""

    def __init__(self, pad_id: int, tile_size: int, max_tokens: int = 16384, max_tiles: int = 48,
                 token_types: bool = False):
        if max_tokens < 1 or max_tiles < 1:
            raise UserError(f"packing budgets must be positive, got max_tokens={max_tokens} max_tiles={max_tiles}")
        self.pad_id, self.tile_size = pad_id, tile_size
        self.max_tokens, self.max_tiles = max_tokens, max_tiles
        self.token_types = token_types
        """The layout's (CogVLM): filler batches carry token types too."""

    def __call__(self, items) -> Step:
        # a preference pair is one unit here: its two sequences and its tiles go to one buffer
        candidates, skipped, paired = split_items(items)
        good = []
        for x in candidates:
            if len(x) > self.max_tokens:
                skipped.append(Skipped("too_long", "", f"{len(x)} tokens > packing budget {self.max_tokens}", x.dataset))
            elif _num_tiles(x) > self.max_tiles:
                skipped.append(Skipped("too_many_tiles", "", f"{_num_tiles(x)} tiles > packing budget {self.max_tiles}",
                                       x.dataset))
            else:
                good.append(x)
        if not good:
            # the whole step was skipped: one zero-weight row keeps this rank on the collective path
            return Step(micro_batches=[zero_weight_batch(self.pad_id, self.tile_size, packed=True,
                                                         token_types=self.token_types)], skipped=skipped)
        plan = plan_buffers(good, self.max_tokens, self.max_tiles)
        pack = pack_pairs if paired else pack_samples
        return Step(micro_batches=[pack([good[i] for i in b], self.tile_size) for b in plan], skipped=skipped)
