"""Probe: how fast does a from-scratch InternViT learn the learning proof's visual facts under
direct supervision (a linear head on the CLS output, no LLM)? Separates the ViT's sample efficiency
from the LLM's binding.

    python experiments/learning_proof/vit_probe.py leftmost --tile 112 --steps 1500  # leftmost of 2-4: shape, colour
    python experiments/learning_proof/vit_probe.py single --size 31 48 --steps 400   # one shape: which one
    python experiments/learning_proof/vit_probe.py leftmost --device cuda --workers 1 --batch 128 --steps 2000 \
        --hidden 384 --layers 8 --heads 6 --json probe.jsonl                           # the proof's ViT, on a GPU

ViT: transformers' InternVLVisionModel, by default hidden 192, 4 layers, 3 heads, patch 14
(``--hidden``, ``--layers``, ``--heads``, ``--patch``); AdamW (lr 5e-4: ``--lr``), weight decay 0.05,
batch 32 (``--batch``), fresh images every step (``vlmtrain.data.synthetic``'s drawing, in
``--workers`` processes). Prints held-out accuracy (256 images) every ``--eval-every`` steps; with
``--json`` appends one line with the settings and the curve. On a GPU (bf16 autocast) the drawing,
not the ViT, sets the pace.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import InternVLVisionConfig, InternVLVisionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vlmtrain.data.images import normalize_pixels, to_pixel_bytes  # noqa: E402
from vlmtrain.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, _draw_image, draw_shape, extreme_shape  # noqa: E402

COLOUR_NAMES = list(COLOURS)


def leftmost(rng: random.Random, tile: int, _size) -> tuple[Image.Image, list[int]]:
    """2-4 shapes as the learning proof draws them; labels: shape and colour of the leftmost."""
    img, shapes, _ = _draw_image(rng, rng.choice([2, 3, 4]), (224, 336))
    s = extreme_shape(shapes, "left")
    return img.resize((tile, tile), Image.Resampling.BICUBIC), [SHAPES.index(s.shape), COLOUR_NAMES.index(s.colour)]


def single(rng: random.Random, tile: int, size: tuple[int, int]) -> tuple[Image.Image, list[int]]:
    """One shape of a side in ``size`` px at a random place; label: which shape."""
    img = Image.new("RGB", (tile, tile), rng.choice(BACKGROUNDS))
    side = rng.randint(*size)
    x0, y0 = rng.randint(0, tile - side), rng.randint(0, tile - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    shape = rng.choice(SHAPES)
    draw_shape(ImageDraw.Draw(img), shape, box, COLOURS[rng.choice(COLOUR_NAMES)])
    return img, [SHAPES.index(shape)]


TASKS = {"leftmost": (leftmost, ("shape", "colour"), (3, 6)), "single": (single, ("shape",), (3,))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--size", type=int, nargs=2, default=[31, 48], help="single: shape side range in px")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0, help="processes drawing the training images (0: this one)")
    ap.add_argument("--json", help="append a line with the settings and the held-out curve to this file")
    args = ap.parse_args()
    _, names, classes = TASKS[args.task]

    def to_device(pixels, labels):
        return normalize_pixels(pixels.to(args.device)), labels.to(args.device)

    held_out = [to_device(*make_batch(args, 2 + i, 64)) for i in range(4)]
    seeds = range(1000, 1000 + args.steps)
    if not args.workers:
        train(args, names, classes, (to_device(*make_batch(args, s, args.batch)) for s in seeds), held_out)
        return
    # spawned, not forked: a fork after this process's torch ops can hang in OpenMP's thread pool
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        ahead = deque(pool.submit(make_batch, args, s, args.batch) for s in seeds[:4 * args.workers])

        def batches():
            for s in seeds[4 * args.workers:]:
                yield to_device(*ahead.popleft().result())
                ahead.append(pool.submit(make_batch, args, s, args.batch))
            while ahead:
                yield to_device(*ahead.popleft().result())

        train(args, names, classes, batches(), held_out)


def make_batch(args, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fresh images and labels, a pure function of ``seed`` (so worker processes can draw them)."""
    draw = TASKS[args.task][0]
    rng = random.Random(seed)
    images, labels = zip(*(draw(rng, args.tile, tuple(args.size)) for _ in range(n)))
    return to_pixel_bytes(list(images)), torch.tensor(labels)


def train(args, names, classes, batches, held_out) -> None:
    torch.manual_seed(0)
    vit = InternVLVisionModel(InternVLVisionConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, image_size=[args.tile, args.tile], patch_size=[args.patch, args.patch],
        use_mean_pooling=True, layer_scale_init_value=0.1)).to(args.device)
    head = torch.nn.Linear(args.hidden, sum(classes)).to(args.device)
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.05)
    splits = torch.tensor(classes).cumsum(0).tolist()[:-1]
    autocast = torch.autocast(args.device.split(":")[0], torch.bfloat16, enabled=args.device != "cpu")
    curve, t0 = [], time.time()
    for step, (x, y) in enumerate(batches, 1):
        with autocast:
            logits = head(vit(pixel_values=x).last_hidden_state[:, 0]).float().tensor_split(splits, dim=1)
        loss = sum(torch.nn.functional.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0:
            vit.eval()
            with torch.no_grad(), autocast:
                hits = torch.zeros(len(names))
                for a, b in held_out:
                    parts = head(vit(pixel_values=a).last_hidden_state[:, 0]).tensor_split(splits, dim=1)
                    hits += torch.tensor([float((lg.argmax(1) == b[:, i]).sum()) for i, lg in enumerate(parts)])
            vit.train()
            curve.append({"step": step, "samples": step * args.batch, "loss": loss.item(),
                          **{n: h / 256 for n, h in zip(names, hits.tolist())}})
            acc = " ".join(f"{n} {h / 256:.3f}" for n, h in zip(names, hits.tolist()))
            print(f"step {step} ({time.time() - t0:.0f}s) loss {loss.item():.3f} held-out: {acc}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"args": vars(args), "seconds": time.time() - t0, "curve": curve}) + "\n")


if __name__ == "__main__":
    main()
