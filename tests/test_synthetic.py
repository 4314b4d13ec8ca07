"""Tests for the synthetic coloured-shapes dataset (vlmtrain.data.synthetic)."""

import json
import multiprocessing
import time

import numpy as np
import pytest
from PIL import Image

from vlmtrain.data.synthetic import (
    COLOURS,
    DEMO_NUM_SAMPLES,
    annotation_path,
    ensure_demo_dataset,
    make_shapes_dataset,
    shapes_metadata_path,
)
from vlmtrain.data.tiling import choose_grid


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    path = make_shapes_dataset(root, 200, seed=3)
    return root, _read(path), json.loads(shapes_metadata_path(root).read_text())


def test_deterministic_bytes(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", 40, seed=7)
    b = make_shapes_dataset(tmp_path / "b", 40, seed=7)
    assert a.read_bytes() == b.read_bytes()
    images_a = sorted((tmp_path / "a" / "images").iterdir())
    images_b = sorted((tmp_path / "b" / "images").iterdir())
    assert [p.name for p in images_a] == [p.name for p in images_b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(images_a, images_b))


def test_heldout_split_and_seed_differ(tmp_path):
    train = make_shapes_dataset(tmp_path, 30, seed=0)
    val = make_shapes_dataset(tmp_path, 30, seed=0, split="val")
    other_seed = make_shapes_dataset(tmp_path / "s1", 30, seed=1)
    assert train == annotation_path(tmp_path) and val == annotation_path(tmp_path, "val")
    assert val.name == "annotations_val.jsonl"
    train_lines, val_lines = _read(train), _read(val)
    assert [line["conversations"] for line in train_lines] != [line["conversations"] for line in val_lines]
    assert train.read_bytes() != other_seed.read_bytes()
    train_images = {line["image"] for line in train_lines if isinstance(line.get("image"), str)}
    val_images = {line["image"] for line in val_lines if isinstance(line.get("image"), str)}
    assert not train_images & val_images  # both splits share one directory without clobbering


def test_line_format_and_mix(dataset):
    root, lines, _ = dataset
    kinds = {"single": 0, "multi": 0, "text": 0}
    for line in lines:
        convs = line["conversations"]
        assert [t["from"] for t in convs] == ["human", "gpt"] * (len(convs) // 2) and convs
        assert all(t["value"] for t in convs)
        image = line.get("image")
        placeholders = sum(t["value"].count("<image>") for t in convs)
        if image is None:
            kinds["text"] += 1
            assert placeholders == 0
        elif isinstance(image, str):
            kinds["single"] += 1
            assert placeholders == 1 and convs[0]["value"].startswith("<image>\n")
            with Image.open(root / image) as im:
                assert im.size == (line["width"], line["height"])
        else:
            kinds["multi"] += 1
            assert len(image) == 2 and placeholders == 2
            assert convs[0]["value"].startswith("Image-1: <image>\nImage-2: <image>\n")
            for rel, w, h in zip(image, line["width_list"], line["height_list"]):
                with Image.open(root / rel) as im:
                    assert im.size == (w, h)
    assert kinds == {"single": 140, "multi": 30, "text": 30}
    for line in lines:  # one question type per assistant turn, named after the line's kind
        types, image = line["question_types"], line.get("image")
        prefix = "text/" if image is None else ("one_image/" if isinstance(image, str) else "two_images/")
        assert len(types) == len(line["conversations"]) // 2 and all(t.startswith(prefix) for t in types)
        if isinstance(image, str):
            assert len(set(types)) == len(types)  # a multi-turn line never repeats a question kind
    assert {t for line in lines for t in line["question_types"]} >= {
        "one_image/count", "one_image/exists", "two_images/total", "text/plus", "text/fact"}
    assert any(len(line["conversations"]) > 2 for line in lines if isinstance(line.get("image"), str))
    assert len({line["id"] for line in lines}) == len(lines)


def test_sizes_span_tiling_grids(dataset):
    _, _, meta = dataset
    sizes = [(m["width"], m["height"]) for m in meta.values()]
    assert all(160 <= s <= 640 for size in sizes for s in size)
    tile_counts = {c * r for c, r in (choose_grid(w, h, 1, 6) for w, h in sizes)}
    assert {1, 2, 3, 4, 6} <= tile_counts
    assert {p.rsplit(".", 1)[1] for p in meta} == {"jpg", "png"}


def _expected(question, shapes):
    """Recompute an answer from the drawn-shape metadata, independently of the generator."""
    q = question.replace("<image>\n", "")
    centres = [((s["box"][0] + s["box"][2]) / 2, (s["box"][1] + s["box"][3]) / 2) for s in shapes]
    extreme = {
        "left": lambda: shapes[int(np.argmin([c[0] for c in centres]))],
        "right": lambda: shapes[int(np.argmax([c[0] for c in centres]))],
        "top": lambda: shapes[int(np.argmin([c[1] for c in centres]))],
        "bottom": lambda: shapes[int(np.argmax([c[1] for c in centres]))],
    }
    if q == "How many shapes are there?":
        return str(len(shapes))
    if q == "What colour is the shape?":
        return shapes[0]["colour"]
    if q.startswith("What shape is it?"):
        return shapes[0]["shape"]
    words = q.rstrip("?").split()
    if q.startswith("How many") and words[2] in COLOURS:
        return str(sum(s["colour"] == words[2] for s in shapes))
    if q.startswith("How many"):
        return str(sum(s["shape"] + "s" == words[2] for s in shapes))
    if q.startswith("What colour is the"):
        return extreme[words[4].removesuffix("most")]()["colour"]
    if q.startswith("Which shape is nearest the"):
        return extreme[words[5]]()["shape"]
    if q.startswith("Is there"):
        colour, shape = words[3], words[4].rstrip("?")
        return "yes" if any(s["colour"] == colour and s["shape"] == shape for s in shapes) else "no"
    raise AssertionError(f"untested question {q!r}")


def test_answers_match_drawn_shapes(dataset):
    _, lines, meta = dataset
    checked = 0
    for line in lines:
        image, convs = line.get("image"), line["conversations"]
        pairs = list(zip(convs[::2], convs[1::2]))
        if isinstance(image, str):
            for human, gpt in pairs:
                assert gpt["value"] == _expected(human["value"], meta[image]["shapes"]), line
                checked += 1
        elif isinstance(image, list):
            (human, gpt), = pairs
            s1, s2 = meta[image[0]]["shapes"], meta[image[1]]["shapes"]
            q = human["value"].split("\n")[-1]
            if q.startswith("Which image has more"):
                assert len(s1) != len(s2)
                expected = "first" if len(s1) > len(s2) else "second"
            elif q.startswith("How many shapes"):
                expected = str(len(s1) + len(s2))
            else:
                colour = q.split()[4]
                has1, has2 = (any(s["colour"] == colour for s in ss) for ss in (s1, s2))
                assert has1 != has2
                expected = "first" if has1 else "second"
            assert gpt["value"] == expected
            checked += 1
        else:
            for human, gpt in pairs:
                words = human["value"].rstrip("?").split()
                if words[:2] == ["What", "is"] and words[3] in ("plus", "minus", "times"):
                    a, b = int(words[2]), int(words[4])
                    assert int(gpt["value"]) == {"plus": a + b, "minus": a - b, "times": a * b}[words[3]]
                    checked += 1
    assert checked > 200


def test_pixels_match_metadata(dataset):
    """The drawn colour is at each shape's centroid and shapes never overlap."""
    root, _, meta = dataset
    for rel, info in list(meta.items())[:60]:
        pixels = np.asarray(Image.open(root / rel).convert("RGB")).astype(int)
        boxes = [s["box"] for s in info["shapes"]]
        for s in info["shapes"]:
            x0, y0, x1, y1 = s["box"]
            cx = (x0 + x1) // 2
            cy = (y0 + 2 * y1) // 3 if s["shape"] == "triangle" else (y0 + y1) // 2
            assert np.abs(pixels[cy, cx] - COLOURS[s["colour"]]).max() < 40, (rel, s)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_generation_is_fast(tmp_path):
    start = time.perf_counter()
    make_shapes_dataset(tmp_path, DEMO_NUM_SAMPLES, seed=0)
    assert time.perf_counter() - start < 2.0


def test_ensure_demo_dataset_reuses_and_repairs(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTRAIN_CACHE", str(tmp_path / "cache"))
    path = ensure_demo_dataset()
    assert path == tmp_path / "cache" / "demo" / "annotations.jsonl"
    assert len(_read(path)) == DEMO_NUM_SAMPLES
    assert (path.parent / "annotations_val.jsonl").is_file()
    mtime = path.stat().st_mtime_ns
    assert ensure_demo_dataset() == path and path.stat().st_mtime_ns == mtime  # cached

    (path.parent / ".complete").unlink()  # as if generation had been interrupted
    path.write_text("truncated")
    assert ensure_demo_dataset() == path
    assert len(_read(path)) == DEMO_NUM_SAMPLES
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "demo"]  # no temp litter


def _ensure_in_subprocess(root):
    return str(ensure_demo_dataset(root))


def test_ensure_demo_dataset_concurrent(tmp_path):
    root = tmp_path / "demo"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.map(_ensure_in_subprocess, [root] * 3)
    assert set(paths) == {str(root / "annotations.jsonl")}
    reference = make_shapes_dataset(tmp_path / "ref", DEMO_NUM_SAMPLES, seed=0)
    assert (root / "annotations.jsonl").read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "ref"]


def test_describe_long_answers(tmp_path):
    """describe > 0: a share of single-image lines asks for every shape left to right, checked
    against the sidecar; describe = 0 draws nothing extra (the default data stays as it was)."""
    from vlmtrain.data.synthetic import describe_answer  # noqa: F401  (public: evaluations use it)

    plain = make_shapes_dataset(tmp_path / "a", 60, seed=5)
    zero = make_shapes_dataset(tmp_path / "b", 60, seed=5, describe=0.0)
    assert plain.read_bytes() == zero.read_bytes()
    path = make_shapes_dataset(tmp_path / "c", 200, seed=5, describe=0.5)
    meta = json.loads(shapes_metadata_path(tmp_path / "c").read_text())
    lines = [l for l in _read(path) if l["question_types"] == ["one_image/describe"]]
    singles = [l for l in _read(path) if isinstance(l.get("image"), str)]
    assert 0.3 < len(lines) / len(singles) < 0.7
    for line in lines:
        shapes = sorted(meta[line["image"]]["shapes"], key=lambda s: s["box"][0] + s["box"][2])
        want = ", ".join(f"{s['colour']} {s['shape']}" for s in shapes)
        assert line["conversations"][1]["value"] == want
        assert line["conversations"][0]["value"].startswith("<image>\n")
    with pytest.raises(ValueError, match="describe"):
        make_shapes_dataset(tmp_path / "d", 5, seed=0, describe=2)
