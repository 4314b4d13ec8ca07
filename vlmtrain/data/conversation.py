"""The one in-memory form every input format is read into."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_MEDIA = re.compile(re.escape(IMAGE_PLACEHOLDER) + "|" + re.escape(VIDEO_PLACEHOLDER))


class SampleError(Exception):
    """A line that cannot become a correct sample; ``reason`` is the short key it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_BOX = re.compile(r"<box>(.*?)</box>", re.DOTALL)


def check_boxes(text: str) -> None:
    """Every ``<box>[[x1, y1, x2, y2], ...]</box>`` (or ``[[x, y]]``) holds integer thousandths of
    its image, 0..1000: anything else (``[true, 2, 3, 4]``, pixels beyond the image) would train a
    wrong target silently, so the line is a counted ``bad_bbox`` skip."""
    for m in _BOX.finditer(text):
        try:
            boxes = json.loads(m.group(1))
        except json.JSONDecodeError:
            boxes = None
        if not (isinstance(boxes, list) and boxes and all(
                isinstance(b, list) and len(b) in (2, 4)
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1000 for v in b)
                for b in boxes)):
            raise SampleError("bad_bbox", f"<box>{m.group(1)[:60]}</box> is not [[x1, y1, x2, y2], ...] in "
                                          "integer thousandths 0..1000 of the image")


@dataclass
class Conversation:
    """A multi-turn conversation with media.

    ``turns`` are (user, answer) pairs; media go where the text holds ``<image>`` / ``<video>``
    placeholders, in order (``vlmtrain.data.placeholders`` puts them there when the data does not).
    ``images`` and ``videos`` are paths (already resolved against the dataset root), in-memory bytes
    or PIL images. The last answer may be None: a prompt whose answer is to be generated.
    ``system``: the data's own system message ("" is an empty system block); None: the config's
    or the template's.
    """

    turns: list[tuple[str, str | None]]
    system: str | None = None
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)

    def check(self) -> None:
        if not self.turns:
            raise SampleError("no_turns", "conversation has no user/assistant turn")
        if self.system is not None and not isinstance(self.system, str):
            raise SampleError("bad_message", f"the system message must be text, got {type(self.system).__name__}")
        for user, answer in self.turns:
            if not isinstance(user, str) or not (answer is None or isinstance(answer, str)):
                bad = user if not isinstance(user, str) else answer
                raise SampleError("bad_message", f"a message must be text, got {type(bad).__name__} {bad!r:.60}")
            for text in (user, answer or ""):
                check_boxes(text)
            if not answer or not answer.strip():
                raise SampleError("empty_answer", "an assistant answer is empty")
        self.check_media()

    def media(self) -> list[tuple[str, object]]:
        """("image" | "video", source) in the order their placeholders appear."""
        images, videos, out = iter(self.images), iter(self.videos), []
        for user, answer in self.turns:
            for m in _MEDIA.finditer(user + (answer or "")):
                out.append(("image", next(images)) if m.group(0) == IMAGE_PLACEHOLDER else ("video", next(videos)))
        return out

    def check_media(self) -> None:
        """One placeholder per image and per video."""
        text = "".join(u + (a or "") for u, a in self.turns)
        n_img, n_vid = text.count(IMAGE_PLACEHOLDER), text.count(VIDEO_PLACEHOLDER)
        if n_img != len(self.images) or n_vid != len(self.videos):
            raise SampleError(
                "placeholder_mismatch",
                f"{n_img} <image> / {n_vid} <video> placeholders for {len(self.images)} images / "
                f"{len(self.videos)} videos",
            )
