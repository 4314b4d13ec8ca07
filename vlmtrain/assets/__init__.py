"""Files vlmtrain ships so the tiny configs and tests run with no download."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
"""Byte-level BPE, 2048 tokens, every chat-template marker a single id; rebuilt by
``python -m vlmtrain.assets.build_tokenizer``."""


def load_tokenizer(path: str | Path | None = None):
    """The tokenizer at ``path`` (default: the shipped one), from local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or TOKENIZER_DIR), local_files_only=True)
