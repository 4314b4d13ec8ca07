"""InternVL's own format: jsonl lines with ``conversations`` [{from: human|gpt|system, value}],
optional ``image`` (a path or a list of paths) and ``video``; paths relative to the dataset root.
Media without placeholders are placed by ``vlmtrain.data.placeholders.place_media``.
(The meta-file side, name -> {root, annotation, ...}, is read by ``vlmtrain.data.meta``.)
"""

from __future__ import annotations

from pathlib import Path

from vlmtrain.data.conversation import Conversation, SampleError
from vlmtrain.data.formats.source import Record, first_object, read_json_records
from vlmtrain.data.placeholders import place_media

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def claims(path: Path) -> bool:
    obj = first_object(path)
    return Path(path).suffix == ".jsonl" and isinstance(obj, dict) and "conversations" in obj


def read(path: Path) -> list[Record]:
    return read_json_records(path)


def _media(obj, key: str, root: Path) -> list:
    value = obj.get(key)
    if value is None or value == "" or value == []:  # the reference treats these as no media
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise SampleError("bad_media", f"'{key}' must be a path or a list of paths, got {value!r}")
    return [str(root / p) for p in paths]


def to_conversation(obj: dict, root: Path) -> Conversation:
    messages = obj.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise SampleError("no_turns", "missing or empty 'conversations'")
    system, turns, pending = None, [], None
    for m in messages:
        who = m.get("from") if isinstance(m, dict) else None
        role = ROLES.get(who) if isinstance(who, str) else None
        value = m.get("value") if isinstance(m, dict) else None
        if role is None or not isinstance(value, str):
            raise SampleError("bad_message", f"message needs from in {sorted(ROLES)} and a string value")
        if role == "system":
            system = value
        elif role == "user":
            if pending is not None:
                raise SampleError("bad_message", "two user messages in a row")
            pending = value
        else:
            if pending is None:
                raise SampleError("bad_message", "assistant message without a user message before it")
            turns.append((pending, value))
            pending = None
    images, videos = _media(obj, "image", root), _media(obj, "video", root)
    turns = place_media(turns, len(images), len(videos))
    return Conversation(turns=turns, system=system, images=images, videos=videos)
