"""A synthetic "coloured shapes" dataset in InternVL jsonl format, for demos and tests.

Every answer is computable exactly from the pixels (shapes never overlap, and each sits in its
own column and its own row band, so "leftmost" or "topmost" is never ambiguous), so a small
model can learn it to ~100% and a training run that does not is broken. Image sizes vary from
160 to 640 px per side with aspect ratios from 1:4 to 4:1, so dynamic tiling produces grids of
1 to 6 tiles; lines mix single-image (some multi-turn), two-image and text-only conversations
like a real InternVL fine-tuning mix. Every line names the kind of each of its questions
(``question_types``, one per assistant turn, e.g. ``one_image/count`` or ``text/plus``) so an
evaluation can report accuracy per kind (``python -m vlmtrain.eval eval.group_by=question_types``).
Nothing is downloaded: the default run and the tests
generate it in about a second.

    python -c "from vlmtrain.data.synthetic import ensure_demo_dataset; print(ensure_demo_dataset())"
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "orange": (245, 130, 20),
    "purple": (140, 50, 180),
}
"""Saturated and far apart in RGB, so JPEG artefacts never change which colour a shape is."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((250, 250, 250), (205, 205, 205), (45, 45, 45))
"""Neutral greys, none close to a shape colour."""

POSITIONS: dict[str, str] = {
    "left": "leftmost",
    "right": "rightmost",
    "top": "topmost",
    "bottom": "bottommost",
}
"""Image edge -> the adjective for the shape nearest it."""

SPLIT_SHARES = {"multi_image": 0.15, "text_only": 0.15}
"""Share of lines per kind; the remaining ~70% are single-image lines."""

DEMO_NUM_SAMPLES = 96
DEMO_NUM_HELDOUT = 32
DEMO_SEED = 0
DEMO_VERSION = "shapes-v2"
"""Written into the demo's completion marker: bump it when generation changes so caches rebuild."""

_MARKER = ".complete"


@dataclass(frozen=True)
class DrawnShape:
    """One shape as drawn: its box is [x0, y0, x1, y1] in pixels, inclusive of the outline."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def annotation_path(out_dir: str | Path, split: str = "train") -> Path:
    """``annotations.jsonl`` for the train split, ``annotations_{split}.jsonl`` for others."""
    name = "annotations.jsonl" if split == "train" else f"annotations_{split}.jsonl"
    return Path(out_dir) / name


def shapes_metadata_path(out_dir: str | Path, split: str = "train") -> Path:
    """Sidecar JSON with what was drawn in every image, so tests can check the answers."""
    return Path(out_dir) / f"shapes_{split}.json"


def make_shapes_dataset(
    out_dir: str | Path,
    num_samples: int,
    seed: int,
    split: str = "train",
    side_range: tuple[int, int] = (160, 640),
    describe: float = 0.0,
) -> Path:
    """Write ``num_samples`` jsonl lines and their images under ``out_dir``; return the jsonl path.

    Output is a pure function of (num_samples, seed, split, side_range): the split name is
    part of the random seed, so a held-out split never repeats training images. Several splits
    can share one ``out_dir`` (image names carry the split). Besides the InternVL keys, a
    ``shapes_{split}.json`` sidecar records every drawn shape.

    ``describe``: the share of single-image lines that ask instead for a long answer, every shape
    from left to right (``one_image/describe``: "red circle, blue square", 2-8 words against the
    other kinds' one), for comparing loss averagings on short and long answers. 0 draws nothing
    extra, so the default data is unchanged.
    """
    if not 0.0 <= describe <= 1.0:
        raise ValueError(f"describe must be a share in [0, 1], got {describe}")
    if side_range[0] < 64 or side_range[0] > side_range[1]:
        raise ValueError(f"side_range must be (min, max) with 64 <= min <= max, got {side_range}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"vlmtrain-shapes/{split}/{seed}")

    n_multi = round(num_samples * SPLIT_SHARES["multi_image"])
    n_text = round(num_samples * SPLIT_SHARES["text_only"])
    kinds = ["multi_image"] * n_multi + ["text_only"] * n_text
    kinds += ["single_image"] * (num_samples - len(kinds))
    rng.shuffle(kinds)

    metadata: dict[str, dict] = {}
    image_counter = 0

    def new_image(exclude_count: int = 0) -> tuple[str, list[DrawnShape], tuple[int, int]]:
        nonlocal image_counter
        num_shapes = rng.choice([k for k in range(1, 5) if k != exclude_count])
        image, shapes, background = _draw_image(rng, num_shapes, side_range)
        ext = "png" if rng.random() < 0.25 else "jpg"
        rel = f"images/{split}-{image_counter:05d}.{ext}"
        image_counter += 1
        if ext == "jpg":
            image.save(out_dir / rel, quality=95)
        else:
            image.save(out_dir / rel)
        metadata[rel] = {
            "width": image.width,
            "height": image.height,
            "background": list(background),
            "shapes": [asdict(s) for s in shapes],
        }
        return rel, shapes, image.size

    lines = []
    for index, kind in enumerate(kinds):
        line: dict = {"id": f"shapes-{split}-{index:05d}"}
        if kind == "single_image":
            rel, shapes, (width, height) = new_image()
            line.update(image=rel, width=width, height=height)
            if describe and rng.random() < describe:
                line["conversations"], line["question_types"] = _describe_turns(shapes)
            else:
                line["conversations"], line["question_types"] = _single_image_turns(rng, shapes)
        elif kind == "multi_image":
            rel1, shapes1, size1 = new_image()
            rel2, shapes2, size2 = new_image(exclude_count=len(shapes1))
            line.update(image=[rel1, rel2], width_list=[size1[0], size2[0]], height_list=[size1[1], size2[1]])
            line["conversations"], line["question_types"] = _multi_image_turns(rng, shapes1, shapes2)
        else:
            line["conversations"], line["question_types"] = _text_only_turns(rng)
        lines.append(line)

    path = annotation_path(out_dir, split)
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    shapes_metadata_path(out_dir, split).write_text(json.dumps(metadata, indent=1) + "\n")
    return path


def default_cache_dir() -> Path:
    """``$VLMTRAIN_CACHE`` or ``~/.cache/vlmtrain``: where generated assets live between runs."""
    env = os.environ.get("VLMTRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vlmtrain"


def ensure_demo_dataset(root: str | Path | None = None) -> Path:
    """Make sure the demo dataset exists under ``root`` (default cache/demo); return its train jsonl.

    It holds ``annotations.jsonl`` (96 lines, seed 0) and a held-out ``annotations_val.jsonl``
    (32 lines). Generation goes into a temporary sibling directory, the marker is written
    last, and the directory is renamed into place, so an interrupted run is redone and two
    processes (e.g. DDP ranks) calling this at once both end up with one complete copy.
    """
    root = Path(root) if root is not None else default_cache_dir() / "demo"
    if _is_complete(root):
        return annotation_path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-tmp-", dir=root.parent))
    try:
        make_shapes_dataset(tmp, DEMO_NUM_SAMPLES, DEMO_SEED, split="train")
        make_shapes_dataset(tmp, DEMO_NUM_HELDOUT, DEMO_SEED, split="val")
        (tmp / _MARKER).write_text(DEMO_VERSION + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        _install(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return annotation_path(root)


def _is_complete(root: Path) -> bool:
    marker = root / _MARKER
    return marker.is_file() and marker.read_text().strip() == DEMO_VERSION


def _install(tmp: Path, root: Path) -> None:
    """Rename ``tmp`` to ``root``; if another process got there first with a complete copy, keep it."""
    if root.exists() and not _is_complete(root):
        # stale or interrupted copy (no rename is atomic over a non-empty directory): move it aside
        stale = root.with_name(f".{root.name}-stale-{uuid.uuid4().hex}")
        try:
            os.rename(root, stale)
        except FileNotFoundError:
            pass  # another process moved it first
        else:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:
        if not _is_complete(root):
            raise


def _image_size(rng: random.Random, side_range: tuple[int, int]) -> tuple[int, int]:
    """Aspect ratio log-uniform over what the side range allows (1:4 to 4:1 for 160..640).

    Drawing both sides independently would make most images nearly square or 3:2, which all
    land on the same few tiling grids.
    """
    low, high = side_range
    max_log = math.log(high / low)
    ratio = math.exp(rng.uniform(0.0, max_log))  # long / short
    long_side = rng.randint(min(high, math.ceil(low * ratio)), high)
    short_side = max(low, round(long_side / ratio))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _draw_image(
    rng: random.Random, num_shapes: int, side_range: tuple[int, int]
) -> tuple[Image.Image, list[DrawnShape], tuple[int, int, int]]:
    """Draw ``num_shapes`` non-overlapping shapes, shape i in column i and row band perm[i]."""
    width, height = _image_size(rng, side_range)
    background = rng.choice(BACKGROUNDS)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    col_w = width / num_shapes
    band_h = height / num_shapes
    bands = list(range(num_shapes))
    rng.shuffle(bands)
    shapes = []
    for column, band in enumerate(bands):
        cell = min(col_w, band_h)
        size = max(8, int(cell * rng.uniform(0.55, 0.85)))
        x0 = int(column * col_w + rng.uniform(0, col_w - size))
        y0 = int(band * band_h + rng.uniform(0, band_h - size))
        box = (x0, y0, x0 + size - 1, y0 + size - 1)
        shape = rng.choice(SHAPES)
        colour = rng.choice(list(COLOURS))
        draw_shape(draw, shape, box, COLOURS[colour])
        shapes.append(DrawnShape(shape, colour, box))
    return image, shapes, background


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """One filled shape in the square ``box`` (inclusive): a circle, a square, or a triangle with its
    apex at the top centre."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def extreme_shape(shapes: list[DrawnShape], side: str) -> DrawnShape:
    """The shape nearest the ``side`` edge (left/right/top/bottom) of the image."""
    axis = 0 if side in ("left", "right") else 1
    pick = min if side in ("left", "top") else max
    return pick(shapes, key=lambda s: s.centre[axis])


def _single_image_question(rng: random.Random, shapes: list[DrawnShape], kind: str) -> tuple[str, str]:
    if kind == "count":
        return "How many shapes are there?", str(len(shapes))
    if kind == "count_colour":
        colour = rng.choice([s.colour for s in shapes] + list(COLOURS))
        n = sum(s.colour == colour for s in shapes)
        return f"How many {colour} shapes are there?", str(n)
    if kind == "count_shape":
        shape = rng.choice(SHAPES)
        n = sum(s.shape == shape for s in shapes)
        return f"How many {shape}s are there?", str(n)
    if kind == "colour_at":
        if len(shapes) == 1:
            return "What colour is the shape?", shapes[0].colour
        side = rng.choice(list(POSITIONS))
        return f"What colour is the {POSITIONS[side]} shape?", extreme_shape(shapes, side).colour
    if kind == "shape_at":
        if len(shapes) == 1:
            return "What shape is it? Answer circle, square or triangle.", shapes[0].shape
        side = rng.choice(list(POSITIONS))
        return f"Which shape is nearest the {side} edge?", extreme_shape(shapes, side).shape
    if kind == "exists":
        if rng.random() < 0.5:
            target = rng.choice(shapes)
            colour, shape = target.colour, target.shape
        else:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        present = any(s.colour == colour and s.shape == shape for s in shapes)
        article = "an" if colour[0] in "aeiou" else "a"
        return f"Is there {article} {colour} {shape}? Answer yes or no.", "yes" if present else "no"
    raise ValueError(f"unknown question kind {kind!r}")


_SINGLE_KINDS = ("count", "count_colour", "count_shape", "colour_at", "shape_at", "exists")


def _single_image_turns(rng: random.Random, shapes: list[DrawnShape]) -> tuple[list[dict], list[str]]:
    num_turns = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
    turns, kinds = [], rng.sample(_SINGLE_KINDS, num_turns)
    for i, kind in enumerate(kinds):
        question, answer = _single_image_question(rng, shapes, kind)
        if i == 0:
            question = "<image>\n" + question
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns, [f"one_image/{k}" for k in kinds]


def describe_answer(shapes: list[DrawnShape]) -> str:
    """Every shape as "colour shape", left to right, comma-separated."""
    return ", ".join(f"{s.colour} {s.shape}" for s in sorted(shapes, key=lambda s: s.centre[0]))


def _describe_turns(shapes: list[DrawnShape]) -> tuple[list[dict], list[str]]:
    question = "<image>\nList the shapes from left to right, each as colour and shape."
    return [{"from": "human", "value": question}, {"from": "gpt", "value": describe_answer(shapes)}], ["one_image/describe"]


def _multi_image_turns(
    rng: random.Random, shapes1: list[DrawnShape], shapes2: list[DrawnShape]
) -> tuple[list[dict], list[str]]:
    prefix = "Image-1: <image>\nImage-2: <image>\n"
    colours1 = {s.colour for s in shapes1}
    colours2 = {s.colour for s in shapes2}
    only_one = sorted(colours1 ^ colours2)
    kind = rng.choice(["more", "total", "colour"] if only_one else ["more", "total"])
    if kind == "more":
        question = "Which image has more shapes? Answer first or second."
        answer = "first" if len(shapes1) > len(shapes2) else "second"
    elif kind == "total":
        question = "How many shapes are there in the two images together?"
        answer = str(len(shapes1) + len(shapes2))
    else:
        colour = rng.choice(only_one)
        question = f"Which image has a {colour} shape? Answer first or second."
        answer = "first" if colour in colours1 else "second"
    turns = [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return turns, [f"two_images/{kind}"]


_COLOUR_FACTS = (
    ("What colour do you get when you mix blue and yellow?", "green"),
    ("What colour do you get when you mix red and yellow?", "orange"),
    ("What colour do you get when you mix red and blue?", "purple"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What colour is fresh grass?", "green"),
    ("What colour is a ripe banana?", "yellow"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("How many corners does a circle have?", "0"),
)


def _text_only_question(rng: random.Random) -> tuple[str, str, str]:
    """(question, answer, kind)."""
    kind = rng.choice(["plus", "minus", "times", "fact"])
    if kind == "plus":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"What is {a} plus {b}?", str(a + b), kind
    if kind == "minus":
        a, b = sorted((rng.randint(0, 20), rng.randint(0, 20)), reverse=True)
        return f"What is {a} minus {b}?", str(a - b), kind
    if kind == "times":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} times {b}?", str(a * b), kind
    return (*rng.choice(_COLOUR_FACTS), kind)


def _text_only_turns(rng: random.Random) -> tuple[list[dict], list[str]]:
    turns, kinds = [], []
    for _ in range(rng.choices([1, 2], weights=[3, 1])[0]):
        question, answer, kind = _text_only_question(rng)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        kinds.append(f"text/{kind}")
    return turns, kinds
