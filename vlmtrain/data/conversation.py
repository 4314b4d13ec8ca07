"""The one in-memory form every input format is read into."""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


class SampleError(Exception):
    """A line that cannot become a correct sample; ``reason`` is the short key it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Conversation:
    """A multi-turn conversation with media.

    ``turns`` alternate user / assistant, starting with the user; media go where the text holds
    ``<image>`` / ``<video>`` placeholders, in order. ``images`` and ``videos`` are paths (already
    resolved against the dataset root) or in-memory bytes.
    """

    turns: list[tuple[str, str]]
    system: str | None = None
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)

    def check(self) -> None:
        if not self.turns:
            raise SampleError("no_turns", "conversation has no user/assistant turn")
        for user, answer in self.turns:
            if not answer.strip():
                raise SampleError("empty_answer", "an assistant answer is empty")
        text = "".join(u + a for u, a in self.turns)
        n_img, n_vid = text.count(IMAGE_PLACEHOLDER), text.count(VIDEO_PLACEHOLDER)
        if n_img != len(self.images) or n_vid != len(self.videos):
            raise SampleError(
                "placeholder_mismatch",
                f"{n_img} <image> / {n_vid} <video> placeholders for {len(self.images)} images / "
                f"{len(self.videos)} videos",
            )
