"""The CogVLM-SFT-311K folder layout: ``images/NNN.jpg`` with ``labels/NNN.json`` beside it.

Label folders: the dataset card (THUDM/CogVLM-SFT-311K, README) draws ``labels/``; the released
archive's subsets hold ``labels_en/`` and ``labels_zh/`` (English and Chinese labels of the same
images, as THUDM's CogVLM2 finetune demo README says). ``path`` is a subset folder (holding
``images/`` and one label folder: ``labels/``, else the only one of ``labels_en/`` / ``labels_zh/``)
or a label folder itself (``.../llava_instruction_single_conversation_formate/labels_zh``: its
sibling ``images/`` holds the images). A folder with both ``labels_en/`` and ``labels_zh/`` and no
``labels/`` is refused naming both, since which language to train on is the user's choice.

A label holds ``captions`` [{role: caption, content}] (a detailed-description sample: the user asks
``CAPTION_PROMPT``, the caption is the answer) or ``conversations`` [{role: user|assistant,
content}]. Without a placeholder the image goes before the first query (``placeholders.place_media``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmtrain.data.conversation import Conversation, SampleError
from vlmtrain.data.formats.source import Record, decode_utf8
from vlmtrain.data.placeholders import place_media
from vlmtrain.errors import MissingPathError, UserError

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
        obj["__file__"] = str(self.file)
        return obj


LABEL_FOLDERS = ("labels", "labels_en", "labels_zh")
"""Label folder names, in the order a subset folder is searched."""


def _is_label_folder(p: Path) -> bool:
    return p.is_dir() and p.name in LABEL_FOLDERS and (p.parent / "images").is_dir()


def claims(path: Path) -> bool:
    p = Path(path)
    if _is_label_folder(p):
        return True
    return p.is_dir() and (p / "images").is_dir() and any((p / n).is_dir() for n in LABEL_FOLDERS)


def default_root(path: Path) -> Path:
    """The dataset root (where ``images/`` is): the subset folder, also when ``path`` names its label folder."""
    p = Path(path)
    return p.parent if _is_label_folder(p) else p


def label_folder(path: Path) -> Path:
    """The label folder ``path`` names (see the module's docstring)."""
    p = Path(path)
    if _is_label_folder(p):
        return p
    if (p / "labels").is_dir():
        return p / "labels"
    found = [p / n for n in LABEL_FOLDERS[1:] if (p / n).is_dir()]
    if len(found) > 1:
        raise UserError(f"{p}: holds {' and '.join(f.name + '/' for f in found)}: point the dataset's path at one of "
                        f"them ({found[0]} for English, {found[1]} for Chinese)")
    if not found:
        raise MissingPathError(f"{p}: a CogVLM-SFT folder needs images/ and labels/ (or labels_en/ or labels_zh/)")
    return found[0]


def read(path: Path) -> list[Record]:
    return [LabelRecord(str(p), 1, "") for p in sorted(label_folder(Path(path)).glob("*.json"))]


def _image(root: Path, label_file: str | None, stem: str) -> str:
    folders = [root / "images"]
    if label_file:  # the label folder's sibling, when root is the label folder itself
        folders.append(Path(label_file).parent.parent / "images")
    for folder in folders:
        for suffix in IMAGE_SUFFIXES:
            p = folder / f"{stem}{suffix}"
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
    image = _image(root, obj.get("__file__"), stem)
    return Conversation(turns=place_media(turns, 1, 0), images=[image])
