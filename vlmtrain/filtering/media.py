"""Media rules: unreadable, tiny or extreme-aspect images, exact and near-duplicate images, and
videos whose frames do not decode.

A ``MediaProbe`` decodes each image of a sample once (fully: a truncated file whose header reads
fine fails here, where training would fail later) and records its size, a SHA-256 of its bytes
and a perceptual hash (``imagehash.phash``, 64 bits), shared by every media rule.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from PIL import Image

from vlmtrain.filtering.rules import Finding, Rule, Sample


@dataclass
class ImageInfo:
    name: str
    error: str = ""
    width: int = 0
    height: int = 0
    sha256: str = ""
    phash: str = ""
    """64-bit perceptual (DCT) hash as 16 hex digits."""
    dhash: str = ""
    """64-bit difference (gradient) hash: confirms a pHash match."""


def _describe(src) -> str:
    return "<bytes>" if isinstance(src, (bytes, bytearray)) else str(src)


def probe_image(src) -> ImageInfo:
    import imagehash

    info = ImageInfo(_describe(src))
    try:
        data = bytes(src) if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()
    except OSError as e:
        info.error = f"cannot read: {e.strerror or e}"
        return info
    info.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            info.width, info.height = img.size
            rgb = img.convert("RGB")
            info.phash, info.dhash = str(imagehash.phash(rgb)), str(imagehash.dhash(rgb))
    except Exception as e:  # PIL raises many types for corrupt data
        info.error = f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return info


class MediaProbe:
    """The images of one sample, probed on first use; recent paths are remembered across samples
    (a VQA set asks many questions about one image)."""

    _recent: OrderedDict = OrderedDict()
    RECENT = 1024

    def __init__(self, images: Sequence):
        self._srcs, self._images = list(images), cast("list[ImageInfo] | None", None)

    @property
    def images(self) -> list[ImageInfo]:
        if self._images is None:
            self._images = [self._probe(s) for s in self._srcs]
        return self._images

    @classmethod
    def _probe(cls, src) -> ImageInfo:
        if isinstance(src, (bytes, bytearray)):
            return probe_image(src)
        key = str(src)
        if key in cls._recent:
            cls._recent.move_to_end(key)
            return cls._recent[key]
        info = cls._recent[key] = probe_image(src)
        if len(cls._recent) > cls.RECENT:
            cls._recent.popitem(last=False)
        return info


def _probe(sample: Sample) -> MediaProbe:
    if sample.media is None:
        sample.media = MediaProbe(sample.conv.images)
    return cast(MediaProbe, sample.media)


class ImageUnreadable(Rule):
    """An image whose bytes do not decode (truncated, corrupt, not an image)."""

    def check(self, sample: Sample) -> Finding | None:
        if not sample.conv.images:
            return None
        bad = [i for i in _probe(sample).images if i.error]
        return Finding(bool(bad), None, {"images": len(bad)}, f"{bad[0].name}: {bad[0].error}" if bad else "")


class ImageTiny(Rule):
    """An image with a side shorter than ``min_side`` pixels (tracking pixels, icons, thumbnails
    of nothing; InternVL upsamples it to a whole 448 px tile)."""

    def __init__(self, name: str = "", exempt: Sequence[str] = (), min_side: int = 16):
        super().__init__(name, exempt)
        self.min_side = min_side

    def check(self, sample: Sample) -> Finding | None:
        ok = [i for i in _probe(sample).images if not i.error] if sample.conv.images else []
        if not ok:
            return None
        small = min(ok, key=lambda i: min(i.width, i.height))
        side = min(small.width, small.height)
        return Finding(side < self.min_side, float(side), {"size": f"{small.width}x{small.height}",
                                                           "min_side": self.min_side},
                       small.name if side < self.min_side else "")


class ImageAspect(Rule):
    """An image whose long side is more than ``max_aspect`` times its short side (banners, strips:
    InternVL's tile grids stop at 1:n_max, so the content is squashed into a few pixels)."""

    def __init__(self, name: str = "", exempt: Sequence[str] = (), max_aspect: float = 25.0):
        super().__init__(name, exempt)
        self.max_aspect = max_aspect

    def check(self, sample: Sample) -> Finding | None:
        ok = [i for i in _probe(sample).images if not i.error and min(i.width, i.height) > 0] if sample.conv.images else []
        if not ok:
            return None
        worst = max(ok, key=lambda i: max(i.width, i.height) / min(i.width, i.height))
        aspect = max(worst.width, worst.height) / min(worst.width, worst.height)
        return Finding(aspect > self.max_aspect, aspect, {"size": f"{worst.width}x{worst.height}",
                                                         "max_aspect": self.max_aspect},
                       worst.name if aspect > self.max_aspect else "")


class CorpusRule(Rule):
    """A rule that needs every sample: ``features`` runs in the slices, ``decide`` at the merge."""

    kind = "corpus"

    def features(self, sample: Sample) -> dict | None:
        raise NotImplementedError

    def decide(self, items: Iterable[tuple[str, int, str, dict]]) -> dict[tuple[str, int], Finding]:
        """items: (dataset, index, where, features) in data order, for samples no rule has rejected."""
        raise NotImplementedError


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


class DuplicateImages(CorpusRule):
    """An image equal to (same bytes) or a near copy of (resized, re-encoded: pHash within
    ``max_distance`` bits of 64 and dHash within ``max_dhash_distance``) an image of an earlier
    sample; the first sample keeps it. The dHash check confirms a pHash match: plain synthetic
    images (a few shapes on a flat background) can be 4 pHash bits apart and still differ, while
    their copies stay within 3 dHash bits.

    ``scope``: ``dataset`` (compare within each dataset) or ``mixture`` (across all of them).
    ``same_query_only``: a duplicate counts only when the user turns are also the same, for sets
    that ask many questions about one image. Near copies are found through a multi-index (the
    hash cut into max_distance + 1 bands: two hashes within the distance share a band), so the
    merge costs about one lookup per image, not one comparison per pair.
    """

    def __init__(self, name: str = "", exempt: Sequence[str] = (), max_distance: int = 4,
                 max_dhash_distance: int | None = 8, scope: str = "dataset", same_query_only: bool = False):
        super().__init__(name, exempt)
        if scope not in ("dataset", "mixture"):
            raise ValueError(f"scope must be dataset or mixture, got {scope!r}")
        if not 0 <= max_distance < 32:
            raise ValueError(f"max_distance must be in [0, 32), got {max_distance}")
        self.max_distance, self.scope, self.same_query_only = max_distance, scope, same_query_only
        self.max_dhash_distance = max_dhash_distance
        bands = max_distance + 1
        edges = [round(64 * k / bands) for k in range(bands + 1)]
        self._bands = list(zip(edges[:-1], edges[1:]))

    def features(self, sample: Sample) -> dict | None:
        if not sample.conv.images:
            return None
        ok = [i for i in _probe(sample).images if not i.error]
        if not ok:
            return None
        out = {"sha256": [i.sha256 for i in ok], "phash": [i.phash for i in ok], "dhash": [i.dhash for i in ok]}
        if self.same_query_only:
            out["query"] = hashlib.sha256("\x00".join(sample.queries).encode()).hexdigest()[:16]
        return out

    def _band_keys(self, phash: str) -> list[tuple[int, int]]:
        bits = int(phash, 16)
        return [(k, (bits >> lo) & ((1 << (hi - lo)) - 1)) for k, (lo, hi) in enumerate(self._bands)]

    def decide(self, items):
        indexes: dict = {}
        out = {}
        for dataset, index, where, feats in items:
            if not feats:
                continue
            scope = dataset if self.scope == "dataset" else ""
            exact, bands, hashes = indexes.setdefault((scope, feats.get("query")), ({}, {}, []))
            hit = None
            for sha, ph, dh in zip(feats["sha256"], feats["phash"], feats["dhash"]):
                if sha in exact:
                    hit = (exact[sha], 0, "exact")
                    break
                for key in self._band_keys(ph):
                    for j in bands.get(key, ()):
                        d = hamming(ph, hashes[j][0])
                        if d <= self.max_distance and (hit is None or d < hit[1]) and (
                                self.max_dhash_distance is None or hamming(dh, hashes[j][2]) <= self.max_dhash_distance):
                            hit = (hashes[j][1], d, "near")
                if hit:
                    break
            if hit:
                out[(dataset, index)] = Finding(True, float(hit[1]), {"duplicate_of": hit[0], "kind": hit[2],
                                                                      "max_distance": self.max_distance})
                continue
            for sha, ph, dh in zip(feats["sha256"], feats["phash"], feats["dhash"]):
                exact.setdefault(sha, where)
                hashes.append((ph, where, dh))
                for key in self._band_keys(ph):
                    bands.setdefault(key, []).append(len(hashes) - 1)
        return out


class VideoFrames(Rule):
    """A video with no decodable frame, or fewer than ``min_share`` of the frames its container
    reports (decoding stops after ``max_frames`` frames, which is enough to find a broken stream)."""

    def __init__(self, name: str = "", exempt: Sequence[str] = (), min_share: float = 0.5, max_frames: int = 256):
        super().__init__(name, exempt)
        self.min_share, self.max_frames = min_share, max_frames

    def check(self, sample: Sample) -> Finding | None:
        if not sample.conv.videos:
            return None
        worst = None
        for src in sample.conv.videos:
            decoded, expected, error = decode_frames(src, self.max_frames)
            share = decoded / expected if expected else (1.0 if decoded else 0.0)
            fired = decoded == 0 or share < self.min_share
            f = Finding(fired, share, {"decoded": decoded, "frames": expected, "min_share": self.min_share},
                        f"{_describe(src)}: {error}" if fired and error else (_describe(src) if fired else ""))
            if worst is None or (f.fired, -f.score) > (worst.fired, -worst.score):  # type: ignore[operator]  # scored
                worst = f
        return worst


def decode_frames(src, max_frames: int) -> tuple[int, int, str]:
    """(frames decoded, frames expected, error): expected is min(container count, max_frames)."""
    import av

    try:
        container = av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src))
    except Exception as e:  # PyAV raises its own error types for corrupt data
        return 0, 0, f"cannot open: {e}"
    decoded, error = 0, ""
    with container:
        if not container.streams.video:
            return 0, 0, "no video stream"
        stream = container.streams.video[0]
        reported = int(stream.frames or 0)
        try:
            for _ in container.decode(stream):
                decoded += 1
                if decoded >= max_frames:
                    break
        except Exception as e:
            error = f"decode failed after {decoded} frames: {e}"
    expected = min(reported, max_frames) if reported else decoded
    return decoded, expected, error
