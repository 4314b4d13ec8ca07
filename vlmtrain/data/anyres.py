"""LLaVA-NeXT's "anyres": an image as a grid of square tiles at one of a few pinned resolutions,
plus a squashed whole-image tile, and the token count its unpadded feature map gives.

The reference is what the released ``llava-hf/llava-v1.6-*`` checkpoints were shown, through
transformers' ``LlavaNextImageProcessor`` and ``LlavaNextProcessor`` (``tests/test_family_llava_next.py``
holds vlmtrain to both, pixel for pixel and token for token):

- the best resolution (``select_best_resolution``): of the pinpoints (height, width), the one whose
  aspect-preserving downscale of the image keeps the most pixels (never more than the image has),
  then the one that wastes the fewest;
- the image resized (PIL bicubic) to fit it, aspect kept (the long side fills it, the other side
  ``ceil``), centred on a black canvas of that resolution, cut into ``tile_size`` tiles row-major;
- the base tile: the whole image squashed to ``tile_size`` square, *first*;
- tokens: the base tile's ``patches**2`` features, then the grid's feature map with the rows or
  columns that show only padding removed (``unpad``), each remaining row followed by one
  ``image_newline``: ``patches**2 + rows * (cols + 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from vlmtrain.errors import UserError

NO_VIDEO = "a video, and image_mode=anyres (LLaVA-NeXT) takes images only"
"""Why a video is refused under anyres (a counted ``bad_media`` skip in training, an error in chat)."""


@dataclass(frozen=True)
class AnyRes:
    pinpoints: tuple[tuple[int, int], ...]
    """The resolutions a grid may have, (height, width) in pixels, each a multiple of ``tile_size``."""
    tile_size: int
    """The ViT's input side (336 for CLIP ViT-L/14-336)."""
    patches: int
    """ViT patches per tile side (image_size // patch_size: 24)."""

    def __post_init__(self):
        if not self.pinpoints:
            raise UserError("image_grid_pinpoints is empty: anyres needs at least one resolution")
        for h, w in self.pinpoints:
            if h <= 0 or w <= 0 or h % self.tile_size or w % self.tile_size:
                raise UserError(f"image_grid_pinpoints: {[h, w]} is not a multiple of the tile size {self.tile_size}")

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        """The pinpoint (height, width) an image of this size is laid out at."""
        best, best_kept, best_waste = self.pinpoints[0], -1, math.inf
        for h, w in self.pinpoints:
            scale = min(w / width, h / height)
            kept = min(int(width * scale) * int(height * scale), width * height)
            waste = h * w - kept
            if kept > best_kept or (kept == best_kept and waste < best_waste):
                best, best_kept, best_waste = (h, w), kept, waste
        return best

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of this size (the base tile not counted)."""
        h, w = self.best_resolution(height, width)
        return h // self.tile_size, w // self.tile_size

    def num_tiles(self, height: int, width: int) -> int:
        rows, cols = self.grid(height, width)
        return rows * cols + 1

    def tokens(self, height: int, width: int) -> int:
        """Image tokens of an image of this size: base features, then the unpadded grid's rows,
        each with its newline."""
        rows, cols = self.grid(height, width)
        cur_h, cur_w = rows * self.patches, cols * self.patches
        if width / height > cur_w / cur_h:  # wider than the grid: padding rows at top and bottom
            cur_h -= 2 * ((cur_h - int(round(height * (cur_w / width), 7))) // 2)
        else:
            cur_w -= 2 * ((cur_w - int(round(width * (cur_h / height), 7))) // 2)
        return self.patches ** 2 + cur_h * (cur_w + 1)

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """The base tile, then the grid's tiles row-major (``num_tiles`` of them)."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        width, height = image.size
        target_h, target_w = self.best_resolution(height, width)
        scale_w, scale_h = target_w / width, target_h / height
        if scale_w < scale_h:
            new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
        else:
            new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
        bicubic = Image.Resampling.BICUBIC
        canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
        canvas.paste(image.resize((new_w, new_h), bicubic), ((target_w - new_w) // 2, (target_h - new_h) // 2))
        s = self.tile_size
        grid = [canvas.crop((x, y, x + s, y + s)) for y in range(0, target_h, s) for x in range(0, target_w, s)]
        return [image.resize((s, s), bicubic), *grid]
