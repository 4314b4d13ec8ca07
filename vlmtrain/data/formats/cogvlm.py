"""The CogVLM-SFT-311K folder layout: ``images/NNN.jpg`` with ``labels/NNN.json`` beside it.

A label holds ``captions`` [{role: caption, content}] (a detailed-description sample: the user asks
``CAPTION_PROMPT``, the caption is the answer) or ``conversations`` [{role: user|assistant,
content}]. Without a placeholder the image goes before the first query (``placeholders.place_media``).
Point ``path`` at the folder holding ``images/`` and ``labels/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmtrain.data.conversation import Conversation, SampleError
from vlmtrain.data.formats.source import Record, decode_utf8
from vlmtrain.data.placeholders import place_media
from vlmtrain.errors import MissingPathError

CAPTION_PROMPT = "Describe this image in detail."
"""The question a caption-only label is trained as the answer to."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class LabelRecord(Record):
    """One label file; read when the sample is asked for, so indexing 311K files stays quick."""

    def parse(self) -> dict:
        try:
            text = decode_utf8(Path(self.file).read_bytes(), "label file")
        except OSError as e:
            raise SampleError("missing_media", f"cannot read label file: {e}") from None
        obj = Record(self.file, self.line, text).parse()
        obj["__stem__"] = Path(self.file).stem
        return obj


def claims(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "labels").is_dir() and (Path(path) / "images").is_dir()


def read(path: Path) -> list[Record]:
    labels = Path(path) / "labels"
    if not labels.is_dir():
        raise MissingPathError(f"{path}: a CogVLM-SFT folder needs labels/ (and images/)")
    return [LabelRecord(str(p), 1, "") for p in sorted(labels.glob("*.json"))]


def _image(root: Path, stem: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        p = root / "images" / f"{stem}{suffix}"
        if p.exists():
            return str(p)
    raise SampleError("missing_media", f"no image images/{stem}.* for label {stem}.json")


def to_conversation(obj: dict, root: Path) -> Conversation:
    stem = obj.get("__stem__")
    if "captions" in obj:
        captions = obj["captions"]
        if not isinstance(captions, list) or not captions or not isinstance(captions[0], dict):
            raise SampleError("bad_message", "'captions' must be a non-empty list of {role, content}")
        content = captions[0].get("content")
        if not isinstance(content, str):
            raise SampleError("bad_message", "caption content must be a string")
        turns = [(CAPTION_PROMPT, content)]
    elif "conversations" in obj:
        turns, pending = [], None
        for m in obj["conversations"] if isinstance(obj["conversations"], list) else [None]:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise SampleError("bad_message", "conversations entries need a role and a string content")
            if m.get("role") == "user":
                if pending is not None:
                    raise SampleError("bad_message", "two user messages in a row")
                pending = m["content"]
            elif m.get("role") == "assistant":
                if pending is None:
                    raise SampleError("bad_message", "assistant message without a user message before it")
                turns.append((pending, m["content"]))
                pending = None
            else:
                raise SampleError("bad_message", f"unknown role {m.get('role')!r} (user or assistant)")
    else:
        raise SampleError("no_turns", "label has neither 'captions' nor 'conversations'")
    if not turns:
        raise SampleError("no_turns", "label has no user/assistant pair")
    image = _image(root, stem)
    return Conversation(turns=place_media(turns, 1, 0), images=[image])
