"""Time to build one demo sample (decode, tile, JPEG, normalise, tokenise) in one process.

    python experiments/bench/demo_sample.py                    # n_max 1: the learning proof's setting
    python experiments/bench/demo_sample.py data.datasets.shapes.n_max=4
    python experiments/bench/demo_sample.py experiment=scaleout_internvl2_5_1b data.datasets.shapes.n_max=12

Prints ms per sample (and tiles, tokens per sample, tiles/s of one process) over the demo dataset (generated into $VLMTRAIN_CACHE if missing).
"""

from __future__ import annotations

import sys
import time

from hydra import compose, initialize_config_dir

from vlmtrain.cli import CONFIG_DIR, register
from vlmtrain.data.mixture import MixtureDataset
from vlmtrain.models.build import load_tokenizer
from vlmtrain.models.internvl import tokens_per_tile


def main(overrides: list[str]) -> None:
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data.datasets.shapes.n_max=1", *overrides])
    v = cfg.model.vision
    ds = MixtureDataset(cfg.data, load_tokenizer(cfg.model),
                        tokens_per_tile(v.image_size, v.patch_size, cfg.model.downsample_ratio), cfg.seed)
    for i in range(5):  # warm-up
        ds[(i, 0)]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for i in range(len(ds)):
            ds[(i, 0)]
        best = min(best, (time.perf_counter() - t) / len(ds))
    tiles = [0 if x.pixel_values is None else x.pixel_values.shape[0] for x in (ds[(i, 0)] for i in range(len(ds)))]
    tokens = [len(ds[(i, 0)]) for i in range(len(ds))]
    print(f"{len(ds)} samples, best of 3 passes: {best * 1000:.2f} ms/sample; "
          f"per sample {sum(tiles) / len(ds):.2f} tiles, {sum(tokens) / len(ds):.0f} tokens; "
          f"{sum(tiles) / len(ds) / best:.0f} tiles/s per process")


if __name__ == "__main__":
    main(sys.argv[1:])
