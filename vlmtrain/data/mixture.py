"""The training mixture: datasets with their own n_max and repeat factor, read lazily.

``MixtureDataset[(index, epoch)]`` returns an ``EncodedSample`` or, for a bad line under
``on_error=skip``, a ``Skipped`` naming the reason; randomness (JPEG quality, video frames) comes
from (seed, epoch, index) so every sample is reproducible wherever and whenever it is loaded.
"""

from __future__ import annotations

import logging
import math
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from vlmtrain.config import DataConfig, DatasetConfig, dataset_config
from vlmtrain.data.anyres import NO_VIDEO
from vlmtrain.data.conversation import SampleError
from vlmtrain.data.encode import ConversationEncoder, EncodedSample, PairSample
from vlmtrain.data.formats import META, guess_format, reader
from vlmtrain.data.images import image_size, jpeg_reencode, load_image, to_pixel_bytes
from vlmtrain.data.meta import expand_meta
from vlmtrain.data.placeholders import ImageLayout
from vlmtrain.data.resize import resize_bicubic
from vlmtrain.data.templates import get_template
from vlmtrain.data.tile_cache import TileCache, settings
from vlmtrain.data.tiling import (
    check_image_mode,
    choose_grid,
    single_tile,
    tile_image,
    tile_image_fast,
    tiles_per_image,
)
from vlmtrain.data.token_types import sample_token_types
from vlmtrain.data.video import count_frames, read_frames
from vlmtrain.errors import MissingPathError, UserError

log = logging.getLogger(__name__)


@dataclass
class Skipped:
    """A sample that was left out, with the reason it is counted under."""

    reason: str
    where: str
    message: str
    dataset: str = ""


BAD_RECORD = "bad_record"
"""The skip reason of a record whose reading failed in a way no reader check names (a wrong type
deep inside, an unreadable file): still one counted line, never a dead loader."""

_warned: set[tuple[str, str]] = set()


def unreadable(record, e: Exception) -> SampleError:
    """``e`` (raised while reading ``record``) as a counted skip; the first of each kind per file is
    logged with its traceback, since it may be a bug rather than bad data."""
    kind = (record.file, type(e).__name__)
    if kind not in _warned:
        _warned.add(kind)
        log.warning("%s: unreadable record (%s: %s); skipped as %s, later ones of this kind in this file "
                    "are only counted", record.where(), type(e).__name__, e, BAD_RECORD, exc_info=e)
    return SampleError(BAD_RECORD, f"unreadable record ({type(e).__name__}: {e})")


def repeat_indices(n: int, repeat: float, seed) -> np.ndarray:
    """Line indices after the repeat factor: floor(r) full copies plus a seeded random subset of
    round(N * frac(r)) lines (r < 1: only that subset)."""
    if repeat <= 0:
        raise UserError(f"repeat must be > 0, got {repeat}")
    whole = int(math.floor(repeat))
    frac = repeat - whole
    rng = np.random.default_rng(seed)
    extra = np.sort(rng.permutation(n)[: int(round(n * frac))])
    return np.concatenate([np.tile(np.arange(n), whole), extra]).astype(np.int64)


def _resolved(cfg: DictConfig) -> DataConfig:
    try:
        return cast(DataConfig, OmegaConf.to_object(cfg))
    except MissingMandatoryValue as e:
        raise UserError(f"data.{e.full_key} is not set") from None


def dataset_configs(datasets) -> dict[str, DatasetConfig]:
    """The configured datasets as DatasetConfig objects, meta files expanded into their entries."""
    out: dict[str, DatasetConfig] = {}
    for name, d in datasets.items():
        d = dataset_config(name, d)
        fmt = d.format
        if fmt is None and "{" not in str(d.path):
            path = Path(d.path).expanduser()
            if not path.exists():
                raise MissingPathError(f"data.datasets.{name}.path: {path} does not exist")
            fmt = guess_format(path)
        if fmt == META:
            out.update(expand_meta(name, d))
        else:
            out[name] = d
    return out


class SourceDataset:
    """One configured dataset: its records, format, and per-dataset settings."""

    def __init__(self, name: str, cfg: DatasetConfig, seed: int):
        self.name, self.cfg = name, cfg
        path = Path(cfg.path).expanduser()
        if "{" not in str(cfg.path) and not path.exists():
            raise MissingPathError(f"data.datasets.{name}.path: {path} does not exist")
        self.format = cfg.format or guess_format(path)
        self.reader = reader(self.format)
        default_root = getattr(self.reader, "default_root", None)  # a format may place its media elsewhere
        self.root = Path(cfg.root).expanduser() if cfg.root else (
            default_root(path) if default_root else path if path.is_dir() else path.parent)
        self.records = self.reader.read(path)
        self._root = os.path.normpath(os.path.abspath(self.root))
        self.pairs = hasattr(self.reader, "to_pair")
        """Preference data: each line is a PairSample (``vlmtrain.data.formats.preference``)."""
        self.reference = self.reader.load_reference(path) if self.pairs else None
        """Precomputed reference log-probs stored beside the data (None: none)."""
        # each dataset draws its own repeat subset: seeded by the run seed and the dataset's name
        self.indices = repeat_indices(len(self.records), cfg.repeat, [seed, zlib.crc32(name.encode())])
        self.tile_cache: TileCache | None = None


    def confine(self, conv, allow_outside: bool = False) -> None:
        """Media paths must lie under the dataset root (compared as written, so symlinks inside the
        root still work); ``data.media_outside_root=true`` lifts this."""
        if allow_outside:
            return
        for kind, items in (("image", conv.images), ("video", conv.videos)):
            for src in items:
                if not isinstance(src, (str, os.PathLike)):
                    continue  # bytes from a shard, PIL images
                p = os.path.normpath(os.path.abspath(src))
                if os.path.commonpath([p, self._root]) != self._root:
                    raise SampleError("media_outside_root", f"{kind} {src} is outside the dataset root {self._root} "
                                                            "(data.media_outside_root=true allows it)")


class MixtureDataset:
    def __init__(self, cfg: DataConfig, tokenizer, tokens_per_tile: ImageLayout | int, seed: int = 0,
                 training: bool = True):
        """``tokens_per_tile``: the model family's ImageLayout (``family.image_layout``; an int:
        InternVL's layout with that many tokens per tile)."""
        if isinstance(cfg, DictConfig):
            # resolve once: a DictConfig re-parses interpolations (tile_size, template) on every read,
            # which cost a third of the time of building a one-tile sample
            cfg = _resolved(cfg)
        if cfg.on_error not in ("skip", "raise"):
            raise UserError(f"data.on_error must be skip or raise, got {cfg.on_error!r}")
        if not cfg.datasets:
            raise UserError("data.datasets is empty: name at least one dataset")
        self.cfg, self.seed, self.training = cfg, seed, training
        self.sources = [SourceDataset(name, d, seed) for name, d in dataset_configs(cfg.datasets).items()]
        for source in self.sources:
            d = source.cfg
            # checked here, in the main process: inside a loader worker these became tracebacks
            if not (isinstance(d.n_max, int) and isinstance(d.min_tiles, int) and 1 <= d.min_tiles <= d.n_max):
                raise UserError(f"dataset {source.name}: need 1 <= min_tiles <= n_max, got min_tiles={d.min_tiles!r}, "
                                f"n_max={d.n_max!r}")
            if not (isinstance(d.repeat, (int, float)) and math.isfinite(d.repeat) and d.repeat > 0):
                raise UserError(f"dataset {source.name}: repeat must be a finite number > 0, got {d.repeat!r}")
            get_template(d.template or cfg.template)  # an unknown template fails now, naming it
            lo, hi = self._frames(source.cfg)
            if not 1 <= lo <= hi:
                raise UserError(f"dataset {source.name}: need 1 <= min_frames <= max_frames, got {lo}, {hi}")
        self.encoder = ConversationEncoder(tokenizer, tokens_per_tile, cfg.max_seq_len, cfg.too_long)
        self.layout = self.encoder.layout
        self.image_mode = check_image_mode(cfg.image_mode or self.layout.image_mode, self.layout)
        if self.image_mode != "tile":  # both are InternVL tiling's: elsewhere they would do nothing
            if cfg.fast_resize:
                raise UserError(f"data.fast_resize applies to data.image_mode=tile, not {self.image_mode}")
            for source in self.sources:
                if source.cfg.tile_cache:
                    raise UserError(f"data.datasets.{source.name}.tile_cache holds InternVL's tiles "
                                    f"(data.image_mode=tile), not {self.image_mode}'s")
        for source in self.sources:
            if source.cfg.tile_cache:
                expected = settings(cfg.tile_size, source.cfg.n_max, source.cfg.min_tiles, cfg.use_thumbnail)
                expected["fast_resize"] = bool(cfg.fast_resize)
                source.tile_cache = TileCache(source.cfg.tile_cache, expected,
                                              f"data.datasets.{source.name}.tile_cache")
            if source.reference is not None:  # precomputed reference log-probs: computed on these inputs?
                source.reference.check(self.reference_settings(source))
        sizes = [len(s.indices) for s in self.sources]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def reference_settings(self, source: SourceDataset) -> dict:
        """The settings a preference source's log-probs depend on (``formats.preference.SETTINGS``)."""
        d = source.cfg
        return {"n_max": d.n_max, "min_tiles": d.min_tiles, "template": d.template or self.cfg.template,
                "tile_size": self.cfg.tile_size, "use_thumbnail": self.cfg.use_thumbnail,
                "max_seq_len": self.cfg.max_seq_len, "image_mode": self.image_mode}

    def locate(self, index: int) -> tuple[SourceDataset, int]:
        if not 0 <= index < len(self):
            raise UserError(f"sample index {index} out of range: the mixture has {len(self)} samples")
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        source = self.sources[k]
        return source, int(source.indices[index - self.offsets[k]])

    def __getitem__(self, key) -> EncodedSample | PairSample | Skipped:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        return self.load(index, epoch)

    def load(self, index: int, epoch: int = 0, pixels: bool = True) -> EncodedSample | Skipped:
        """Sample ``index`` of the mixture in ``epoch``. pixels=False: tile counts and tokens only
        (image headers and video frame counts are read, no pixel is decoded), for statistics."""
        source, line = self.locate(index)
        return self.load_line(source, line, random.Random(f"{self.seed}:{epoch}:{index}"), pixels)

    def cost(self, index: int, tile_cost: float = 0.0) -> float:
        """Estimated compute of sample ``index`` in LLM tokens: its tokens plus ``tile_cost`` per
        tile (0 for a sample that is skipped). Reads image headers and tokenizes, decodes no pixels."""
        sample = self.load(index, 0, pixels=False)
        if not isinstance(sample, (EncodedSample, PairSample)):
            return 0.0
        return float(len(sample) + tile_cost * sum(sample.num_tiles))

    def load_line(self, source: SourceDataset, line: int, rng: random.Random, pixels: bool = True):
        """Line ``line`` of one source, encoded; a bad line is a Skipped (or raises, on_error=raise)."""
        record = source.records[line]
        try:
            try:
                return self._build(source, record, rng, pixels)
            except (SampleError, UserError):
                raise
            except Exception as e:  # any other failure of this one record: the loader must not die of it
                raise unreadable(record, e) from e
        except SampleError as e:
            if self.cfg.on_error == "raise":
                raise UserError(f"{record.where()}: {e}") from (e.__cause__ if e.reason == BAD_RECORD else None)
            return Skipped(e.reason, record.where(), str(e), source.name)

    def _frames(self, d: DatasetConfig) -> tuple[int, int]:
        lo = d.min_frames if d.min_frames is not None else self.cfg.min_frames
        hi = d.max_frames if d.max_frames is not None else self.cfg.max_frames
        return lo, hi

    def _build(self, source: SourceDataset, record, rng: random.Random, pixels: bool = True):
        frames_seed = rng.getrandbits(64)  # each video's own draws, equal with and without pixels
        if source.pairs:
            return self._build_pair(source, record, rng, frames_seed, pixels)
        conv = source.reader.to_conversation(record.parse(), source.root)
        conv.check()
        source.confine(conv, self.cfg.media_outside_root)
        media = self._media(source, conv, rng, frames_seed, pixels)
        return self._encode(source, conv, *media)

    def _build_pair(self, source: SourceDataset, record, rng: random.Random, frames_seed: int,
                    pixels: bool) -> PairSample:
        """A preference line: both answers encoded on the same prompt, its media loaded once."""
        chosen, rejected = source.reader.to_pair(record.parse(), source.root)
        chosen.check()
        rejected.check()
        tiles, num_tiles, frames_per_video, sizes = self._media(source, chosen, rng, frames_seed, pixels)
        c = self._encode(source, chosen, tiles, num_tiles, frames_per_video, sizes)
        r = self._encode(source, rejected, [], num_tiles, frames_per_video, sizes)
        if c.truncated or r.truncated:  # dropping turns would drop the answers the pair compares
            raise SampleError("too_long", f"a pair longer than data.max_seq_len={self.cfg.max_seq_len}")
        return PairSample(c, r, source.reader.reference_of(source.reference, record))

    def _encode(self, source: SourceDataset, conv, tiles, num_tiles, frames_per_video, image_sizes) -> EncodedSample:
        d = source.cfg
        template = get_template(d.template or self.cfg.template)
        system = d.system if d.system is not None else self.cfg.system
        input_ids, labels = self.encoder.encode(conv, template, num_tiles, system, frames_per_video, image_sizes)
        token_types = positions = None
        if self.layout.token_types:  # CogVLM: the visual expert's routing and its position-id rule
            token_types, positions = sample_token_types(input_ids, self.encoder.img_context)
        return EncodedSample(
            input_ids=input_ids,
            labels=labels,
            pixel_values=to_pixel_bytes(tiles) if tiles else None,
            num_tiles=num_tiles,
            dataset=source.name,
            truncated=self.encoder.last_truncated,
            token_type_ids=token_types,
            position_ids=positions,
            image_sizes=list(image_sizes),
        )

    def _media(self, source: SourceDataset, conv, rng: random.Random, frames_seed: int, pixels: bool = True):
        """(tiles, tiles per image or frame, frames per video, anyres images' (height, width)) of a
        conversation's media, in order."""
        d = source.cfg
        media = conv.media()
        per_image = tiles_per_image(len(conv.images), d.n_max) if conv.images else 0
        size = self.cfg.tile_size
        # JPEG re-encoding is training's augmentation: per dataset, else data.jpeg_augment (None: images only)
        jpeg = d.jpeg_augment if d.jpeg_augment is not None else self.cfg.jpeg_augment
        jpeg_images = self.training and jpeg is not False
        jpeg_frames = self.training and jpeg is True
        tiles, num_tiles, frames_per_video = [], [], []  # tiles: PIL images or (S, S, 3) uint8 tensors
        sizes: list[tuple[int, int]] = []
        anyres = self.layout.anyres
        for kind, src in media:
            if kind == "image" and self.image_mode == "anyres":
                if not pixels:
                    w, h = image_size(src)
                    num_tiles.append(anyres.num_tiles(h, w))
                else:
                    img = load_image(src)
                    w, h = img.size
                    img_tiles = anyres.tiles(img)
                    tiles += [jpeg_reencode(t, rng) for t in img_tiles] if jpeg_images else img_tiles
                    num_tiles.append(len(img_tiles))
                sizes.append((h, w))
            elif kind == "image" and self.image_mode != "tile":
                if not pixels:
                    image_size(src)  # the image must open, as with pixels
                    num_tiles.append(1)
                    continue
                tile = single_tile(load_image(src), self.image_mode, size, self.layout.mean,
                                   rng if self.training else None)
                tiles.append(jpeg_reencode(tile, rng) if jpeg_images else tile)
                num_tiles.append(1)
            elif kind == "image":
                if not pixels:
                    w, h = image_size(src)
                    cols, rows = choose_grid(w, h, d.min_tiles, per_image, size)
                    num_tiles.append(cols * rows + (1 if self.cfg.use_thumbnail and cols * rows > 1 else 0))
                    continue
                cached = source.tile_cache.get(src, source.root, per_image) if source.tile_cache else None
                if cached is not None:
                    img_tiles = cached
                elif self.cfg.fast_resize:
                    # grid from the header's size, decode no larger than the grid needs, torch resize
                    w, h = image_size(src)
                    grid = choose_grid(w, h, d.min_tiles, per_image, size)
                    img = load_image(src, draft_size=(grid[0] * size, grid[1] * size))
                    img_tiles = tile_image_fast(img, grid, size, self.cfg.use_thumbnail)
                else:
                    img_tiles = tile_image(load_image(src), d.min_tiles, per_image, size, self.cfg.use_thumbnail)
                if jpeg_images:
                    img_tiles = [jpeg_reencode(t, rng) for t in img_tiles]  # type: ignore[misc]  # PIL tiles here
                tiles += img_tiles
                num_tiles.append(len(img_tiles))
            else:
                if self.image_mode == "anyres":
                    raise SampleError("bad_media", NO_VIDEO)
                lo, hi = self._frames(d)
                video_rng = random.Random(frames_seed + len(frames_per_video)) if self.training else None
                if pixels:
                    frames = read_frames(src, lo, hi, video_rng)
                    if jpeg_frames:  # as the reference: the whole frame re-encoded, then resized
                        frames = [jpeg_reencode(f, rng) for f in frames]
                    if self.cfg.fast_resize:
                        frame_tiles = [tile_image_fast(f, (1, 1), size, False)[0] for f in frames]
                    else:
                        frame_tiles = [resize_bicubic(f, (size, size)) for f in frames]
                    tiles += frame_tiles
                    n = len(frame_tiles)
                else:
                    count_frames(src)  # the video must open, as with pixels
                    n = video_rng.randint(lo, hi) if video_rng is not None else hi
                frames_per_video.append(n)
                num_tiles += [1] * n
        return tiles, num_tiles, frames_per_video, sizes


def build_mixture(cfg, training: bool = True) -> tuple[MixtureDataset, object]:
    """(MixtureDataset, tokenizer) for a composed training config (model, data, seed), as training
    builds them: what the data tools (preview, stats) read."""
    from vlmtrain.models.build import load_tokenizer
    from vlmtrain.models.family import image_layout

    tokenizer = load_tokenizer(cfg.model)
    return MixtureDataset(cfg.data, tokenizer, image_layout(cfg.model), cfg.seed, training=training), tokenizer
