"""The rule protocol and the text rules.

A rule is one component of the ``filter`` config group (``conf/filter/rule/<name>.yaml``, built
with its ``_target_``); the key it sits under in ``filter.rules`` is its name. Three kinds:

- ``Rule.check(sample)`` looks at one sample and returns a ``Finding`` (its score and whether it
  fired) or None when the rule does not apply: it runs inside each slice;
- ``CorpusRule`` (duplicates) computes ``features(sample)`` inside the slices and decides at the
  merge, where every sample of the data is seen in order;
- ``BatchRule`` (LLM scoring, ``vlmtrain.filtering.llm``) gets a slice's samples in batches.

Every rule takes ``exempt``: dataset names (fnmatch patterns, e.g. academic sets exempt from
repetition detection) it does not look at. Text rules look at the assistant answers, or
``fields: all`` for the user turns too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch

from vlmtrain.data.conversation import Conversation
from vlmtrain.filtering import text as T

DETAIL_CHARS = 160
"""A finding's ``detail`` (the offending snippet, for review) is cut to this many characters."""


@dataclass
class Sample:
    """One source record as the rules see it: where it is, its source object, its Conversation."""

    dataset: str
    index: int
    """0-based position among the dataset's records."""
    where: str
    obj: dict
    conv: Conversation
    media: object = None
    """A ``vlmtrain.filtering.media.MediaProbe`` (decodes each image once for all media rules)."""

    @property
    def answers(self) -> list[str]:
        return [a for _, a in self.conv.turns]  # type: ignore[misc]  # a read conversation's answers are set

    @property
    def queries(self) -> list[str]:
        return [u for u, _ in self.conv.turns]

    @property
    def multimodal(self) -> bool:
        return bool(self.conv.images or self.conv.videos)


@dataclass
class Finding:
    """What a rule measured on a sample: its main ``score`` (plotted), whether it ``fired``, and
    the figures a reviewer needs (``scores``, ``detail``)."""

    fired: bool
    score: float | None = None
    scores: dict = field(default_factory=dict)
    detail: str = ""
    group: str = ""
    """A sub-population the score belongs to (an LLM prompt's domain), for the report's histograms."""
    review: str = ""
    """Something a human should look at although the rule did not decide (an unparseable LLM reply)."""

    def reason(self, rule: str) -> dict:
        out = {"rule": rule}
        if self.score is not None:
            out["score"] = round(float(self.score), 4)
        out.update({k: round(v, 4) if isinstance(v, float) else v for k, v in self.scores.items()})
        if self.detail:
            out["detail"] = self.detail[:DETAIL_CHARS]
        return out


class Rule:
    """Base of every rule: a name, the datasets it leaves alone, and ``check``."""

    kind = "sample"

    def __init__(self, name: str = "", exempt: Sequence[str] = ()):
        self.name = name
        self.exempt = list(exempt or [])

    def exempts(self, dataset: str) -> bool:
        return any(fnmatch(dataset, p) for p in self.exempt)

    def check(self, sample: Sample) -> Finding | None:
        raise NotImplementedError


class TextRule(Rule):
    """A rule measured on each answer (``fields: all``: each user turn too); the sample's score is
    the worst piece's and the rule fires when any piece does."""

    def __init__(self, name: str = "", exempt: Sequence[str] = (), fields: str = "answers"):
        super().__init__(name, exempt)
        if fields not in ("answers", "all"):
            raise ValueError(f"fields must be answers or all, got {fields!r}")
        self.fields = fields

    def pieces(self, sample: Sample) -> list[str]:
        return sample.answers if self.fields == "answers" else sample.queries + sample.answers

    def measure(self, text: str) -> Finding:
        raise NotImplementedError

    def check(self, sample: Sample) -> Finding | None:
        worst = None
        for piece in self.pieces(sample):
            f = self.measure(piece)
            if worst is None or (f.fired, f.score or 0) > (worst.fired, worst.score or 0):
                worst = f
        return worst


class NgramRepetition(TextRule):
    """Share of repeated word n-grams in an answer above ``threshold`` (InternVL's 10-gram / 0.4).

    ``measure: occurrences`` (default) counts the positions of repeated n-grams, so a loop of any
    length scores ~1; ``measure: distinct`` is the InternVL code's exact arithmetic (distinct
    repeated n-grams over positions), which scores a sentence looped k times ~1/k and so passes
    loops of three repeats or more. Words per ``vlmtrain.filtering.text.words`` (CJK per character).
    """

    def __init__(self, name: str = "", exempt: Sequence[str] = (), fields: str = "answers", n: int = 10,
                 threshold: float = 0.4, measure: str = "occurrences"):
        super().__init__(name, exempt, fields)
        if measure not in T.NGRAM_MEASURES:
            raise ValueError(f"measure must be one of {', '.join(T.NGRAM_MEASURES)}, got {measure!r}")
        self.n, self.threshold, self.measure_name = n, threshold, measure

    def measure(self, text: str) -> Finding:
        r = T.ngram_repetition(T.words(text), self.n, self.measure_name)
        return Finding(r > self.threshold, r, {"threshold": self.threshold, "n": self.n})


class RepeatedLines(TextRule):
    """Too many duplicate lines: at least ``min_duplicates`` lines equal to an earlier line, and
    more than ``max_share`` of the significant lines (``min_chars`` characters with some content)."""

    def __init__(self, name: str = "", exempt: Sequence[str] = (), fields: str = "answers", min_chars: int = 10,
                 min_duplicates: int = 2, max_share: float = 0.3):
        super().__init__(name, exempt, fields)
        self.min_chars, self.min_duplicates, self.max_share = min_chars, min_duplicates, max_share

    def measure(self, text: str) -> Finding:
        lines = T.significant_lines(text, self.min_chars)
        seen, dups, first_dup = set(), 0, ""
        for line in lines:
            if line in seen:
                dups += 1
                first_dup = first_dup or line
            seen.add(line)
        share = dups / len(lines) if lines else 0.0
        fired = dups >= self.min_duplicates and share > self.max_share
        return Finding(fired, share, {"duplicates": dups, "lines": len(lines), "max_share": self.max_share},
                       first_dup if fired else "")


class SentenceLength(TextRule):
    """Abnormal sentences: one longer than ``max_tokens`` words (run-on or garbled text with no
    sentence end), or one word longer than ``max_word_chars`` characters (a blob, base64, no spaces)."""

    def __init__(self, name: str = "", exempt: Sequence[str] = (), fields: str = "answers", max_tokens: int = 250,
                 max_word_chars: int = 256):
        super().__init__(name, exempt, fields)
        self.max_tokens, self.max_word_chars = max_tokens, max_word_chars

    def measure(self, text: str) -> Finding:
        longest, longest_word, snippet = 0, 0, ""
        for s in T.sentences(text):
            toks = T.words(s)
            if len(toks) > longest:
                longest, snippet = len(toks), s
            longest_word = max([longest_word] + [len(w) for w in toks])
        fired = longest > self.max_tokens or longest_word > self.max_word_chars
        return Finding(fired, float(longest), {"longest_word": longest_word, "max_tokens": self.max_tokens,
                                               "max_word_chars": self.max_word_chars}, snippet if fired else "")


class AnswerLength(TextRule):
    """An answer longer than ``max_chars`` characters (or shorter than ``min_chars``, 0: off)."""

    def __init__(self, name: str = "", exempt: Sequence[str] = (), fields: str = "answers", max_chars: int = 32000,
                 min_chars: int = 0):
        super().__init__(name, exempt, fields)
        self.max_chars, self.min_chars = max_chars, min_chars

    def measure(self, text: str) -> Finding:
        n = len(text.strip())
        return Finding(n > self.max_chars or n < self.min_chars, float(n),
                       {"max_chars": self.max_chars, "min_chars": self.min_chars})


class CharRun(TextRule):
    """A run of one character longer than ``max_run`` (``!!!!...``, ``aaaa...``, ``哈哈哈...``);
    characters in ``markup`` (rules, underlines, indentation, table of contents dots) may run up to
    ``max_markup_run``."""

    def __init__(self, name: str = "", exempt: Sequence[str] = (), fields: str = "answers", max_run: int = 24,
                 markup: str = " \t-=_*#~.|", max_markup_run: int = 120):
        super().__init__(name, exempt, fields)
        self.max_run, self.markup, self.max_markup_run = max_run, set(markup), max_markup_run
        self._run = re.compile(rf"(.)\1{{{max(0, min(max_run, max_markup_run))},}}", re.DOTALL)

    def measure(self, text: str) -> Finding:
        runs = [(len(m.group(0)) > (self.max_markup_run if m.group(1) in self.markup else self.max_run),
                 len(m.group(0)), m.group(1)) for m in self._run.finditer(text)]
        fired, n, char = max(runs, default=(False, 0, ""))  # a run over its limit first, then the longest
        return Finding(fired, float(n), {"char": char, "max_run": self.max_run}, (char * 8 + "...") if fired else "")


class ZeroRun(TextRule):
    """More than ``max_zeros`` zeros in a row, counting zeros separated only by spaces, commas,
    colons, semicolons, dots or bars (``000000...``, ``0, 0, 0, ...``, ``0.0.0...``)."""

    def __init__(self, name: str = "", exempt: Sequence[str] = (), fields: str = "answers", max_zeros: int = 16):
        super().__init__(name, exempt, fields)
        self.max_zeros = max_zeros
        self._zeros = re.compile(r"0(?:[\s,.;:|]*0)*")

    def measure(self, text: str) -> Finding:
        longest = max((m.group(0).count("0") for m in self._zeros.finditer(text)), default=0)
        return Finding(longest > self.max_zeros, float(longest), {"max_zeros": self.max_zeros})


class PlaceholderAnswer(TextRule):
    """An answer with no content: only media placeholders or special tokens, only punctuation, or
    one of ``placeholders`` (case-insensitive). Whitespace-only answers never get here: the readers
    reject them (``empty_answer``)."""

    DEFAULT = ["placeholder", "[placeholder]", "todo", "tbd", "lorem ipsum", "null", "nan", "undefined",
               "{answer}", "<answer>", "answer"]

    def __init__(self, name: str = "", exempt: Sequence[str] = (), fields: str = "answers",
                 placeholders: Sequence[str] | None = None,
                 tokens: str = r"<image>|<video>|<unk>|<pad>|<s>|</s>|<\|[a-z_]+\|>|\[image\]|\[video\]"):
        super().__init__(name, exempt, fields)
        self.placeholders = {p.strip().lower() for p in (self.DEFAULT if placeholders is None else placeholders)}
        self._tokens = re.compile(tokens, re.IGNORECASE)

    def measure(self, text: str) -> Finding:
        bare = self._tokens.sub(" ", text).strip()
        fired = not T.has_content(bare) or bare.lower().strip(" .!?") in self.placeholders
        return Finding(fired, None, {}, text.strip() if fired else "")
