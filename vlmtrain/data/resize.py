"""PIL's bicubic resize (what InternVL's tiling uses), faster and within 2 grey levels of it.

PIL resizes in two one-axis passes, each rounded to uint8: horizontal then vertical, except that
Pillow >= 13 runs the vertical pass first when the height shrinks more than twice as much as the
width. torch's antialiased bicubic on uint8 uses the same filter (it was ported from Pillow-SIMD)
and gives each one-axis pass within 1 level of PIL's, several times faster; two torch passes in a
row could drift by 3 (the second pass's negative lobes add up the first pass's errors).
So ``resize_bicubic`` follows PIL's pass order and runs the costlier pass in torch and the other
one in PIL:

- torch first, PIL second: PIL's pass sums the first pass's errors (each <= 1) with weights whose
  absolute values add up to at most 1.25, so the result is within 2 levels of PIL's;
- PIL first, torch second: the only error is torch's own rounding, within 1 level.

Moving pixels between PIL and torch costs a copy; the cost model counts it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC
PILLOW_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13
"""Pillow 13 picks the pass order by shape; earlier Pillows always resize horizontally first."""

# relative costs measured with experiments/bench/data_pipeline.py's images: one PIL filter tap
# per output pixel is 1; torch's uint8 kernel is about 5x cheaper; a PIL <-> numpy copy per pixel
TORCH_TAP, TO_TORCH, TO_PIL = 0.2, 2.0, 1.0


def vertical_first(w: int, h: int, ow: int, oh: int) -> bool:
    """Whether PIL resizes (w, h) -> (ow, oh) vertically first."""
    return PILLOW_VERTICAL_FIRST and (h - oh) > 0 and (h - oh) > (w - ow) * 2


def _taps(n_in: int, n_out: int) -> int:
    """Filter taps per output pixel of one bicubic pass (PIL's ksize)."""
    return math.ceil(2.0 * max(n_in / n_out, 1.0)) * 2 + 1


class Pixels:
    """One image as PIL and, made once when first needed, as a (1, 3, H, W) uint8 tensor
    (channels-last memory, the layout torch's kernel reads), shared by its resizes."""

    def __init__(self, image: Image.Image):
        self.image = image if image.mode == "RGB" else image.convert("RGB")
        self._tensor = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = _to_tensor(self.image)
        return self._tensor


def _to_tensor(image: Image.Image) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only view of PIL's bytes; torch never writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None]


def _torch_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    w, h = size
    if x.shape[2:] == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


def _hwc(x: torch.Tensor) -> torch.Tensor:
    return x[0].permute(1, 2, 0)


def resize_bicubic(src: Pixels | Image.Image, size: tuple[int, int]) -> torch.Tensor | Image.Image:
    """``src`` resized to ``size`` (w, h) like PIL's bicubic, within 2 levels of it. Returns a PIL
    image or an (h, w, 3) uint8 tensor, whichever the cheaper split produced."""
    src = src if isinstance(src, Pixels) else Pixels(src)
    (w, h), (ow, oh) = src.size, size
    if (w, h) == (ow, oh):
        return src.image
    if w == ow or h == oh:
        return src.image.resize(size, BICUBIC)  # one pass: PIL itself
    if vertical_first(w, h, ow, oh):
        mid = (w, oh)
        first, second = w * oh * _taps(h, oh), ow * oh * _taps(w, ow)
    else:
        mid = (ow, h)
        first, second = ow * h * _taps(w, ow), ow * oh * _taps(h, oh)
    to_torch = 0 if src._tensor is not None else TO_TORCH * w * h
    costs = {
        "pil": first + second,
        "torch_first": to_torch + TORCH_TAP * first + TO_PIL * mid[0] * mid[1] + second,
        "torch_second": first + TO_TORCH * mid[0] * mid[1] + TORCH_TAP * second,
    }
    best = min(costs, key=costs.get)
    if best == "pil":
        return src.image.resize(size, BICUBIC)
    if best == "torch_first":
        m = _hwc(_torch_resize(src.tensor(), mid)).contiguous().numpy()
        return Image.fromarray(m).resize(size, BICUBIC)
    return _hwc(_torch_resize(_to_tensor(src.image.resize(mid, BICUBIC)), size))
