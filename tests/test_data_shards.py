"""Webdataset shards: written from any source, size-bounded, read back (brace patterns) as the very
same samples in the same order, split across ranks and workers with each sample once per epoch."""

import json

import pytest
import torch
from test_data_formats import image, write_jsonl
from test_data_processing import make_video
from torch.utils.data import DataLoader

from conftest import compose_config
from vlmtrain.data.mixture import MixtureDataset, Skipped
from vlmtrain.data.sampler import StepSampler
from vlmtrain.data.shard import write_shards
from vlmtrain.models.build import load_tokenizer

TPT = 4


def swift_source(tmp_path):
    for i, size in enumerate([(300, 100), (100, 300), (64, 64), (500, 250)]):
        image(tmp_path / "img" / f"{i}.{'png' if i % 2 else 'jpg'}", size=size, colour=(40 * i, 200, 90))
    make_video(tmp_path / "clip.mp4", num_frames=12)
    objs = json.dumps([{"caption": "box", "bbox": [10, 10, 50, 50], "bbox_type": "real", "image": 0}])
    lines = []
    for k in range(10):
        i = k % 4
        lines.append({"query": f"<image>What is {k}?", "response": f"thing {k}", "images": [f"img/{i}.{'png' if i % 2 else 'jpg'}"]})
    lines.append({"query": "Where is <ref-object>?", "response": "<bbox>", "images": ["img/0.jpg"], "objects": objs})
    lines.append({"query": "<video>What moves?", "response": "nothing", "videos": ["clip.mp4"]})
    lines.append({"query": "1+1?", "response": "2", "history": [["hi", "hello"]]})
    lines.append({"query": "<image><image>Two?", "response": "yes", "images": ["img/1.png", "img/2.jpg"]})
    return write_jsonl(tmp_path / "train.jsonl", lines), len(lines)


def same(a, b):
    assert type(a) is type(b)
    if isinstance(a, Skipped):
        assert a.reason == b.reason
        return
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert a.num_tiles == b.num_tiles
    assert (a.pixel_values is None) == (b.pixel_values is None)
    if a.pixel_values is not None:
        assert torch.equal(a.pixel_values, b.pixel_values)


def test_shards_hold_the_same_samples_in_the_same_order(tmp_path):
    src, n = swift_source(tmp_path)
    over = ["data.tile_size=28", "data.min_frames=2", "data.max_frames=4", "data.datasets.single.repeat=1.5"]
    cfg = compose_config(["data=single", f"data.path={src}", *over])
    tok = load_tokenizer(cfg.model)
    result = write_shards(cfg.data, tmp_path / "shards", max_size=4_000, log=lambda m: None)
    shards = result["single"]["shards"]
    assert result["single"]["samples"] == n and len(shards) > 2  # size-bounded
    pattern = str(tmp_path / "shards" / "single" / f"shard-{{000000..{len(shards) - 1:06d}}}.tar")
    cfg_wds = compose_config(["data=single", f"data.path='{pattern}'", *over])  # quoted: braces
    assert cfg_wds.data.format is None  # guessed from the pattern

    a = MixtureDataset(cfg.data, tok, TPT, seed=3)
    b = MixtureDataset(cfg_wds.data, tok, TPT, seed=3)
    assert b.sources[0].format == "wds" and len(a) == len(b) == round(n * 1.5)
    for epoch in (0, 1):
        for i in range(len(a)):
            same(a[(i, epoch)], b[(i, epoch)])
    # the generated data config reads them too, with the source's settings
    conf = (tmp_path / "shards" / "data" / "shards.yaml").read_text()
    assert "format: wds" in conf and "repeat: 1.5" in conf


def test_shard_reading_splits_across_ranks_and_workers(tmp_path):
    src, n = swift_source(tmp_path)
    cfg = compose_config(["data=single", f"data.path={src}", "data.tile_size=28", "data.min_frames=2", "data.max_frames=4"])
    tok = load_tokenizer(cfg.model)
    write_shards(cfg.data, tmp_path / "shards", max_size=4_000, log=lambda m: None)
    cfg_wds = compose_config(["data=single", f"data.path={tmp_path / 'shards' / 'single'}", "data.tile_size=28",
                              "data.min_frames=2", "data.max_frames=4"])
    ds = MixtureDataset(cfg_wds.data, tok, TPT, seed=0)
    per_step = 4
    seen = []
    for rank in range(2):
        sampler = StepSampler(len(ds), per_step, rank=rank, world_size=2, seed=0)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=2,
                            collate_fn=lambda items: [x.input_ids[-8:].tolist() for x in items])
        for step in loader:
            seen += [tuple(t) for t in step]
        seen_idx = [i for b in sampler for i, _ in b]
        assert len(seen_idx) == len(set(seen_idx))
    steps = len(ds) // per_step
    assert len(seen) == steps * per_step
    # every sample of the epoch's steps exactly once over both ranks: compare with a direct read
    order = StepSampler(len(ds), per_step, seed=0).order(0)[: steps * per_step]
    expected = sorted(tuple(ds[(int(i), 0)].input_ids[-8:].tolist()) for i in order)
    assert sorted(seen) == expected


def test_missing_shard_names_the_file(tmp_path):
    cfg = compose_config(["data=single", f"data.path='{tmp_path}/shard-{{000000..000001}}.tar'"])
    tok = load_tokenizer(cfg.model)
    with pytest.raises(FileNotFoundError, match="shard-000000.tar"):
        MixtureDataset(cfg.data, tok, TPT)
