"""Where media placeholders go, in one place: every input format, the chat console and evaluation
use these rules, so a sample renders the same whichever way it arrives.

InternVL's rule (its training code, ``internvl_chat_finetune.py``): one image with no ``<image>``
gets ``<image>\\n`` before the first query, one video with no ``<video>`` gets ``<video>\\n``; a
``<video>`` then becomes one ``Frame-i: <image>\\n`` line per frame (``expand_videos``).
vlmtrain's extensions: the placeholder may be in any turn (the reference looks at the first
message only); several images with no placeholder get ``Image-1: <image>\\n...`` before the first
query (the InternVL model card's multi-image prompt; the reference rejects the sample); a
``<video>`` not followed by a newline expands too (the reference leaves it as text or rejects it).

ms-swift's rule (``Template._add_default_tags`` and its InternVL templates, ms-swift 3/4): media
without a tag get one tag each at the start of the first message, and every tag renders followed
by a newline (``<img>...</img>\\n``), see ``swift_tags``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmtrain.data.anyres import AnyRes
from vlmtrain.data.conversation import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, SampleError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageLayout:
    """How one image of ``tiles`` tiles is spelled in tokens, and the pixel normalisation its
    vision tower takes: what a model family tells the data side (``Family.layout``).

    An ``<image>`` renders as ``start + context * image_tokens(tiles, size) + end``: ``tokens_per_tile``
    per tile, or with ``anyres`` the count LLaVA-NeXT's unpadded grid gives an image of that size."""

    context: str = "<IMG_CONTEXT>"
    """The token repeated once per image feature (its id is the model's ``image_token_id``)."""
    tokens_per_tile: int = 256
    start: str = "<img>"
    """Text before an image's features (a special token, e.g. InternVL's ``<img>``, or '')."""
    end: str = "</img>"
    special_tokens: tuple[str, ...] = ()
    """Tokens the tokenizer must have (added when missing)."""
    processor_placeholder: str = ""
    """What the exported chat template writes for an image part (the native processor expands it
    to the image's tokens); '': the context token."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    """Pixels reach the ViT as (x / 255 - mean) / std; ``mean`` x 255 is also LLaVA's padding colour."""
    markers_are_text: bool = False
    """``start`` / ``end`` are prompt text tokenised with their neighbours (MiniGPT-4's ``<Img>``),
    not special tokens of their own."""
    image_mode: str = "tile"
    """The model's way of making tiles (``model.image_mode``), where ``data.image_mode`` is unset."""
    token_types: bool = False
    """The model routes positions by type (CogVLM's visual expert): samples carry token_type_ids
    (VISION at context tokens) and their position ids (an image's positions share one id,
    ``vlmtrain.data.token_types``), and collation and packing keep them."""
    anyres: AnyRes | None = None
    """LLaVA-NeXT's grids (``data.image_mode=anyres`` tiles by it): an image's token count depends
    on its size, which samples carry (``image_sizes``) to the model's feature packing."""

    def image_tokens(self, tiles: int, size: tuple[int, int] | None = None) -> int:
        """Context tokens of an image of ``tiles`` tiles; ``size`` (height, width): its original
        size, given for anyres images only."""
        if size is not None:
            if self.anyres is None:
                raise ValueError("an image size is given for a layout without anyres grids")
            return self.anyres.tokens(*size)
        return self.tokens_per_tile * tiles

    def image_text(self, tiles: int, size: tuple[int, int] | None = None) -> str:
        return self.start + self.context * self.image_tokens(tiles, size) + self.end

    @property
    def placeholder(self) -> str:
        return self.processor_placeholder or self.context

    @property
    def tokens(self) -> tuple[str, ...]:
        """The layout's own tokens: start, context, end (those that are set and are tokens)."""
        if self.markers_are_text:
            return (self.context,)
        return tuple(t for t in (self.start, self.context, self.end) if t)


def as_layout(layout) -> ImageLayout:
    """An ImageLayout, or an int: InternVL's layout with that many tokens per tile."""
    return layout if isinstance(layout, ImageLayout) else ImageLayout(tokens_per_tile=int(layout))

_VIDEO_WITH_NEWLINE = re.compile(re.escape(VIDEO_PLACEHOLDER) + r"\n?")


def leading_images(n: int) -> str:
    """The text that puts ``n`` images before a query."""
    if n == 1:
        return f"{IMAGE_PLACEHOLDER}\n"
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n))


def place_media(turns: list, n_images: int, n_videos: int) -> list:
    """InternVL's placement: images (then a video) with no placeholder anywhere go before the
    first query. A sample with some but not all placeholders is left as it is (``Conversation.check``
    rejects it: which image goes where would be a guess)."""
    if not turns:
        return turns
    text = "".join(u + (a or "") for u, a in turns)
    lead = ""
    if n_videos == 1 and VIDEO_PLACEHOLDER not in text:
        lead += f"{VIDEO_PLACEHOLDER}\n"
    if n_images and IMAGE_PLACEHOLDER not in text:
        lead += leading_images(n_images)
    if not lead:
        return turns
    first_user, first_answer = turns[0]
    return [(lead + first_user, first_answer)] + list(turns[1:])


def swift_tags(turns: list, system: str | None, n_images: int, n_videos: int) -> list:
    """ms-swift's placement and layout: missing tags (media minus tags, counted over the system and
    every message) go at the start of the first message, then every tag gets the newline swift's
    InternVL templates put after it. More tags than media is an error (swift would leave the extra
    tags in the text)."""
    text = (system or "") + "".join(u + a for u, a in turns)
    missing = {}
    for tag, n in ((IMAGE_PLACEHOLDER, n_images), (VIDEO_PLACEHOLDER, n_videos)):
        have = text.count(tag)
        if have > n:
            raise SampleError("placeholder_mismatch", f"{have} {tag} tags for {n} listed media")
        missing[tag] = n - have
    if turns:
        # swift adds image tags, then video tags, each at the very front: videos end up first
        lead = VIDEO_PLACEHOLDER * missing[VIDEO_PLACEHOLDER] + IMAGE_PLACEHOLDER * missing[IMAGE_PLACEHOLDER]
        turns = [(lead + turns[0][0], turns[0][1])] + list(turns[1:])

    def newline(s: str) -> str:
        return s.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER + "\n").replace(VIDEO_PLACEHOLDER, VIDEO_PLACEHOLDER + "\n")

    return [(newline(u), newline(a)) for u, a in turns]


def frame_lines(num_frames: int) -> str:
    """What a ``<video>`` of ``num_frames`` frames becomes: one tile per frame, each on its line."""
    return "".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames))


def expand_videos(text: str, frames) -> str:
    """Each ``<video>`` (and the newline after it, if any) -> ``frame_lines`` of its frame count;
    ``frames`` is an iterator of counts, consumed in order."""
    return _VIDEO_WITH_NEWLINE.sub(lambda _: frame_lines(next(frames)), text)
