"""Conversation + tile counts -> token ids and labels.

``<image>`` becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tokens_per_tile x tiles) + ``</img>``; the
template lays out the turns; labels are the token ids on answers and each turn's end marker and
-100 elsewhere. A sample longer than max_seq_len is never cut inside an image: it is skipped, or
(``truncate_text``) its last turns are dropped while at least one turn remains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmtrain.data.conversation import IMAGE_PLACEHOLDER, Conversation, SampleError
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

    @property
    def num_supervised(self) -> int:
        # labels are shifted by one when the loss is taken; the first token never is a target
        return int((self.labels[1:] != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return self.input_ids.numel()


class ConversationEncoder:
    def __init__(self, tokenizer, tokens_per_tile: int, max_seq_len: int, too_long: str = "skip"):
        if too_long not in ("skip", "truncate_text"):
            raise UserError(f"data.too_long must be skip or truncate_text, got {too_long!r}")
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile
        self.max_seq_len = max_seq_len
        self.too_long = too_long
        ids = tokenizer.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise UserError("tokenizer lacks the InternVL special tokens <img> </img> <IMG_CONTEXT>")
        self.img_start, self.img_end, self.img_context = ids

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _with_images(self, text: str, tiles: list[int]) -> list[int]:
        pieces = text.split(IMAGE_PLACEHOLDER)
        ids = self._text(pieces[0])
        for piece in pieces[1:]:
            n = tiles.pop(0)
            ids += [self.img_start] + [self.img_context] * (self.tokens_per_tile * n) + [self.img_end]
            ids += self._text(piece)
        return ids

    def encode(self, conv: Conversation, template: ChatTemplate, num_tiles: list[int], system: str | None):
        """Returns (input_ids, labels) as int64 tensors. num_tiles: tiles per <image>, in order.

        ``self.last_truncated`` tells whether trailing turns were dropped (data.too_long)."""
        self.last_truncated = False
        tiles = list(num_tiles)
        ids = self._text(template.render_system(conv.system if conv.system is not None else system))
        labels = [IGNORE_INDEX] * len(ids)
        turn_ends = []
        for user, answer in conv.turns:
            u = self._with_images(template.user.format(content=user), tiles)
            a = self._with_images(answer, tiles) + self._text(template.answer_end)
            s = self._text(template.turn_sep)
            ids += u + a + s
            # an image inside an answer is input, never a target
            a_labels = [IGNORE_INDEX if t in (self.img_start, self.img_context, self.img_end) else t for t in a]
            labels += [IGNORE_INDEX] * len(u) + a_labels + [IGNORE_INDEX] * len(s)
            turn_ends.append(len(ids))
        if tiles:
            raise SampleError("placeholder_mismatch", f"{len(tiles)} images have no <image> placeholder")
        if len(ids) > self.max_seq_len:
            ids, labels = self._fit(ids, labels, turn_ends)
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
