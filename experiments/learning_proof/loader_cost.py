"""CPU cost of one training sample of the learning proof, decoded from the image files against read
from pre-tiled images (``data.datasets.shapes.tile_cache``): the whole ``MixtureDataset`` sample
(tiles, random JPEG, tokens), in one process.

    python experiments/learning_proof/loader_cost.py [--lines 600] [--work /tmp/lp_cost]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=600)
    ap.add_argument("--work", default="/tmp/lp_cost")
    args = ap.parse_args()
    from hydra import compose, initialize_config_dir

    from vlmtrain.cli import CONFIG_DIR, register
    from vlmtrain.data.mixture import build_mixture
    from vlmtrain.data.synthetic import make_shapes_dataset
    from vlmtrain.data.tile_cache import INDEX, build_tile_cache

    d = Path(args.work)
    if not (d / "tiles" / INDEX).is_file():
        make_shapes_dataset(d, args.lines, seed=1, side_range=(224, 336))
        build_tile_cache(d / "annotations.jsonl", d / "tiles", tile_size=224, n_max=1)
    os.environ["LEARNING_PROOF_DATA"] = str(d)
    register()
    for name, extra in (("decoded", []), ("pre-tiled", [f"+data.datasets.shapes.tile_cache={d / 'tiles'}"])):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["experiment=learning_proof", "stage=instruction_tuning", *extra])
        ds, _ = build_mixture(cfg)
        for i in range(20):  # warm up (imports, page cache)
            ds[(i, 0)]
        n = min(len(ds), args.lines)
        t = time.perf_counter()
        for i in range(n):
            ds[(i, 1)]
        print(f"{name}: {1e3 * (time.perf_counter() - t) / n:.2f} ms per sample ({n} samples)", flush=True)


if __name__ == "__main__":
    main()
