"""CPU probe: how fast does a from-scratch InternViT learn the learning proof's visual facts under
direct supervision (a linear head on the CLS output, no LLM)? Separates the ViT's sample efficiency
from the LLM's binding.

    python experiments/learning_proof/vit_probe.py leftmost --tile 112 --steps 1500   # 2-4 shapes: shape and colour of the leftmost
    python experiments/learning_proof/vit_probe.py single --size 31 48 --steps 400    # one shape of that size: which shape

ViT: transformers' InternVLVisionModel, hidden 192, 4 layers, 3 heads, patch 14; AdamW (lr 5e-4: ``--lr``),
weight decay 0.05, batch 32, fresh images every step (``vlmtrain.data.synthetic``'s drawing). Prints
held-out accuracy (256 images) every 50 steps.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import InternVLVisionConfig, InternVLVisionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vlmtrain.data.images import to_pixel_values  # noqa: E402
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
    args = ap.parse_args()
    draw, names, classes = TASKS[args.task]

    def batch(rng: random.Random, n: int):
        images, labels = zip(*(draw(rng, args.tile, tuple(args.size)) for _ in range(n)))
        return to_pixel_values(list(images)), torch.tensor(labels)

    torch.manual_seed(0)
    vit = InternVLVisionModel(InternVLVisionConfig(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
        image_size=[args.tile, args.tile], patch_size=[14, 14], use_mean_pooling=True, layer_scale_init_value=0.1))
    head = torch.nn.Linear(192, sum(classes))
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.05)
    splits = torch.tensor(classes).cumsum(0).tolist()[:-1]
    rng, held_out = random.Random(1), [batch(random.Random(2 + i), 64) for i in range(4)]
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x, y = batch(rng, 32)
        logits = head(vit(pixel_values=x).last_hidden_state[:, 0]).tensor_split(splits, dim=1)
        loss = sum(torch.nn.functional.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            vit.eval()
            with torch.no_grad():
                hits = torch.zeros(len(names))
                for a, b in held_out:
                    parts = head(vit(pixel_values=a).last_hidden_state[:, 0]).tensor_split(splits, dim=1)
                    hits += torch.tensor([float((lg.argmax(1) == b[:, i]).sum()) for i, lg in enumerate(parts)])
            vit.train()
            acc = " ".join(f"{n} {h / 256:.3f}" for n, h in zip(names, hits.tolist()))
            print(f"step {step} ({time.time() - t0:.0f}s) loss {loss.item():.3f} held-out: {acc}", flush=True)


if __name__ == "__main__":
    main()
