"""ms-swift's jsonl/json formats, grounding included, laid out as ms-swift lays them out.

ms-swift 3 / 4: ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}],
"images": [...], "videos": [...], "objects": {"ref": [...], "bbox": [[x1, y1, x2, y2] | [x, y], ...],
"bbox_type": "real" | "norm1", "image_id": [...]}}``; ``content`` is a string or a list of parts
({"type": "text", "text"} / {"type": "image" | "image_url" | "video" | "video_url", ...}).
ms-swift 2.x: ``{"query", "response", "history": [[q, a], ...], "system", "images", "videos",
"objects": [{"caption", "bbox", "bbox_type", "image"}] or that list as a JSON string}``.

As ms-swift 4 renders these for InternVL (``Template._add_default_tags``, ``Internvl2Template``):
media without a tag get one at the start of the first message, and every ``<image>`` renders as
``<img>...</img>`` followed by a newline (``vlmtrain.data.placeholders.swift_tags``); the k-th
``<ref-object>`` becomes ``<ref>ref[k]</ref>`` and the k-th ``<bbox>``
``<box>[[x1, y1, x2, y2]]</box>`` with ``round(x / width * 1000)`` (Python's rounding, half to
even) of its image's size (``bbox_type`` real, the default) or ``round(x * 1000)`` (norm1). As
ms-swift does, x1 > x2 or y1 > y2 are swapped. Videos get the InternVL makers' frame lines.

vlmtrain is stricter where ms-swift would silently train on something else (each is a counted
skip): more tags than media, a box or ref tag without its object, a box outside its image,
inline ``<img>path</img>`` together with an ``images`` list. Its extensions: ``bbox_type``
``norm_1`` (swift 2.x) is ``norm1``; ``norm1000`` / ``norm_1000`` mean thousandths already
(ms-swift 4 would take them for pixels).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vlmtrain.data.conversation import IMAGE_PLACEHOLDER, Conversation, SampleError
from vlmtrain.data.formats.source import Record, first_object, read_json_records
from vlmtrain.data.images import image_size
from vlmtrain.data.placeholders import swift_tags

INLINE_IMAGE = re.compile(r"<img>(.*?)</img>", re.DOTALL)
REF_OBJECT = "<ref-object>"
BBOX = "<bbox>"
_GROUNDING = re.compile(re.escape(REF_OBJECT) + "|" + re.escape(BBOX))

BBOX_TYPES = {None: "real", "": "real", "real": "real", "norm1": "norm1", "norm_1": "norm1",
              "norm1000": "norm1000", "norm_1000": "norm1000"}
"""Every spelling of ``bbox_type`` that ms-swift 2.x-4.x data uses, and what it means here."""


def claims(path: Path) -> bool:
    obj = first_object(path)
    return isinstance(obj, dict) and (isinstance(obj.get("messages"), list) or ("query" in obj and "response" in obj))


def read(path: Path) -> list[Record]:
    return read_json_records(path)


def _resolve(p, root: Path) -> str:
    if not isinstance(p, str) or not p:
        raise SampleError("bad_media", f"media entries must be non-empty path strings, got {p!r}")
    return str(root / p)


def _media_list(obj: dict, *keys: str) -> list:
    for key in keys:
        value = obj.get(key)
        if value not in (None, "", []):
            return [value] if isinstance(value, str) else value if isinstance(value, list) else [value]
    return []


def _content(content, media: dict) -> str:
    """A message's content as text with tags; media named in content parts are collected."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SampleError("bad_message", f"message content must be a string or a list of parts, got {type(content).__name__}")
    text = ""
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
            continue
        base = kind[:-4] if isinstance(kind, str) and kind.endswith("_url") else kind
        if base not in ("image", "video"):
            raise SampleError("bad_message", f"unsupported content part {part!r}")
        value = part.get(kind)
        value = value.get("url") if isinstance(value, dict) else value
        text += f"<{base}>"
        if value:
            media[base].append(value)
    return text


def _messages(obj: dict, media: dict) -> tuple[str | None, list[tuple[str, str]]]:
    messages = obj["messages"]
    system = obj.get("system")
    turns, pending = [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise SampleError("bad_message", f"messages[{i}] needs a role and a content")
        role, content = m["role"], _content(m.get("content"), media)
        if role == "system" and i == 0:
            system = content
        elif role == "user":
            if pending is not None:
                raise SampleError("bad_message", "two user messages in a row")
            pending = content
        elif role == "assistant":
            if pending is None:
                raise SampleError("bad_message", "assistant message without a user message before it")
            turns.append((pending, content))
            pending = None
        else:
            raise SampleError("bad_message", f"unsupported role {role!r} in messages[{i}] (system, user, assistant)")
    if pending is not None:
        raise SampleError("bad_message", "the last message is the user's: there is no answer to learn")
    return system, turns


def _query_response(obj: dict) -> list[tuple[str, str]]:
    query, response = obj.get("query"), obj.get("response")
    if not isinstance(query, str) or not isinstance(response, str):
        raise SampleError("bad_message", "'query' and 'response' must be strings")
    turns, history = [], obj.get("history") or []
    if not isinstance(history, list):
        raise SampleError("bad_message", f"'history' must be a list of [query, response] pairs, got {type(history).__name__}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise SampleError("bad_message", f"history[{i}] must be a [query, response] pair of strings")
        turns.append((pair[0], pair[1]))
    return turns + [(query, response)]


def _objects(obj: dict) -> tuple[list, list, list, list]:
    """(refs, boxes, bbox types, image index per box) from either form of ``objects``."""
    objects = obj.get("objects")
    if objects in (None, "", [], {}):
        return [], [], [], []
    if isinstance(objects, str):
        try:
            objects = json.loads(objects)
        except json.JSONDecodeError as e:
            raise SampleError("bad_bbox", f"'objects' is not valid JSON ({e.msg})") from None
    if isinstance(objects, dict):  # ms-swift 3 / 4
        refs, boxes = objects.get("ref") or [], objects.get("bbox") or []
        image_ids = list(objects.get("image_id") or [])
        if not isinstance(refs, list) or not isinstance(boxes, list) or len(image_ids) > len(boxes):
            raise SampleError("bad_bbox", "'objects' needs ref and bbox lists (and at most one image_id per bbox)")
        kind = objects.get("bbox_type")
        return refs, boxes, [kind] * len(boxes), image_ids + [0] * (len(boxes) - len(image_ids))
    if isinstance(objects, list) and all(isinstance(o, dict) for o in objects):  # ms-swift 2.x
        return ([o.get("caption") for o in objects], [o.get("bbox") for o in objects],
                [o.get("bbox_type") for o in objects], [o.get("image", 0) for o in objects])
    raise SampleError("bad_bbox", "'objects' must be {ref, bbox, bbox_type, image_id} or a list of objects")


def box_thousandths(bbox, bbox_type, size: tuple[int, int] | None) -> list[int]:
    """A box ([x1, y1, x2, y2] or a point [x, y]) in integer thousandths of its image's width and
    height, as ms-swift 4 computes them: ``int(round(x / width * 1000))``."""
    kind = BBOX_TYPES.get(bbox_type) if isinstance(bbox_type, (str, type(None))) else None
    if kind is None:
        raise SampleError("bad_bbox", f"bbox_type must be one of {sorted(k for k in BBOX_TYPES if k)}, got {bbox_type!r}")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) in (2, 4)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise SampleError("bad_bbox", f"bbox must be [x1, y1, x2, y2] or [x, y] numbers, got {bbox!r}")
    box = list(bbox)
    if len(box) == 4:  # ms-swift orders the corners
        box[0], box[2] = min(box[0], box[2]), max(box[0], box[2])
        box[1], box[3] = min(box[1], box[3]), max(box[1], box[3])
    if kind == "norm1000":
        out = [int(round(v)) for v in box]
    else:
        w, h = (1, 1) if kind == "norm1" else size  # type: ignore[misc]  # pixel boxes come with their image size
        out = [int(round(v / (w if i % 2 == 0 else h) * 1000)) for i, v in enumerate(box)]
    if not all(0 <= v <= 1000 for v in out):
        raise SampleError("bad_bbox", f"bbox {list(bbox)} ({bbox_type or 'real'}) is outside its image")
    return out


def to_conversation(obj: dict, root: Path) -> Conversation:
    media = {"image": [], "video": []}
    if isinstance(obj.get("messages"), list):
        system, turns = _messages(obj, media)
    else:
        system, turns = obj.get("system"), _query_response(obj)
    if system is not None and not isinstance(system, str):
        raise SampleError("bad_message", "'system' must be a string")
    listed = _media_list(obj, "images", "image")
    if listed and media["image"]:
        raise SampleError("bad_media", "images both in the message parts and in 'images'")
    images = [_resolve(p, root) for p in (listed or media["image"])]
    videos = [_resolve(p, root) for p in (_media_list(obj, "videos", "video") or media["video"])]

    # ms-swift's compat form: <img>path</img> in the text, when no images are listed
    inline = [m for q, a in turns for m in INLINE_IMAGE.findall(q + a)]
    if inline:
        if images:
            raise SampleError("bad_media", "inline <img>path</img> together with an 'images' list")
        images = [_resolve(p.strip(), root) for p in inline]
        turns = [(INLINE_IMAGE.sub(IMAGE_PLACEHOLDER, q), INLINE_IMAGE.sub(IMAGE_PLACEHOLDER, a)) for q, a in turns]

    turns = swift_tags(turns, system, len(images), len(videos))
    turns = _grounding(obj, turns, images)
    return Conversation(turns=turns, system=system, images=images, videos=videos)


def _grounding(obj: dict, turns: list, images: list) -> list:
    refs, boxes, kinds, image_ids = _objects(obj)
    if not refs and not boxes:
        return turns
    sizes: dict[int, tuple[int, int]] = {}
    counters = {REF_OBJECT: 0, BBOX: 0}

    def replace(m: re.Match) -> str:
        tag = m.group(0)
        k = counters[tag]
        counters[tag] += 1
        if tag == REF_OBJECT:
            if k >= len(refs) or not isinstance(refs[k], str):
                raise SampleError("bad_bbox", f"<ref-object> #{k + 1} has no string ref (the line has {len(refs)})")
            return f"<ref>{refs[k]}</ref>"
        if k >= len(boxes):
            raise SampleError("bad_bbox", f"<bbox> #{k + 1} has no bbox (the line has {len(boxes)})")
        size = None
        if BBOX_TYPES.get(kinds[k]) == "real":
            index = image_ids[k]
            if not isinstance(index, int) or not 0 <= index < len(images):
                raise SampleError("bad_bbox", f"bbox #{k + 1} refers to image {index!r}, the line has {len(images)}")
            if index not in sizes:
                sizes[index] = image_size(images[index])
            size = sizes[index]
        return f"<box>[{box_thousandths(boxes[k], kinds[k], size)}]</box>"

    return [(_GROUNDING.sub(replace, q), _GROUNDING.sub(replace, a)) for q, a in turns]
