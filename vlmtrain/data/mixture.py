"""The training mixture: datasets with their own n_max and repeat factor, read lazily.

``MixtureDataset[(index, epoch)]`` returns an ``EncodedSample`` or, for a bad line under
``on_error=skip``, a ``Skipped`` naming the reason; randomness (JPEG quality, video frames) comes
from (seed, epoch, index) so every sample is reproducible wherever and whenever it is loaded.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmtrain.config import DataConfig, DatasetConfig
from vlmtrain.data.conversation import SampleError
from vlmtrain.data.encode import ConversationEncoder, EncodedSample
from vlmtrain.data.formats import guess_format, reader
from vlmtrain.data.images import jpeg_reencode, load_image, to_pixel_values
from vlmtrain.data.templates import get_template
from vlmtrain.data.tiling import tile_image, tiles_per_image


@dataclass
class Skipped:
    """A sample that was left out, with the reason it is counted under."""

    reason: str
    where: str
    message: str
    dataset: str = ""


def repeat_indices(n: int, repeat: float, seed: int) -> np.ndarray:
    """Line indices after the repeat factor: floor(r) full copies plus a seeded random subset of
    round(N * frac(r)) lines (r < 1: only that subset)."""
    if repeat <= 0:
        raise ValueError(f"repeat must be > 0, got {repeat}")
    whole = int(math.floor(repeat))
    frac = repeat - whole
    rng = np.random.default_rng(seed)
    extra = np.sort(rng.permutation(n)[: int(round(n * frac))])
    return np.concatenate([np.tile(np.arange(n), whole), extra]).astype(np.int64)


class SourceDataset:
    """One configured dataset: its records, format, and per-dataset settings."""

    def __init__(self, name: str, cfg: DatasetConfig, seed: int):
        self.name, self.cfg = name, cfg
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data.datasets.{name}.path: {path} does not exist")
        self.format = cfg.format or guess_format(path)
        self.reader = reader(self.format)
        self.root = Path(cfg.root).expanduser() if cfg.root else (path if path.is_dir() else path.parent)
        self.records = self.reader.read(path)
        self.indices = repeat_indices(len(self.records), cfg.repeat, seed)


class MixtureDataset:
    def __init__(self, cfg: DataConfig, tokenizer, tokens_per_tile: int, seed: int = 0):
        if cfg.on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be skip or raise, got {cfg.on_error!r}")
        if not cfg.datasets:
            raise ValueError("data.datasets is empty: name at least one dataset")
        self.cfg, self.seed = cfg, seed
        self.sources = [SourceDataset(name, d, seed) for name, d in cfg.datasets.items()]
        self.encoder = ConversationEncoder(tokenizer, tokens_per_tile, cfg.max_seq_len, cfg.too_long)
        sizes = [len(s.indices) for s in self.sources]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[SourceDataset, int]:
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        source = self.sources[k]
        return source, int(source.indices[index - self.offsets[k]])

    def __getitem__(self, key) -> EncodedSample | Skipped:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        source, line = self.locate(index)
        record = source.records[line]
        try:
            return self._build(source, record, random.Random(f"{self.seed}:{epoch}:{index}"))
        except SampleError as e:
            if self.cfg.on_error == "raise":
                raise ValueError(f"{record.where()}: {e}") from None
            return Skipped(e.reason, record.where(), str(e), source.name)

    def _build(self, source: SourceDataset, record, rng: random.Random) -> EncodedSample:
        d = source.cfg
        conv = source.reader.to_conversation(record.parse(), source.root)
        conv.check()
        tiles, num_tiles = [], []
        if conv.images:
            per_image = tiles_per_image(len(conv.images), d.n_max)
            augment = True if d.jpeg_augment is None else d.jpeg_augment
            for src in conv.images:
                img_tiles = tile_image(load_image(src), d.min_tiles, per_image, self.cfg.tile_size, self.cfg.use_thumbnail)
                if augment:
                    img_tiles = [jpeg_reencode(t, rng) for t in img_tiles]
                tiles += img_tiles
                num_tiles.append(len(img_tiles))
        template = get_template(d.template or self.cfg.template)
        system = d.system if d.system is not None else self.cfg.system
        input_ids, labels = self.encoder.encode(conv, template, num_tiles, system)
        return EncodedSample(
            input_ids=input_ids,
            labels=labels,
            pixel_values=to_pixel_values(tiles) if tiles else None,
            num_tiles=num_tiles,
            dataset=source.name,
        )
