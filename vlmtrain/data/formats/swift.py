"""ms-swift's jsonl/json format, grounding included.

A line is ``{"query", "response", "history": [[q, a], ...], "system", "images": [...],
"videos": [...], "objects": "<json string>"}``. ``<image>`` / ``<video>`` placeholders mark where
media go; a line without placeholders gets all its images (then videos) before its last query;
``<img>path</img>`` inside the text is an image at that place. ``objects`` (a JSON string or a list)
holds ``{"caption", "bbox": [x1, y1, x2, y2], "bbox_type": "real" | "norm_1000" | "norm_1",
"image": index}``; the k-th ``<ref-object>`` becomes ``<ref>caption</ref>`` and the k-th ``<bbox>``
``<box>[[x1, y1, x2, y2]]</box>`` of the k-th object, in integer thousandths of its image's size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vlmtrain.data.conversation import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Conversation, SampleError
from vlmtrain.data.formats.source import Record, read_json_records
from vlmtrain.data.images import image_size

INLINE_IMAGE = re.compile(r"<img>(.*?)</img>", re.DOTALL)
REF_OBJECT = "<ref-object>"
BBOX = "<bbox>"
_MEDIA_OR_GROUNDING = re.compile(r"<image>|<img>.*?</img>|<ref-object>|<bbox>", re.DOTALL)


def claims(path: Path) -> bool:
    from vlmtrain.data.formats.source import first_object

    obj = first_object(path)
    return obj is not None and "query" in obj and "response" in obj


def read(path: Path) -> list[Record]:
    return read_json_records(path)


def _resolve(p, root: Path) -> str:
    if not isinstance(p, str) or not p:
        raise SampleError("bad_media", f"media entries must be non-empty path strings, got {p!r}")
    return str(root / p)


def _turns(obj: dict) -> list[tuple[str, str]]:
    query, response = obj.get("query"), obj.get("response")
    if not isinstance(query, str) or not isinstance(response, str):
        raise SampleError("bad_message", "'query' and 'response' must be strings")
    history = obj.get("history") or []
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise SampleError("bad_message", f"history[{i}] must be a [query, response] pair of strings")
        turns.append((pair[0], pair[1]))
    return turns + [(query, response)]


def _objects(obj: dict) -> list[dict]:
    objects = obj.get("objects")
    if objects in (None, "", []):
        return []
    if isinstance(objects, str):
        try:
            objects = json.loads(objects)
        except json.JSONDecodeError as e:
            raise SampleError("bad_bbox", f"'objects' is not valid JSON ({e.msg})") from None
    if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
        raise SampleError("bad_bbox", "'objects' must be a list of objects")
    return objects


def box_thousandths(bbox, bbox_type: str, size: tuple[int, int] | None) -> list[int]:
    """[x1, y1, x2, y2] -> integer thousandths of the image's width and height; out of range raises."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise SampleError("bad_bbox", f"bbox must be 4 numbers [x1, y1, x2, y2], got {bbox!r}")
    if bbox_type == "real":
        if size is None:
            raise SampleError("bad_bbox", "a 'real' (pixel) bbox needs an image")
        w, h = size
        scale = (1000 / w, 1000 / h, 1000 / w, 1000 / h)
        limit = (w, h, w, h)
    elif bbox_type == "norm_1000":
        scale, limit = (1, 1, 1, 1), (1000,) * 4
    elif bbox_type == "norm_1":
        scale, limit = (1000,) * 4, (1,) * 4
    else:
        raise SampleError("bad_bbox", f"bbox_type must be real, norm_1000 or norm_1, got {bbox_type!r}")
    x1, y1, x2, y2 = bbox
    if not (0 <= x1 <= x2 <= limit[0] and 0 <= y1 <= y2 <= limit[1]):
        raise SampleError("bad_bbox", f"bbox {list(bbox)} ({bbox_type}) is outside its image or not x1<=x2, y1<=y2")
    return [int(round(v * s)) for v, s in zip(bbox, scale)]


def to_conversation(obj: dict, root: Path) -> Conversation:
    turns = _turns(obj)
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise SampleError("bad_message", "'system' must be a string")
    listed = [_resolve(p, root) for p in (obj.get("images") or [])]
    videos = [_resolve(p, root) for p in (obj.get("videos") or [])]
    objects = _objects(obj)

    text = "".join(q + a for q, a in turns)
    n_listed_placeholders = text.count(IMAGE_PLACEHOLDER)
    if listed and n_listed_placeholders == 0:
        q, a = turns[-1]
        turns[-1] = (IMAGE_PLACEHOLDER * len(listed) + q, a)
    if videos and VIDEO_PLACEHOLDER not in text:
        q, a = turns[-1]
        turns[-1] = (VIDEO_PLACEHOLDER * len(videos) + q, a)
    n_placeholders = "".join(q + a for q, a in turns).count(IMAGE_PLACEHOLDER)
    if n_placeholders != len(listed):
        raise SampleError(
            "placeholder_mismatch", f"{n_placeholders} <image> placeholders for {len(listed)} listed images"
        )

    # walk the text once, in reading order: images (listed and inline) in placeholder order, and the
    # k-th <ref-object> / <bbox> of the k-th object
    images: list = []
    sizes: dict[int, tuple[int, int]] = {}
    counters = {"listed": 0, "ref": 0, "box": 0}

    def size_of(index: int):
        if not 0 <= index < len(images_all):
            raise SampleError("bad_bbox", f"object refers to image {index}, the line has {len(images_all)}")
        if index not in sizes:
            sizes[index] = image_size(images_all[index])
        return sizes[index]

    def replace(m: re.Match) -> str:
        token = m.group(0)
        if token == IMAGE_PLACEHOLDER:
            images.append(listed[counters["listed"]])
            counters["listed"] += 1
            return IMAGE_PLACEHOLDER
        if token.startswith("<img>"):
            images.append(_resolve(m.group(0)[5:-6].strip(), root))
            return IMAGE_PLACEHOLDER
        key = "ref" if token == REF_OBJECT else "box"
        k = counters[key]
        counters[key] += 1
        if k >= len(objects):
            raise SampleError("bad_bbox", f"{token} #{k + 1} has no object (the line has {len(objects)})")
        o = objects[k]
        if key == "ref":
            caption = o.get("caption")
            if not isinstance(caption, str):
                raise SampleError("bad_bbox", f"object {k} needs a string caption")
            return f"<ref>{caption}</ref>"
        bbox_type = o.get("bbox_type", "real")
        size = size_of(int(o.get("image", 0))) if bbox_type == "real" else None
        x1, y1, x2, y2 = box_thousandths(o.get("bbox"), bbox_type, size)
        return f"<box>[[{x1}, {y1}, {x2}, {y2}]]</box>"

    # a 'real' box may name an image that appears later in the text: know the whole order first
    images_all = _image_order(turns, listed, root)
    out = [(_MEDIA_OR_GROUNDING.sub(replace, q), _MEDIA_OR_GROUNDING.sub(replace, a)) for q, a in turns]
    return Conversation(turns=out, system=system, images=images, videos=videos)


def _image_order(turns, listed: list, root: Path) -> list:
    order, k = [], 0
    for q, a in turns:
        for m in _MEDIA_OR_GROUNDING.finditer(q + a):
            token = m.group(0)
            if token == IMAGE_PLACEHOLDER:
                order.append(listed[k])
                k += 1
            elif token.startswith("<img>"):
                order.append(_resolve(token[5:-6].strip(), root))
    return order
