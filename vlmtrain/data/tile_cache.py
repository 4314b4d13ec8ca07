"""Pre-tiled images: a dataset's tiles decoded, resized and cut once, read back from a memory map.

    python -c "from vlmtrain.data.tile_cache import build_tile_cache; build_tile_cache('ann.jsonl', 'ann.tiles', tile_size=224, n_max=1)"
    python -m vlmtrain ... +data.datasets.NAME.tile_cache=ann.tiles

Decoding and tiling are most of a sample's CPU time on small images (about 2.3 of 3.2 ms for a
300 px synthetic image at one 224 px tile); a training run that sees every image many times can
pay them once. The cache holds exactly the tiles ``MixtureDataset`` would make (the same
``tile_image`` call on the same decoded image), before the random JPEG augmentation, which still
runs per sample. A cache is a folder: ``tiles.npy`` ((N, S, S, 3) uint8, opened as a read-only
memory map, so loader workers and concurrent runs share the page cache) and ``index.json`` (the
tiling settings it was built with, and ``relative image path|tile budget -> [first row, count]``).
A run whose tiling settings differ from the cache's is a ``UserError``; an image the cache lacks is
decoded as without a cache.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from vlmtrain.errors import UserError

INDEX, TILES = "index.json", "tiles.npy"


def cache_key(src, root) -> str:
    """An image's key: its path relative to the dataset's media root."""
    return os.path.relpath(src, root)


def settings(tile_size: int, n_max: int, min_tiles: int, use_thumbnail: bool) -> dict:
    return {"tile_size": int(tile_size), "n_max": int(n_max), "min_tiles": int(min_tiles),
            "use_thumbnail": bool(use_thumbnail), "fast_resize": False}


def _images(annotation: Path, fmt: str | None, root: Path | None, n_max: int):
    """(relative path, absolute path, tile budget) of every image of every line, in order."""
    from vlmtrain.data.formats import guess_format, reader
    from vlmtrain.data.tiling import tiles_per_image

    fmt = fmt or guess_format(annotation)
    rd = reader(fmt)
    root = root or (annotation if annotation.is_dir() else annotation.parent)
    seen = set()
    for record in rd.read(annotation):
        conv = rd.to_conversation(record.parse(), root)
        if not conv.images:
            continue
        budget = tiles_per_image(len(conv.images), n_max)
        for src in conv.images:
            if isinstance(src, (bytes, bytearray)):
                continue
            key = f"{cache_key(src, root)}|{budget}"
            if key not in seen:
                seen.add(key)
                yield key, str(src), budget


def _count(job) -> list[int]:
    from vlmtrain.data.images import image_size
    from vlmtrain.data.tiling import choose_grid

    items, s = job
    out = []
    for _, src, budget in items:
        cols, rows = choose_grid(*image_size(src), s["min_tiles"], budget, s["tile_size"])
        out.append(cols * rows + (1 if s["use_thumbnail"] and cols * rows > 1 else 0))
    return out


def _fill(job) -> int:
    from vlmtrain.data.images import load_image
    from vlmtrain.data.tiling import tile_image

    path, items, starts, s = job
    tiles = np.load(path, mmap_mode="r+")
    for (_, src, budget), start in zip(items, starts):
        for i, t in enumerate(tile_image(load_image(src), s["min_tiles"], budget, s["tile_size"], s["use_thumbnail"])):
            tiles[start + i] = np.asarray(t, dtype=np.uint8)
    tiles.flush()
    return len(items)


def build_tile_cache(annotation, out, *, tile_size: int, n_max: int, min_tiles: int = 1,
                     use_thumbnail: bool = True, fmt: str | None = None, root=None, procs: int = 1) -> Path:
    """Tile every image of ``annotation`` as training would (``data.tile_size``, the dataset's n_max
    and min_tiles, ``data.use_thumbnail``) into the cache folder ``out``; return it. ``procs``
    processes decode in parallel."""
    annotation, out = Path(annotation), Path(out)
    s = settings(tile_size, n_max, min_tiles, use_thumbnail)
    items = list(_images(annotation, fmt, Path(root) if root else None, n_max))
    procs = max(1, min(procs, len(items) or 1))
    chunks = [items[i * len(items) // procs:(i + 1) * len(items) // procs] for i in range(procs)]
    with ProcessPoolExecutor(procs) as pool:
        counts = [c for part in pool.map(_count, [(ch, s) for ch in chunks]) for c in part]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        out.mkdir(parents=True, exist_ok=True)
        (out / INDEX).unlink(missing_ok=True)  # the index is written last: its presence means complete
        arr = np.lib.format.open_memmap(out / TILES, mode="w+", dtype=np.uint8,
                                        shape=(int(starts[-1]), tile_size, tile_size, 3))
        del arr
        jobs, k = [], 0
        for ch in chunks:
            jobs.append((str(out / TILES), ch, starts[k:k + len(ch)].tolist(), s))
            k += len(ch)
        sum(pool.map(_fill, jobs))
    index = {key: [int(starts[i]), int(counts[i])] for i, (key, _, _) in enumerate(items)}
    (out / INDEX).write_text(json.dumps({"settings": s, "tiles": index}))
    return out


class TileCache:
    """A built cache, opened lazily (after a loader worker forks, each maps the file itself)."""

    def __init__(self, path, expected: dict, where: str):
        self.path = Path(path).expanduser()
        if not (self.path / INDEX).is_file():
            raise UserError(f"{where}: {self.path} is not a complete tile cache (no {INDEX}; "
                            f"build it with vlmtrain.data.tile_cache.build_tile_cache)")
        meta = json.loads((self.path / INDEX).read_text())
        if meta["settings"] != expected:
            diff = {k: (meta["settings"].get(k), v) for k, v in expected.items() if meta["settings"].get(k) != v}
            raise UserError(f"{where}: {self.path} was built with other tiling settings (cache, run): {diff}")
        self.index: dict[str, list[int]] = meta["tiles"]
        self._tiles: np.ndarray | None = None  # memory-mapped on first use
        self.hits = 0

    def __getstate__(self) -> dict:
        # a loader started with "spawn" pickles the dataset: ship the index, not the mapped tiles
        return {**self.__dict__, "_tiles": None}

    def get(self, src, root, budget: int) -> list[np.ndarray] | None:
        """The (S, S, 3) uint8 tiles of image ``src`` at tile budget ``budget``; None if not cached."""
        if isinstance(src, (bytes, bytearray)):
            return None
        hit = self.index.get(f"{cache_key(src, root)}|{budget}")
        if hit is None:
            return None
        if self._tiles is None:
            self._tiles = np.load(self.path / TILES, mmap_mode="r")
        start, count = hit
        self.hits += 1
        return [np.array(self._tiles[start + i]) for i in range(count)]
