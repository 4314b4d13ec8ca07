"""Input formats. Each module exposes ``read(path) -> list[Record]`` turning a user's annotation
file (or folder, or shard pattern) into raw records, ``to_conversation(record_obj, root) ->
Conversation``, and ``claims(path) -> bool`` for guessing the format when the config names none.

Adding a format is one module here plus its test; ``FORMATS`` maps the ``format:`` key of a
dataset config to its module, in the order formats are tried when guessing. An InternVL meta file
(``format: meta``) is not a line format: ``vlmtrain.data.meta`` expands it into datasets.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from vlmtrain.errors import UserError

FORMATS = {
    "wds": "vlmtrain.data.formats.wds",
    "preference": "vlmtrain.data.formats.preference",  # before internvl: its lines may hold conversations
    "cogvlm": "vlmtrain.data.formats.cogvlm",
    "swift": "vlmtrain.data.formats.swift",
    "llava": "vlmtrain.data.formats.llava",
    "internvl": "vlmtrain.data.formats.internvl",
}
META = "meta"


def reader(name: str):
    if name not in FORMATS:
        raise UserError(f"unknown data format {name!r}; known: {', '.join(sorted([*FORMATS, META]))}")
    return importlib.import_module(FORMATS[name])


def guess_format(path: str | Path) -> str:
    """Guess a dataset's format from its path and first record (the format key overrides this)."""
    from vlmtrain.data.meta import is_meta_file

    if is_meta_file(path):
        return META
    for name in FORMATS:
        if reader(name).claims(Path(path)):
            return name
    raise UserError(
        f"cannot guess the format of {path}: set format to one of {', '.join([*FORMATS, META])}"
    )
