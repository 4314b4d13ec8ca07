"""Conversation + tile counts -> the training sample's token ids and labels.

The layout is ``vlmtrain.data.render``'s (the renderer chat, evaluation and export share). A sample
longer than max_seq_len is never cut inside an image: it is skipped, or (``truncate_text``) its
last turns are dropped while at least one turn remains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmtrain.data.conversation import Conversation, SampleError
from vlmtrain.data.placeholders import ImageLayout
from vlmtrain.data.render import Renderer
from vlmtrain.data.templates import ChatTemplate
from vlmtrain.errors import UserError
from vlmtrain.training.loss import IGNORE_INDEX


@dataclass
class EncodedSample:
    """What leaves the data side: everything packing, collation and loss weights need."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    """(tiles, 3, S, S) uint8; the model normalises them on the device (``normalize_pixels``)."""
    num_tiles: list[int] = field(default_factory=list)
    """Tiles per image (or per video frame), in placeholder order."""
    dataset: str = ""
    truncated: bool = False
    """True when trailing text-only turns were dropped to fit max_seq_len (data.too_long)."""
    token_type_ids: torch.Tensor | None = None
    """Layouts with ``token_types`` (CogVLM): 1 at image positions, 0 elsewhere."""
    position_ids: torch.Tensor | None = None
    """Layouts with ``token_types``: the sample's own position ids (image positions share one);
    None: 0, 1, 2, ..."""
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    """Anyres layouts (LLaVA-NeXT): each image's original (height, width), in placeholder order;
    the model packs an image's tile features by it. Empty otherwise."""

    @property
    def num_supervised(self) -> int:
        # labels are shifted by one when the loss is taken; the first token never is a target
        return int((self.labels[1:] != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return self.input_ids.numel()


@dataclass
class PairSample:
    """A preference pair: a chosen and a rejected answer to one prompt (same turns before it, same
    media). The prompt's tiles are held once, in ``chosen.pixel_values``; ``rejected`` has none of
    its own (its image tokens reuse the chosen one's tiles, see ``Batch.tile_index``)."""

    chosen: EncodedSample
    rejected: EncodedSample
    ref_logps: tuple[float, float] | None = None
    """The reference model's log-probs of (chosen, rejected), when precomputed beside the data."""

    @property
    def dataset(self) -> str:
        return self.chosen.dataset

    @property
    def truncated(self) -> bool:
        return False  # a pair is never cut: a too-long pair is skipped

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return self.chosen.pixel_values

    @property
    def num_tiles(self) -> list[int]:
        return self.chosen.num_tiles

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


class ConversationEncoder:
    """Training's use of the renderer: ids and labels as tensors, and the max_seq_len policy."""

    def __init__(self, tokenizer, tokens_per_tile: ImageLayout | int, max_seq_len: int, too_long: str = "skip"):
        """``tokens_per_tile``: the model family's ImageLayout (an int: InternVL's with that count)."""
        if too_long not in ("skip", "truncate_text"):
            raise UserError(f"data.too_long must be skip or truncate_text, got {too_long!r}")
        self.renderer = Renderer(tokenizer, tokens_per_tile)
        self.tokenizer = tokenizer
        self.layout = self.renderer.layout
        self.tokens_per_tile = self.layout.tokens_per_tile
        self.max_seq_len = max_seq_len
        self.too_long = too_long
        self.img_context = self.renderer.img_context

    def encode(self, conv: Conversation, template: ChatTemplate, num_tiles: list[int], system: str | None,
               frames: list[int] = (), image_sizes=()):
        """Returns (input_ids, labels) as int64 tensors. num_tiles: tiles per <image> once videos
        are expanded, in order; frames: frames per <video>; image_sizes: an anyres layout's
        original (height, width) per image.

        ``self.last_truncated`` tells whether trailing turns were dropped (data.too_long)."""
        self.last_truncated = False
        r = self.renderer.render(conv, template, num_tiles, frames, system, image_sizes)
        ids, labels = r.input_ids, r.labels
        if len(ids) > self.max_seq_len:
            ids, labels = self._fit(ids, labels, r.turn_ends)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def _fit(self, ids, labels, turn_ends):
        n = len(ids)
        if self.too_long == "truncate_text":
            # keep whole leading turns; a dropped turn must hold no image (never cut image tokens)
            keep = [e for e in turn_ends if e <= self.max_seq_len]
            if keep and self.img_context not in ids[keep[-1]:]:
                end = keep[-1]
                self.last_truncated = True
                return ids[:end], labels[:end]
        raise SampleError("too_long", f"{n} tokens > data.max_seq_len={self.max_seq_len}")
