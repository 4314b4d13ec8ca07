"""Input formats. Each module exposes ``read(path, root) -> Source`` turning a user's annotation
file (or folder) into raw records, and ``to_conversation(record, root) -> Conversation``.

Adding a format is one module here plus its test; ``FORMATS`` maps the ``format:`` key of a
dataset config to its module.
"""

from __future__ import annotations

import importlib
from pathlib import Path

FORMATS = {
    "internvl": "vlmtrain.data.formats.internvl",
}


def reader(name: str):
    if name not in FORMATS:
        raise ValueError(f"unknown data format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return importlib.import_module(FORMATS[name])


def guess_format(path: str | Path) -> str:
    """Guess a dataset's format from its path (the format key overrides this)."""
    p = Path(path)
    for name in FORMATS:
        mod = reader(name)
        if getattr(mod, "claims", None) and mod.claims(p):
            return name
    return "internvl"
