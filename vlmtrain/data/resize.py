"""PIL's bicubic resize (what InternVL's tiling uses), done by torch within 2 grey levels of it.

PIL resizes in two one-axis passes, each rounded and clipped to uint8: horizontally then
vertically, except that Pillow >= 13 runs the vertical pass first when the height shrinks more
than twice as much as the width (older Pillows, which the makers' environment had, always go
horizontally first). torch's antialiased bicubic on uint8 uses the same filter (ported from
Pillow-SIMD) with slightly coarser fixed-point weights, so each of its one-axis passes is within
1 level of PIL's. ``resize_bicubic`` runs torch's passes in PIL's order; then the result is within
2 levels: the second pass sees inputs at most 1 off and sums them with weights whose absolute
values add up to at most 1.27 (``tests/test_pixels.py`` checks that bound on PIL's own
coefficients), so before rounding the two differ by less than 1.3, and after it by at most 2.
In the other order the rounding and clipping between the passes differ and hard edges can be
tens of levels off.
"""

from __future__ import annotations

import warnings

import PIL
import torch
import torch.nn.functional as F
from PIL import Image

from vlmtrain.data.images import rgb_array

PILLOW_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13
"""Pillow 13 picks the pass order by shape; earlier Pillows always resize horizontally first."""


def vertical_first(w: int, h: int, ow: int, oh: int) -> bool:
    """Whether PIL resizes (w, h) -> (ow, oh) vertically first."""
    return PILLOW_VERTICAL_FIRST and (h - oh) > 0 and (h - oh) > (w - ow) * 2


class Pixels:
    """An image as a (1, 3, H, W) uint8 tensor in channels-last memory (the layout torch's kernel
    reads), made once and shared by the image's resizes (its grid and its thumbnail)."""

    def __init__(self, image: Image.Image):
        self.size = image.size
        with warnings.catch_warnings():  # a read-only view of PIL's bytes; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            self.tensor = torch.from_numpy(rgb_array(image)).permute(2, 0, 1)[None]


def _bicubic(x: torch.Tensor, w: int, h: int) -> torch.Tensor:
    if x.shape[2:] == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


def resize_bicubic(src: Pixels | Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """``src`` resized to ``size`` (w, h) as PIL's bicubic would, within 2 grey levels; an
    (h, w, 3) uint8 tensor."""
    src = src if isinstance(src, Pixels) else Pixels(src)
    (w, h), (ow, oh) = src.size, size
    x = src.tensor
    if ow != w and oh != h and vertical_first(w, h, ow, oh):
        x = _bicubic(x, w, oh)  # torch alone would go horizontally first
    return _bicubic(x, ow, oh)[0].permute(1, 2, 0)
