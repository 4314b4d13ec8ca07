"""Text measures the rules share: word tokens, n-gram repetition, sentences, significant lines.

Words are what ``str.split()`` gives for text without CJK (so the n-gram ratio equals the
InternVL code's on such text), and each CJK character (ideograph, kana, CJK or full-width
punctuation) is a word of its own: Chinese and Japanese are written without spaces, so
``str.split()`` sees a whole paragraph as one word and no n-gram ever repeats.
"""

from __future__ import annotations

import re
from collections import Counter

CJK = (
    "\u3000-\u303f"  # CJK punctuation
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf"  # extension A
    "\u4e00-\u9fff"  # unified ideographs
    "\uf900-\ufaff"  # compatibility ideographs
    "\uff00-\uffef"  # full-width forms (，！？：)
    "\U00020000-\U0002ebef"  # extensions B-F
)
_WORD = re.compile(f"[{CJK}]|[^\\s{CJK}]+")
NGRAM_MEASURES = ("occurrences", "distinct")
_SENTENCE_END = re.compile(r"[.!?;\n\u3002\uff01\uff1f\uff1b]+")


def words(text: str) -> list[str]:
    """Word tokens: whitespace-separated runs, each CJK character on its own."""
    return _WORD.findall(text)


def ngram_repetition(tokens: list[str], n: int, measure: str = "occurrences") -> float:
    """Share of the ``n``-grams of ``tokens`` that repeat; 0 when there are fewer than ``n`` tokens.

    ``occurrences``: n-gram positions whose n-gram occurs more than once, over all positions (a
    text made of one sentence looped k times scores ~1). ``distinct``: distinct n-grams that
    occur more than once, over all positions: the InternVL code's ``calculate_ngram_repetition``
    (a loop of k repeats scores ~1/k, so it fires only on text repeated about twice).
    """
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    counts = Counter(tuple(tokens[i:i + n]) for i in range(total))
    if measure == "distinct":
        return sum(1 for c in counts.values() if c > 1) / total
    if measure == "occurrences":
        return sum(c for c in counts.values() if c > 1) / total
    raise ValueError(f"ngram measure must be occurrences or distinct, got {measure!r}")


def sentences(text: str) -> list[str]:
    """Pieces between sentence ends (. ! ? ; newline and their CJK forms), stripped, non-empty."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def has_content(text: str) -> bool:
    """Whether ``text`` holds a letter, digit or CJK character (not only markup or punctuation)."""
    return any(c.isalnum() for c in text)


def significant_lines(text: str, min_chars: int) -> list[str]:
    """Stripped lines of at least ``min_chars`` characters that hold some content: short lines
    (``}``, ``---``, ``end``) repeat in any code or table and say nothing about the sample."""
    return [s for s in (line.strip() for line in text.splitlines()) if len(s) >= min_chars and has_content(s)]
