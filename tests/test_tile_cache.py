"""Pre-tiled images (vlmtrain.data.tile_cache): the cached tiles are the loader's own, bit for bit,
with and without the JPEG augmentation; a cache of other tiling settings is refused."""

import json
import pickle

import pytest
import torch

from conftest import compose_config
from vlmtrain.config import DataConfig, DatasetConfig
from vlmtrain.data.mixture import MixtureDataset
from vlmtrain.data.synthetic import make_shapes_dataset
from vlmtrain.data.tile_cache import INDEX, build_tile_cache
from vlmtrain.errors import UserError
from vlmtrain.models.build import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(compose_config(["data.datasets={}"]).model)


def mixture(tok, path, n_max, cache=None, jpeg=None, tile_size=56):
    d = DatasetConfig(path=str(path), n_max=n_max, tile_cache=str(cache) if cache else None, jpeg_augment=jpeg)
    cfg = DataConfig(datasets={"s": d}, template="internvl2_5", tile_size=tile_size, max_seq_len=8192)
    return MixtureDataset(cfg, tok, 4, seed=0)


@pytest.mark.parametrize("n_max", [1, 4])
@pytest.mark.parametrize("jpeg", [False, None])
def test_cached_tiles_equal_decoded(tmp_path, tok, n_max, jpeg):
    path = make_shapes_dataset(tmp_path, 24, seed=3)  # single-, two-image and text lines, 1-6 tile grids
    cache = build_tile_cache(path, tmp_path / "cache", tile_size=56, n_max=n_max, procs=2)
    plain, cached = mixture(tok, path, n_max, jpeg=jpeg), mixture(tok, path, n_max, cache, jpeg)
    images = 0
    for i in range(len(plain)):
        a, b = plain[(i, 1)], cached[(i, 1)]
        assert torch.equal(a.input_ids, b.input_ids) and a.num_tiles == b.num_tiles
        if a.pixel_values is None:
            assert b.pixel_values is None
            continue
        images += 1
        assert torch.equal(a.pixel_values, b.pixel_values)
    assert images > 10 and cached.sources[0].tile_cache.hits >= images
    tc = cached.sources[0].tile_cache
    assert tc._tiles is not None and pickle.loads(pickle.dumps(tc))._tiles is None  # spawn ships no tiles
    index = json.loads((cache / INDEX).read_text())["tiles"]
    assert all(k.startswith("images/") for k in index)


def test_other_settings_refused(tmp_path, tok):
    path = make_shapes_dataset(tmp_path, 4, seed=0)
    cache = build_tile_cache(path, tmp_path / "cache", tile_size=56, n_max=1)
    with pytest.raises(UserError, match=r"data.datasets.s.tile_cache: .*tile_size"):
        mixture(tok, path, 1, cache, tile_size=28)
    with pytest.raises(UserError, match="not a complete tile cache"):
        mixture(tok, path, 1, tmp_path / "nothing")
