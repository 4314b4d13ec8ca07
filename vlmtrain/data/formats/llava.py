"""LLaVA's json: a JSON list of ``{"id", "image", "conversations": [{from: human|gpt, value}]}``,
one image per sample (``<image>`` in the first human turn, or placed there when missing); the same
line layout as InternVL's jsonl, so the conversion is InternVL's."""

from __future__ import annotations

from pathlib import Path

from vlmtrain.data.formats.internvl import to_conversation  # noqa: F401  (this format's converter)
from vlmtrain.data.formats.source import Record, first_object, read_json_records


def claims(path: Path) -> bool:
    obj = first_object(path)
    return Path(path).suffix == ".json" and isinstance(obj, dict) and "conversations" in obj


def read(path: Path) -> list[Record]:
    return read_json_records(path)
