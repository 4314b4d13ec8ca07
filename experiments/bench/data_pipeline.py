"""Data pipeline speed per worker: vlmtrain's MixtureDataset against a straightforward reference.

Both do the same work per sample: decode a JPEG photo-sized image, pick the InternVL grid (n_max 12,
448 px tiles), resize + cut tiles + thumbnail, random JPEG re-encoding of every tile (quality
75..100), and tokenisation of a two-turn conversation with labels. The reference also normalises
every tile to float32 (ImageNet mean/std) on the host; vlmtrain ships uint8 tiles and normalises on
the device, as in training. The reference is written the obvious way (the InternVL training code's
shape): PIL resize, crop each tile, per-tile transforms (JPEG, resize, to-tensor, normalise), then
stacking, and the text built with the image tokens spelled out and tokenised turn by turn.

    python experiments/bench/data_pipeline.py                 # writes experiments/results/data_pipeline.md
    python experiments/bench/data_pipeline.py --samples 24 --rounds 2 --no-write

vlmtrain is measured on its default path (within 2 grey levels of the reference's pixels) and on
the opt-in ``data.fast_resize``; the report gives each one's grey-level deviation and a breakdown
of the default path's time by stage. Runs on the CPU in one process (= one DataLoader worker).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vlmtrain.config import DataConfig, DatasetConfig  # noqa: E402
from vlmtrain.data.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from vlmtrain.data.mixture import MixtureDataset  # noqa: E402
from vlmtrain.data.templates import INTERNVL_SYSTEM  # noqa: E402
from vlmtrain.data.tiling import choose_grid  # noqa: E402

SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 720), (1920, 1080), (1080, 1920), (1600, 1200),
         (2048, 1536), (3024, 4032), (4000, 3000), (500, 375), (1200, 1600)]
"""Typical of SFT image sources: web images, screenshots, phone photos."""
N_MAX, TILE, TOKENS_PER_TILE = 12, 448, 256


def photo(size, rng: np.random.Generator) -> Image.Image:
    """Photo-like content (smooth structure + fine texture): JPEG costs depend on it."""
    w, h = size
    low = Image.fromarray(rng.integers(0, 255, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8))
    img = np.asarray(low.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-12, 12, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_data(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = f"img{i:03d}.jpg"
        photo(SIZES[i % len(SIZES)], rng).save(folder / name, quality=90)
        lines.append({"image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture in detail, including colours and layout."},
            {"from": "gpt", "value": "The picture shows " + " ".join(["a textured region of colour"] * 12) + "."},
            {"from": "human", "value": "What is in the top left corner?"},
            {"from": "gpt", "value": "A smooth gradient from dark to light."}]})
    path = folder / "bench.jsonl"
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return path


# -- the reference: written the straightforward way -------------------------------------------------------
class ReferencePipeline:
    def __init__(self, tokenizer, root: Path):
        self.tok, self.root = tokenizer, root
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def tile(self, image: Image.Image) -> list[Image.Image]:
        cols, rows = choose_grid(image.width, image.height, 1, N_MAX, TILE)
        resized = image.resize((TILE * cols, TILE * rows), Image.Resampling.BICUBIC)
        tiles = []
        for i in range(cols * rows):
            c, r = i % cols, i // cols
            tiles.append(resized.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE)))
        if len(tiles) > 1:
            tiles.append(image.resize((TILE, TILE), Image.Resampling.BICUBIC))
        return tiles

    def transform(self, tile: Image.Image, rng: random.Random) -> torch.Tensor:
        buf = io.BytesIO()
        tile.save(buf, format="JPEG", quality=rng.randint(75, 100))
        tile = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        tile = tile.resize((TILE, TILE), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(tile, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def __call__(self, line: dict, rng: random.Random):
        image = Image.open(self.root / line["image"]).convert("RGB")
        pixels = torch.stack([self.transform(t, rng) for t in self.tile(image)])
        image_text = "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * pixels.shape[0]) + "</img>"
        ids = self.tok.encode(f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>\n", add_special_tokens=False)
        labels = [-100] * len(ids)
        conv = line["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            user = self.tok.encode("<|im_start|>user\n" + q["value"].replace("<image>", image_text)
                                   + "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
            answer = self.tok.encode(a["value"] + "<|im_end|>", add_special_tokens=False)
            sep = self.tok.encode("\n", add_special_tokens=False)
            ids += user + answer + sep
            labels += [-100] * len(user) + answer + [-100] * len(sep)
        return torch.tensor(ids), torch.tensor(labels), pixels


def time_interleaved(fns: list, n: int, rounds: int) -> list[list[float]]:
    """Seconds per sample of each fn, one value per round; the pipelines alternate within every
    round so a busy machine slows both alike (a warm-up pass is not counted)."""
    for fn in fns:
        fn(0)
    out = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            for i in range(n):
                fn(i)
            out[k].append((time.perf_counter() - t) / n)
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def pixel_deviation(ds, ref: ReferencePipeline, lines: list) -> tuple[int, float]:
    """(max, mean) |vlmtrain tile - reference tile| in grey levels over all images, JPEG
    augmentation off on both sides (it is random, so it would hide the resize)."""
    worst, total, count = 0, 0.0, 0
    for i, line in enumerate(lines):
        ours = ds[(i, 0)].pixel_values.int()
        theirs = torch.stack([torch.from_numpy(np.asarray(t, dtype=np.uint8)).permute(2, 0, 1)
                              for t in ref.tile(Image.open(ref.root / line["image"]).convert("RGB"))]).int()
        diff = (ours - theirs).abs()
        worst, total, count = max(worst, int(diff.max())), total + float(diff.float().sum()), count + diff.numel()
    return worst, total / count


def stage_times(ds, lines: list, root: Path, rounds: int) -> dict[str, float]:
    """ms per sample of each stage of vlmtrain's default path, run on its own (best of rounds)."""
    from vlmtrain.data.images import jpeg_reencode, load_image, to_pixel_bytes
    from vlmtrain.data.templates import get_template
    from vlmtrain.data.tiling import tile_image

    blobs = [(root / line["image"]).read_bytes() for line in lines]
    decoded = [load_image(b) for b in blobs]
    tiles = [tile_image(img, 1, N_MAX, TILE) for img in decoded]
    convs = [ds.sources[0].reader.to_conversation(line, root) for line in lines]
    template = get_template("internvl2_5")
    jpeg = [[jpeg_reencode(t, random.Random(k)) for t in ts] for k, ts in enumerate(tiles)]
    stages = {
        "decode (PIL, full size)": lambda k: load_image(blobs[k]),
        "grid resize + crops + thumbnail": lambda k: tile_image(decoded[k], 1, N_MAX, TILE),
        "JPEG re-encoding of every tile": lambda k: [jpeg_reencode(t, random.Random(k)) for t in tiles[k]],
        "tiles to one uint8 tensor": lambda k: to_pixel_bytes(jpeg[k]),
        "render + tokenise (ids, labels)": lambda k: ds.encoder.encode(
            convs[k], template, [len(tiles[k])], None),
    }
    times = time_interleaved(list(stages.values()), len(lines), rounds)
    return {name: 1000 * min(t) for name, t in zip(stages, times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker uses 1)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hydra import compose, initialize_config_dir

    from vlmtrain.cli import CONFIG_DIR, register
    from vlmtrain.models.build import load_tokenizer

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        tok = load_tokenizer(compose(config_name="config", overrides=["data.datasets={}"]).model)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_data(Path(tmp), args.samples)
        lines = [json.loads(l) for l in path.read_text().splitlines()]

        def dataset(fast: bool, jpeg: bool = True) -> MixtureDataset:
            d = DatasetConfig(path=str(path), n_max=N_MAX, jpeg_augment=None if jpeg else False)
            return MixtureDataset(DataConfig(datasets={"bench": d}, template="internvl2_5", tile_size=TILE,
                                             max_seq_len=65536, fast_resize=fast), tok, TOKENS_PER_TILE, seed=0)

        ours, fast = dataset(False), dataset(True)
        ref = ReferencePipeline(tok, Path(tmp))

        # same tokens and tile counts: the pipelines do the same work
        for i in range(min(4, len(lines))):
            ids, labels, pixels = ref(lines[i], random.Random(i))
            for ds in (ours, fast):
                s = ds[(i, 0)]
                assert torch.equal(s.input_ids, ids) and torch.equal(s.labels, labels), i
                assert s.pixel_values.shape == pixels.shape, i
        tiles = sum(ours[(i, 0)].pixel_values.shape[0] for i in range(len(lines))) / len(lines)
        deviation = {"default": pixel_deviation(dataset(False, jpeg=False), ref, lines),
                     "fast": pixel_deviation(dataset(True, jpeg=False), ref, lines)}

        t_ref, t_ours, t_fast = time_interleaved(
            [lambda i: ref(lines[i], random.Random(i)), lambda i: ours[(i, 1)], lambda i: fast[(i, 1)]],
            len(lines), args.rounds)
        stages = stage_times(ours, lines, Path(tmp), args.rounds)

    best_ref, best_ours, best_fast = min(t_ref), min(t_ours), min(t_fast)
    ratios = sorted(r / o for r, o in zip(t_ref, t_ours))
    fast_ratios = sorted(r / f for r, f in zip(t_ref, t_fast))
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    cmd = "python experiments/bench/data_pipeline.py " + " ".join(sys.argv[1:])
    stage_rows = "\n".join(f"| {name} | {ms:.1f} |" for name, ms in stages.items())
    report = f"""# Data pipeline speed, per worker

- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
- device: {cpu_model()} (CPU only; {args.threads} torch thread(s), one process = one DataLoader worker)
- command: `{cmd.strip()}`
- work per sample: decode one JPEG ({len(SIZES)} sizes from 500x375 to 4000x3000, {args.samples} images),
  InternVL grid with n_max {N_MAX} at {TILE} px (mean {tiles:.1f} tiles incl. thumbnail), random JPEG
  re-encoding per tile, two-turn conversation tokenised with labels (identical token ids and labels in
  all three; checked by the script). The reference also normalises each tile to float32 on the host;
  vlmtrain's path hands uint8 tiles to the loader and the model normalises them on the device
  (`vlmtrain.data.images.normalize_pixels`), so that work leaves the worker.

| pipeline | ms / sample (best of {args.rounds}) | samples / s | all rounds (ms) | grey levels off the reference (max / mean) |
|---|---|---|---|---|
| reference (PIL resize, crop each tile, per-tile transforms) | {1000 * best_ref:.1f} | {1 / best_ref:.2f} | {', '.join(f'{1000 * t:.1f}' for t in t_ref)} | 0 / 0 |
| vlmtrain default (`data.fast_resize=false`) | {1000 * best_ours:.1f} | {1 / best_ours:.2f} | {', '.join(f'{1000 * t:.1f}' for t in t_ours)} | {deviation['default'][0]} / {deviation['default'][1]:.3f} |
| vlmtrain opt-in `data.fast_resize=true` | {1000 * best_fast:.1f} | {1 / best_fast:.2f} | {', '.join(f'{1000 * t:.1f}' for t in t_fast)} | {deviation['fast'][0]} / {deviation['fast'][1]:.3f} |

Default path: **{best_ref / best_ours:.2f}x** the reference's samples/s per worker (best vs best; per-round
ratios {', '.join(f'{r:.2f}' for r in ratios)}, median {statistics.median(ratios):.2f}x). `fast_resize`:
{best_ref / best_fast:.2f}x (per-round median {statistics.median(fast_ratios):.2f}x). Rounds alternate the
pipelines; load average during the run {' '.join(load)} on {os.cpu_count()} cores. Grey levels: JPEG
augmentation off on both sides, all tiles of all images.

Where the default path's time goes (each stage alone on the same images, best of {args.rounds}):

| stage | ms / sample |
|---|---|
{stage_rows}

The default path decodes every JPEG at full size (as the reference must, to have its pixels) and
resizes with torch's uint8 bicubic in PIL's pass order, within 2 grey levels of PIL
(`vlmtrain.data.resize`); the JPEG re-encoding of every tile (training's augmentation, libjpeg both
ways) costs the same on both sides, so with the full-size decode it bounds the ratio. `fast_resize`
decodes large JPEGs at a reduced DCT scale and resizes in one torch call.
"""
    print(report)
    if not args.no_write:
        out = REPO / "experiments" / "results" / "data_pipeline.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        # the report replaces the file's first section; the later "## " sections are kept
        old = out.read_text() if out.is_file() else ""
        notes = old[old.index("\n## ") + 1:] if "\n## " in old else ""
        out.write_text(report + ("\n" + notes if notes else ""))
        print(f"written to {out}")


if __name__ == "__main__":
    main()
