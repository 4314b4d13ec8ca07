"""Pixels: decode, random JPEG re-encoding, normalisation."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmtrain.data.conversation import SampleError
from vlmtrain.data.placeholders import IMAGENET_MEAN, IMAGENET_STD

JPEG_QUALITY = (75, 100)


def load_image(src, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image from a path or bytes into RGB; a missing or corrupt file is a SampleError.

    ``draft_size``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers
    this size, which is several times faster for photos much larger than their tiles.
    """
    try:
        if isinstance(src, (bytes, bytearray)):
            img = Image.open(io.BytesIO(src))
        else:
            img = Image.open(Path(src))
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
    except FileNotFoundError:
        raise SampleError("missing_media", f"image not found: {src}") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise SampleError("corrupt_media", f"cannot decode image {src if not isinstance(src, bytes) else '<bytes>'}: {e}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. PIL's own ``convert("RGB")`` clips the integer modes of 16-bit PNGs
    (``I;16``, ``I``) at 255, so a 16-bit image comes out white; these are scaled to 8 bits
    instead (``F``: 0..1 floats are scaled, others clipped). Every other mode converts as PIL does."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        elif img.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
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


def jpeg_reencode(img, rng: random.Random) -> Image.Image:
    """InternVL 2.5's augmentation: re-encode as JPEG with quality uniform over 75..100.
    ``img``: a PIL image or an (S, S, 3) uint8 tensor/array."""
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(*JPEG_QUALITY))
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return to_rgb(out)


def rgb_array(img: Image.Image) -> np.ndarray:
    """An RGB image's pixels as a read-only (H, W, 3) uint8 array, in one copy: ``np.asarray``
    goes through ``Image.tobytes``, which packs the image in 64 KB pieces and joins them (two
    copies, and most of the conversion's time for a photo)."""
    if img.mode != "RGB":
        return np.asarray(to_rgb(img))
    img.load()
    w, h = img.size
    encoder = Image._getencoder("RGB", "raw", "RGB")
    try:
        encoder.setimage(img.im, (0, 0, w, h))
        _, status, data = encoder.encode(w * h * 3)
    finally:
        encoder.cleanup()
    if status != 1 or len(data) != w * h * 3:  # not in one piece: Pillow's own way
        return np.asarray(img)
    return np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)


def to_pixel_bytes(tiles) -> torch.Tensor:
    """Tiles of equal size (PIL images or (S, S, 3) uint8 arrays/tensors) -> (N, 3, S, S) uint8.

    This is what the data loader ships: a quarter of float32's bytes through worker shared memory,
    pinning and the host-to-device copy (a 224 px tile is 150 KB, not 600 KB). The model normalises
    on the device (``normalize_pixels``, called by ``vlmtrain.models.internvl.encode_images``)."""
    arrays = [t.numpy() if isinstance(t, torch.Tensor) else rgb_array(t) if isinstance(t, Image.Image)
              else np.asarray(t, dtype=np.uint8) for t in tiles]
    out = np.empty((len(arrays), 3, arrays[0].shape[0], arrays[0].shape[1]), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a.transpose(2, 0, 1)
    return torch.from_numpy(out)


def normalize_pixels(pixels: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32, (x / 255 - mean) / std (ImageNet's by default, a family's
    ``ImageLayout.mean/std`` otherwise), on the tensor's device. Float input is taken as already
    normalised and returned as it is."""
    if pixels.is_floating_point():
        return pixels
    mean, inv_std = _normalisation(pixels.device, tuple(mean), tuple(std))
    return (pixels.float() - mean) * inv_std


_NORMALISATION: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalisation(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(255 mean, 1 / (255 std)) as (3, 1, 1) tensors on ``device``, made once per device: a fresh
    host-to-device copy on every training step would make the host wait for the GPU's queue."""
    key = (device, mean, std)
    if key not in _NORMALISATION:
        m = torch.tensor(mean, device=device).view(3, 1, 1) * 255
        _NORMALISATION[key] = (m, 1 / (torch.tensor(std, device=device).view(3, 1, 1) * 255))
    return _NORMALISATION[key]


def to_pixel_values(tiles, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Tiles -> (N, 3, S, S) float32, normalised on the host: what transformers' native classes
    take (generation, export checks)."""
    return normalize_pixels(to_pixel_bytes(tiles), mean, std)
