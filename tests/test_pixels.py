"""The default pixel path stays within 2 grey levels of InternVL's PIL path on every test image.

The reference (InternVL's ``dynamic_preprocess`` on a PIL decode): bicubic resize to the grid,
crops, bicubic thumbnail of the original (``tile_image(exact=True)``, pinned to PIL's resize in
test_tiling). The test set: JPEG and PNG, from 1x1 to 4k, extreme aspect ratios, photo-like
content and hard black/white edges (where PIL's rounding between passes matters most).
"""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_formats import data_cfg, tok, write_jsonl  # noqa: F401  (tok: fixture)

from vlmtrain.config import DatasetConfig
from vlmtrain.data.images import load_image, to_pixel_bytes
from vlmtrain.data.mixture import MixtureDataset
from vlmtrain.data.resize import PILLOW_VERTICAL_FIRST, Pixels, resize_bicubic, vertical_first
from vlmtrain.data.tiling import tile_image

SIZES = [(1, 1), (3, 2), (17, 13), (5, 900), (900, 5), (100, 60), (448, 448), (640, 480), (1080, 1920),
         (2000, 2001), (4000, 120), (90, 3000), (3840, 2160), (3024, 4032)]


def photo(w, h, rng):
    low = Image.fromarray(rng.integers(0, 255, (max(2, h // 48), max(2, w // 48), 3), dtype=np.uint8))
    img = np.asarray(low.resize((w, h), Image.Resampling.BICUBIC))
    return Image.fromarray(img ^ rng.integers(0, 24, (h, w, 3), dtype=np.uint8))  # fine texture


def edges(w, h, rng):
    """Hard black/white blocks, like text or a screenshot."""
    cells = rng.random((max(1, h // 7 + 1), max(1, w // 5 + 1))) < 0.5
    return Image.fromarray((np.kron(cells, np.ones((7, 5)))[:h, :w, None] * 255).astype(np.uint8).repeat(3, 2))


def encoded(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90, compress_level=1)
    return buf.getvalue()


CASES = [pytest.param(w, h, content, fmt, id=f"{w}x{h}-{content}-{fmt}",
                      marks=[pytest.mark.slow] if fmt == "PNG" and w * h > 4_000_000 else [])
         for w, h in SIZES for content in ("photo", "edges") for fmt in ("JPEG", "PNG")
         if not (content == "edges" and w * h > 3_000_000)]


def max_diff(a, b) -> int:
    return int((torch.as_tensor(np.asarray(a)).int() - torch.as_tensor(np.asarray(b)).int()).abs().max())


@pytest.mark.parametrize("w,h,content,fmt", CASES)
def test_default_tiles_within_2_levels_of_pil(w, h, content, fmt):
    rng = np.random.default_rng(w * 7919 + h)
    data = encoded((photo if content == "photo" else edges)(w, h, rng), fmt)
    reference = tile_image(Image.open(io.BytesIO(data)).convert("RGB"), 1, 12, 448, exact=True)
    ours = tile_image(load_image(data), 1, 12, 448)
    assert len(ours) == len(reference)
    assert max(max_diff(o, r) for o, r in zip(ours, reference)) <= 2


def test_resize_follows_pils_pass_order_on_noise():
    """Noise makes every rounding and clipping between PIL's two passes visible: in both of
    Pillow's pass orders the result stays within 2 levels."""
    rng = np.random.default_rng(0)
    shapes = [((300, 700), (896, 448)), ((1479, 1256), (1344, 896)), ((700, 300), (448, 896)), ((40, 30), (1344, 896)),
              ((2500, 1800), (448, 448))]
    assert {vertical_first(*a, *b) for a, b in shapes} == ({False, True} if PILLOW_VERTICAL_FIRST else {False})
    for (w, h), size in shapes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert max_diff(resize_bicubic(Pixels(img), size), img.resize(size, Image.Resampling.BICUBIC)) <= 2


def test_mixture_default_path_and_fast_opt_in(tmp_path, tok):  # noqa: F811  (tok: fixture)
    """What training ships (JPEG augmentation off) is the default path; fast_resize is the opt-in."""
    rng = np.random.default_rng(3)
    (tmp_path / "p.jpg").write_bytes(encoded(photo(3600, 2400, rng), "JPEG"))  # fast: decoded at half scale
    path = write_jsonl(tmp_path / "p.jsonl", [{"image": "p.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A photo."}]}])
    d = {"p": DatasetConfig(path=str(path), n_max=12, jpeg_augment=False)}
    reference = to_pixel_bytes(tile_image(Image.open(tmp_path / "p.jpg").convert("RGB"), 1, 12, 448, exact=True))
    default = MixtureDataset(data_cfg(d, tile_size=448, max_seq_len=65536), tok, 4, seed=0)[(0, 0)]
    assert default.pixel_values.shape == reference.shape
    assert int((default.pixel_values.int() - reference.int()).abs().max()) <= 2
    fast = MixtureDataset(data_cfg(d, tile_size=448, max_seq_len=65536, fast_resize=True), tok, 4, seed=0)[(0, 0)]
    assert fast.num_tiles == default.num_tiles and not torch.equal(fast.pixel_values, default.pixel_values)
    assert json.dumps(default.num_tiles) == json.dumps([7])  # 3x2 + thumbnail


def _pil_weights(n_in: int, n_out: int):
    """PIL's bicubic filter weights (Resample.c precompute_coeffs) for each output pixel."""
    def cubic(x, a=-0.5):
        x = abs(x)
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x < 1 else (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0

    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = [cubic((x + lo - center + 0.5) / filterscale) for x in range(hi - lo)]
        yield [v / sum(w) for v in w] if sum(w) else w


def test_second_pass_weights_bound_the_error_below_3_levels():
    """resize_bicubic's guarantee: torch's first pass is at most 1 level off PIL's, and PIL's
    second pass adds those errors up with weights whose absolute values sum to at most M; the
    results then differ by at most M + 1 + (torch's own rounding) before rounding, so at most 2
    levels after it whenever M < 1.9 -- here over every axis length the tiling produces."""
    lengths_in = list(range(1, 64)) + [100, 333, 447, 449, 897, 1343, 2000, 3001, 4032, 6000]
    worst = max(sum(abs(v) for v in w) for n_in in lengths_in for n_out in (448, 896, 1344, 1792, 2688, 5376)
                for w in _pil_weights(n_in, n_out))
    assert 1.25 <= worst < 1.3
