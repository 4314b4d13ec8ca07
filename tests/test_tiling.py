"""Golden and behaviour tests for InternVL dynamic tiling (vlmtrain.data.tiling)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtrain.data.tiling import candidate_grids, choose_grid, tile_image, tiles_per_image

GOLDEN = json.loads((Path(__file__).parent / "golden" / "tiling_grid.json").read_text())


def test_golden_has_all_cases():
    assert len(GOLDEN) == 400


@pytest.mark.parametrize(
    "case", GOLDEN, ids=lambda c: f"{c['width']}x{c['height']}-{c['min_tiles']}-{c['max_tiles']}"
)
def test_choose_grid_matches_golden(case):
    grid = choose_grid(case["width"], case["height"], case["min_tiles"], case["max_tiles"])
    assert grid == (case["cols"], case["rows"])
    cols, rows = grid
    assert cols * rows + (cols * rows > 1) == case["tiles_with_thumbnail"]


def test_candidate_grids_ordered_and_bounded():
    grids = candidate_grids(2, 12)
    counts = [c * r for c, r in grids]
    assert counts == sorted(counts)
    assert min(counts) == 2 and max(counts) == 12
    assert len(set(grids)) == len(grids)
    assert (3, 4) in grids and (4, 3) in grids and (1, 1) not in grids


def test_float_tie_semantics_match_reference():
    # 520/1248 is exactly halfway between 1/3 and 1/2, but not in floats: the reference keeps 1x2.
    assert choose_grid(520, 1248, 1, 6) == (1, 2)


def test_exact_tie_switches_only_for_large_images():
    # 3:2 is exactly between 1:1 and 2:1; the bigger grid wins only past half its pixel count.
    assert choose_grid(672, 448, 1, 2) == (2, 1)
    assert choose_grid(300, 200, 1, 2) == (1, 1)


@pytest.mark.parametrize("bad", [(0, 4), (3, 2)])
def test_choose_grid_rejects_bad_range(bad):
    with pytest.raises(ValueError):
        choose_grid(100, 100, *bad)


def _gradient(width, height, mode="RGB"):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def test_tile_image_grid_thumbnail_and_row_major_order():
    image = _gradient(1000, 450)  # -> 2x1 grid with max 6
    tiles = tile_image(image, 1, 6, tile_size=64, exact=True)
    assert choose_grid(1000, 450, 1, 6, tile_size=64) == (2, 1)
    assert len(tiles) == 3
    assert all(t.size == (64, 64) and t.mode == "RGB" for t in tiles)
    canvas = image.resize((128, 64), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(canvas)[:, :64])
    assert np.array_equal(np.asarray(tiles[1]), np.asarray(canvas)[:, 64:])
    thumb = image.resize((64, 64), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(tiles[2]), np.asarray(thumb))


def test_tile_image_rows_are_row_major():
    image = _gradient(300, 600)  # tall: 1x2 grid
    tiles = tile_image(image, 1, 6, tile_size=32, use_thumbnail=False)
    assert len(tiles) == 2
    # green channel follows y: the first tile is the top one
    assert np.asarray(tiles[0])[..., 1].mean() < np.asarray(tiles[1])[..., 1].mean()


def test_single_tile_has_no_thumbnail_and_converts_to_rgb():
    for exact in (True, False):
        tiles = tile_image(_gradient(200, 210, mode="RGBA"), 1, 12, exact=exact)
        assert len(tiles) == 1
        assert np.asarray(tiles[0]).shape == (448, 448, 3)


def test_thumbnail_can_be_disabled():
    assert len(tile_image(_gradient(900, 450), 1, 6, use_thumbnail=False)) == 2


def test_tie_order_is_transformers_and_matches_internvl_when_min_tiles_is_1():
    """Same-count grids are tried in transformers' order (cols ascending); InternVL sorts a Python
    set, whose order within a tile count differs, but only changes the choice when min_tiles > 1
    (nothing closer allowed, so two same-count grids can tie exactly)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    def internvl(w, h, lo, hi, size=448):  # InternVL's find_closest_aspect_ratio over its set order
        ratios = sorted({(i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                         if lo <= i * j <= hi}, key=lambda r: r[0] * r[1])
        best, best_diff = (1, 1), float("inf")
        for r in ratios:
            diff = abs(w / h - r[0] / r[1])
            if diff < best_diff:
                best, best_diff = r, diff
            elif diff == best_diff and w * h > 0.5 * size * size * r[0] * r[1]:
                best = r
        return best

    sizes = [(w, h) for w in range(1, 200, 3) for h in (12, 13, 50, 77, 150)]
    for hi in range(1, 13):
        for w, h in sizes:
            assert choose_grid(w, h, 1, hi) == internvl(w, h, 1, hi) == get_optimal_tiled_canvas((h, w), (448, 448), 1, hi)
    # min_tiles 4 = max 4 and a 5:2 image: 2x2 and 4x1 tie; transformers and vlmtrain keep 2x2
    assert choose_grid(30, 12, 4, 4) == get_optimal_tiled_canvas((12, 30), (448, 448), 4, 4) == (2, 2)
    assert internvl(30, 12, 4, 4) == (4, 1)


def test_tiles_per_image():
    assert tiles_per_image(1, 12) == 12
    assert tiles_per_image(2, 12) == 6
    assert tiles_per_image(5, 12) == 2
    assert tiles_per_image(40, 12) == 1
    with pytest.raises(ValueError):
        tiles_per_image(0, 12)
