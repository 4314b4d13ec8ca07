"""Pixels: decode, random JPEG re-encoding, normalisation."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmtrain.data.conversation import SampleError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_QUALITY = (75, 100)


def load_image(src) -> Image.Image:
    """Decode an image from a path or bytes into RGB; a missing or corrupt file is a SampleError."""
    try:
        if isinstance(src, (bytes, bytearray)):
            img = Image.open(io.BytesIO(src))
        else:
            img = Image.open(Path(src))
        img.load()
    except FileNotFoundError:
        raise SampleError("missing_media", f"image not found: {src}") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise SampleError("corrupt_media", f"cannot decode image {src if not isinstance(src, bytes) else '<bytes>'}: {e}") from None
    return img.convert("RGB")


def image_size(src) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else Path(src)) as img:
            return img.size
    except FileNotFoundError:
        raise SampleError("missing_media", f"image not found: {src}") from None
    except Exception as e:
        raise SampleError("corrupt_media", f"cannot read image {src if not isinstance(src, bytes) else '<bytes>'}: {e}") from None


def jpeg_reencode(img: Image.Image, rng: random.Random) -> Image.Image:
    """InternVL 2.5's augmentation: re-encode as JPEG with quality uniform over 75..100."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(*JPEG_QUALITY))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


def to_pixel_values(tiles: list[Image.Image]) -> torch.Tensor:
    """Tiles of equal size -> (N, 3, S, S) float32, ImageNet-normalised, in one vectorised pass."""
    arr = np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])  # N, S, S, 3
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    return (x - _MEAN) / _STD
