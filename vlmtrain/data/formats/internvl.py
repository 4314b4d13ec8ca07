"""InternVL's own format: jsonl lines with ``conversations`` [{from: human|gpt|system, value}],
optional ``image`` (a path or a list of paths) and ``video``; paths relative to the dataset root.
(The meta-file side, name -> {root, annotation, ...}, is read by ``vlmtrain.data.meta``.)
"""

from __future__ import annotations

from pathlib import Path

from vlmtrain.data.conversation import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Conversation, SampleError
from vlmtrain.data.formats.source import Record, first_object, read_json_records

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def claims(path: Path) -> bool:
    obj = first_object(path)
    return Path(path).suffix == ".jsonl" and isinstance(obj, dict) and "conversations" in obj


def read(path: Path) -> list[Record]:
    return read_json_records(path)


def _media(obj, key: str, root: Path) -> list:
    value = obj.get(key)
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else list(value)
    return [str(root / p) for p in paths]


def to_conversation(obj: dict, root: Path) -> Conversation:
    messages = obj.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise SampleError("no_turns", "missing or empty 'conversations'")
    system, turns, pending = None, [], None
    for m in messages:
        role = ROLES.get(m.get("from"))
        value = m.get("value")
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
    turns = _place_media(turns, len(images), len(videos))
    return Conversation(turns=turns, system=system, images=images, videos=videos)


def _place_media(turns, n_images: int, n_videos: int):
    """A sample with one image or video and no placeholder gets it before its first query."""
    if not turns:
        return turns
    text = "".join(u for u, _ in turns)
    first_user, first_answer = turns[0]
    if n_images == 1 and IMAGE_PLACEHOLDER not in text:
        turns = [(f"{IMAGE_PLACEHOLDER}\n{first_user}", first_answer)] + turns[1:]
    if n_videos == 1 and VIDEO_PLACEHOLDER not in text:
        first_user, first_answer = turns[0]
        turns = [(f"{VIDEO_PLACEHOLDER}\n{first_user}", first_answer)] + turns[1:]
    return turns
