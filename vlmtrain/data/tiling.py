"""InternVL dynamic high resolution: cut an image into a grid of square tiles.

An image of any size becomes ``cols * rows`` tiles of ``tile_size`` px (448 for InternViT),
plus a whole-image thumbnail when there is more than one tile, so the ViT always sees its
native resolution and the LLM sees ``256 * len(tiles)`` image tokens. The grid rule must match
InternVL exactly: a checkpoint trained on one tiling sees shifted token counts and distorted
tiles with another (``tests/golden/tiling_grid.json`` pins it).
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlmtrain.data.resize import Pixels, resize_bicubic
from vlmtrain.errors import UserError


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with ``min_tiles <= cols * rows <= max_tiles``, fewest tiles first.

    Grids with the same tile count are ordered by cols, as transformers' InternVL image processor
    has them. InternVL's own code sorts a Python set, whose order within one tile count differs;
    the choice can only differ on an exact aspect-ratio tie between two grids with the same tile
    count and nothing closer allowed, which needs ``min_tiles > 1`` (e.g. min = max = 4 and a
    5:2 image: 2x2 here and in transformers, 4x1 in InternVL's code; ``tests/test_tiling.py``).
    """
    if not 1 <= min_tiles <= max_tiles:
        raise UserError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles // cols + 1)
        if cols * rows >= min_tiles
    ]
    return tuple(sorted(grids, key=lambda g: (g[0] * g[1], g[0])))


def choose_grid(
    width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int = 448
) -> tuple[int, int]:
    """Return the (cols, rows) grid InternVL picks for a ``width`` x ``height`` image.

    The grid whose cols/rows is closest to width/height wins. On an exact tie with an earlier
    (smaller) grid, the later grid takes over only if the image has more than half the pixels
    the larger grid would hold, so small images are not blown up. Ratios are compared as floats,
    like the reference: exact rational arithmetic disagrees with it on a few sizes (e.g. 520x1248,
    max 6) where float rounding breaks a mathematical tie, and parity with released checkpoints
    matters more than the tie itself.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_image(
    image: Image.Image,
    min_tiles: int,
    max_tiles: int,
    tile_size: int = 448,
    use_thumbnail: bool = True,
    exact: bool = False,
) -> list:
    """Cut ``image`` into the tiles the vision tower sees, row-major, thumbnail last.

    As the reference: one bicubic resize to the whole grid, then crops; the thumbnail a bicubic
    resize of the original. ``exact``: PIL's resize itself, pixel for pixel; default:
    ``resize_bicubic``, within 2 grey levels of it and faster. Tiles are PIL images or (S, S, 3)
    uint8 tensors (views of one canvas), which ``images.to_pixel_bytes`` both take.
    """
    image = image if image.mode == "RGB" else image.convert("RGB")
    cols, rows = choose_grid(image.width, image.height, min_tiles, max_tiles, tile_size)
    if exact:
        def resize(size):
            return image.resize(size, Image.Resampling.BICUBIC)
    else:
        src = Pixels(image)

        def resize(size):
            return resize_bicubic(src, size)
    canvas = resize((tile_size * cols, tile_size * rows))
    tiles = [_crop(canvas, c * tile_size, r * tile_size, tile_size) for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(resize((tile_size, tile_size)))
    return tiles


def _crop(canvas, x: int, y: int, size: int):
    if isinstance(canvas, Image.Image):
        return canvas.crop((x, y, x + size, y + size))
    return canvas[y:y + size, x:x + size]


def tile_image_fast(
    image: Image.Image, grid: tuple[int, int], tile_size: int = 448, use_thumbnail: bool = True
) -> list[torch.Tensor]:
    """The opt-in approximate path (``data.fast_resize``): one torch antialiased bicubic resize of
    ``image``, which the caller may have decoded at a reduced JPEG scale (``load_image(draft_size=)``);
    ``grid`` is (cols, rows), chosen from the original image size. Not the reference's pixels:
    README "Pixels" gives the measured deviation.

    Returns (S, S, 3) uint8 tiles (views of one canvas), row-major, then the thumbnail.
    """
    cols, rows = grid
    x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]  # channels-last strides
    canvas = F.interpolate(x, size=(rows * tile_size, cols * tile_size), mode="bicubic", antialias=True,
                           align_corners=False)[0].permute(1, 2, 0).contiguous()  # H, W, 3 (as PIL lays it out)
    s = tile_size
    tiles = [canvas[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
    if use_thumbnail and rows * cols > 1:
        thumb = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False)
        tiles.append(thumb[0].permute(1, 2, 0).contiguous())
    return tiles


def tiles_per_image(num_images: int, n_max: int) -> int:
    """Tile budget per image of a multi-image sample: the dataset's n_max shared, at least 1.

    Keeps a sample with many images from exploding the sequence length; the thumbnail comes on
    top of this count.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    return max(1, n_max // num_images)


IMAGE_MODES = ("tile", "anyres", "pad", "crop", "resize", "random_crop")
"""``data.image_mode``: ``tile`` is InternVL's dynamic tiling above, ``anyres`` LLaVA-NeXT's grids
(``vlmtrain.data.anyres``, the model's pinpoints); the others give one tile (``single_tile``)."""


def check_image_mode(mode: str, layout=None) -> str:
    """``mode`` if it is one of IMAGE_MODES and the model's ``layout`` can take it."""
    if mode not in IMAGE_MODES:
        raise UserError(f"data.image_mode must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
    if mode == "anyres" and layout is not None and layout.anyres is None:
        raise UserError("data.image_mode=anyres needs a model with anyres grids (LLaVA-NeXT: "
                        "model.family.image_grid_pinpoints)")
    return mode


def expand_to_square(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: pad the short side with ``colour``, the image centred (its
    offset is (long - short) // 2, as LLaVA's ``paste`` has it)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), colour)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def single_tile(image: Image.Image, mode: str, tile_size: int, mean=(0.0, 0.0, 0.0),
                rng: random.Random | None = None) -> Image.Image:
    """One ``tile_size`` square tile, as a single-tile family's processor makes it (PIL bicubic):

    - ``pad``: LLaVA-1.5's ``image_aspect_ratio=pad``: ``expand_to_square`` with the mean colour
      (``int(m * 255)`` per channel of the ViT's normalisation mean), then resized;
    - ``crop``: CLIPImageProcessor's: shortest side to ``tile_size``, then the centre crop;
    - ``resize``: squashed to the square (BLIP-2's / MiniGPT-4's eval processor);
    - ``random_crop``: MiniGPT-4's training processor (``blip2_image_train``), drawn from ``rng``
      (``random_resized_crop``); without an ``rng`` (evaluation, chat) its eval processor, ``resize``.
    """
    image = image if image.mode == "RGB" else image.convert("RGB")
    bicubic = Image.Resampling.BICUBIC
    if mode == "random_crop" and rng is not None:
        return random_resized_crop(image, tile_size, rng)
    if mode == "pad":
        image = expand_to_square(image, tuple(int(m * 255) for m in mean))
        return image.resize((tile_size, tile_size), bicubic)
    if mode in ("resize", "random_crop"):
        return image.resize((tile_size, tile_size), bicubic)
    if mode == "crop":
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(tile_size * long / short)  # transformers' get_resize_output_image_size
        size = (tile_size, new_long) if w <= h else (new_long, tile_size)
        image = image.resize(size, bicubic)
        w, h = image.size
        left, top = (w - tile_size) // 2, (h - tile_size) // 2
        return image.crop((left, top, left + tile_size, top + tile_size))
    raise UserError(f"data.image_mode {mode!r} does not give a single tile")


def random_resized_crop(image: Image.Image, tile_size: int, rng: random.Random, scale=(0.5, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's ``RandomResizedCrop(tile_size, scale, ratio, BICUBIC)``, as BLIP-2's and
    MiniGPT-4's ``blip2_image_train`` use it (scale 0.5-1, no flip): up to 10 draws of an area
    fraction (uniform in ``scale``) and an aspect (log-uniform in ``ratio``) until the box fits,
    at a uniform position; else the centre crop of the nearest allowed aspect. The box is cropped,
    then resized (PIL bicubic). The draws come from the sample's own ``rng``, so a sample's crop
    is reproducible (the reference draws from torch's global generator)."""
    width, height = image.size
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:
        if width / height < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif width / height > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return image.crop((left, top, left + w, top + h)).resize((tile_size, tile_size), Image.Resampling.BICUBIC)
