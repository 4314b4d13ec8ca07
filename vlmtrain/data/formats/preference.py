"""Preference pairs (MMPR's layout, what ``vlmtrain pairs`` writes): jsonl (or a json list) whose
lines hold a prompt, a ``chosen`` and a ``rejected`` answer to it.

    {"image": "a.jpg", "question": "How many circles?", "chosen": "3", "rejected": "2"}
    {"images": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image>\\n..."},
     {"from": "gpt", "value": "..."}, {"from": "human", "value": "And now?"}], "chosen": "...", "rejected": "..."}

The prompt is ``question`` (one user turn) or ``conversations`` (earlier turns with their answers,
ending with the user turn both answers reply to); media are ``image`` (a path or a list),
``images`` or ``video``, resolved against the dataset root and placed as InternVL's format places
them; ``system`` is optional. Other keys (``provenance``...) are kept in the file and ignored here.
The format is guessed from the first line's ``chosen`` and ``rejected`` keys.

Reference log-probs precomputed in a first pass (``vlmtrain pairs ... pairs.mode=reference``,
for ``stage/reference=precomputed``) live beside the data in ``<name>.ref.jsonl``: one line per
pair, ``{"line", "sha1", "chosen", "rejected"}``, the sha1 of the pair's line text, so a changed
line is an error rather than a stale number.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vlmtrain.data.conversation import Conversation, SampleError
from vlmtrain.data.formats import internvl
from vlmtrain.data.formats.source import Record, first_object, read_json_records
from vlmtrain.errors import UserError


def claims(path: Path) -> bool:
    obj = first_object(path)
    return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj


def read(path: Path) -> list[Record]:
    return read_json_records(path)


def _prompt_messages(obj: dict) -> list:
    question, conversations = obj.get("question"), obj.get("conversations")
    if (question is None) == (conversations is None):
        raise SampleError("bad_pair", "a pair needs exactly one of 'question' and 'conversations'")
    if question is not None:
        if not isinstance(question, str) or not question.strip():
            raise SampleError("bad_pair", "'question' must be a non-empty string")
        return [{"from": "human", "value": question}]
    if not isinstance(conversations, list) or not conversations:
        raise SampleError("no_turns", "'conversations' must be a non-empty list ending with a user message")
    last = conversations[-1]
    if not isinstance(last, dict) or internvl.ROLES.get(last.get("from")) != "user":
        raise SampleError("bad_message", "a pair's 'conversations' must end with the user message both answers reply to")
    return list(conversations)


def _answer(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SampleError("bad_pair", f"'{key}' must be a non-empty string")
    return value


def to_pair(obj: dict, root: Path) -> tuple[Conversation, Conversation]:
    """(chosen, rejected) conversations: the same turns, media and system, the last answer differing."""
    chosen, rejected = _answer(obj, "chosen"), _answer(obj, "rejected")
    if chosen.strip() == rejected.strip():
        raise SampleError("identical_pair", "'chosen' and 'rejected' are the same answer")
    if "images" in obj and "image" in obj:
        raise SampleError("bad_media", "a pair has both 'image' and 'images'")
    messages = _prompt_messages(obj)
    if "system" in obj:
        if not isinstance(obj["system"], str):
            raise SampleError("bad_message", "'system' must be a string")
        messages = [{"from": "system", "value": obj["system"]}, *messages]
    media = {"image": obj.get("images", obj.get("image")), "video": obj.get("video")}
    convs = []
    for answer in (chosen, rejected):
        line = {**media, "conversations": [*messages, {"from": "gpt", "value": answer}]}
        convs.append(internvl.to_conversation(line, root))
    return convs[0], convs[1]


def to_conversation(obj: dict, root: Path) -> Conversation:
    """The chosen conversation: what the tools that read one conversation per line (preview,
    stats, eval) see of a pair."""
    return to_pair(obj, root)[0]


# -- precomputed reference log-probs, beside the data ------------------------------------------------


def reference_path(path: str | Path) -> Path:
    """``data.jsonl`` -> ``data.ref.jsonl`` (same folder)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(path.suffix) + ".ref.jsonl")


def line_hash(text: str) -> str:
    return hashlib.sha1(text.strip().encode("utf-8")).hexdigest()


def write_reference(path: str | Path, rows: list[tuple[Record, float, float]], provenance: dict) -> Path:
    """Write ``reference_path(path)``: a first line of provenance (its ``settings``: the data settings
    of ``SETTINGS`` the log-probs were computed with), then one line per pair."""
    out = reference_path(path)
    with open(out, "w", encoding="utf-8") as f:
        f.write(json.dumps({"provenance": provenance}, ensure_ascii=False) + "\n")
        for record, chosen, rejected in rows:
            f.write(json.dumps({"line": record.line, "sha1": line_hash(record.text),
                                "chosen": chosen, "rejected": rejected}) + "\n")
    return out


SETTINGS = ("n_max", "min_tiles", "template", "tile_size", "use_thumbnail", "max_seq_len", "image_mode")
"""What the log-probs depend on beside the line: the first pass records them, training checks them."""


class ReferenceTable:
    """The precomputed reference log-probs of one preference file (``<name>.ref.jsonl``)."""

    def __init__(self, path: Path, rows: dict[int, tuple[str, float, float]], settings: dict):
        self.path, self.rows, self.settings = path, rows, settings

    def check(self, settings: dict) -> None:
        """The first pass's data settings must be training's (else every log-prob is off)."""
        differ = {k: (self.settings.get(k), settings[k]) for k in SETTINGS
                  if k in settings and k in self.settings and self.settings[k] != settings[k]}
        if differ:
            text = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differ.items())
            raise UserError(f"{self.path}: the reference log-probs were computed with other data settings ({text}): "
                            "compute them again with this data config (vlmtrain pairs pairs.mode=reference)")


def load_reference(path: str | Path) -> ReferenceTable | None:
    """The table of ``reference_path(path)``; None when there is none."""
    ref = reference_path(path)
    if not Path(path).is_file() or not ref.is_file():
        return None
    rows, settings = {}, {}
    with open(ref, encoding="utf-8") as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{ref}:{i}: malformed JSON: {e.msg}") from None
            if "provenance" in row:
                settings = dict(row["provenance"].get("settings") or {})
                continue
            try:
                rows[int(row["line"])] = (str(row["sha1"]), float(row["chosen"]), float(row["rejected"]))
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{ref}:{i}: a reference line needs line, sha1, chosen and rejected") from None
    return ReferenceTable(ref, rows, settings)


def reference_of(table: ReferenceTable | None, record: Record) -> tuple[float, float] | None:
    """The precomputed (chosen, rejected) log-probs of ``record``; a line changed since they were
    computed is an error naming both files."""
    if table is None or record.line not in table.rows:
        return None
    sha, chosen, rejected = table.rows[record.line]
    if sha != line_hash(record.text):
        raise UserError(f"{record.where()}: the line changed since its reference log-probs were computed "
                        f"({reference_path(record.file)}): compute them again (vlmtrain pairs pairs.mode=reference)")
    return chosen, rejected
