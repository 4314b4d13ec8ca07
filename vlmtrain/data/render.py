"""The one renderer: a conversation, its chat template and its media -> text, token ids and labels.

Training (``vlmtrain.data.encode``), chat and evaluation (``vlmtrain.inference``, with the last
answer left open) all lay a conversation out here, and the exported Jinja chat template is tested
against it, so a checkpoint sees the same string wherever it runs.

Rules, each as InternVL's training code has them (``tests/test_reference_goldens.py`` holds them
to its outputs):

- BOS: the tokenizer's BOS starts the sequence when the tokenizer adds one (``tokenizer_adds_bos``);
  ``text`` then starts with the BOS token's string.
- ``<video>`` (and the newline after it) -> ``Frame-1: <image>\\n...Frame-N: <image>\\n``, one tile
  per frame (``placeholders.expand_videos``), then templates that strip (internlm2-chat) strip
  every message, then each ``<image>`` -> ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles)
  + ``</img>``.
- Token ids are those of the whole text tokenised at once (image tokens are special tokens, so
  the text between them is tokenised on its own, which is the same); a token carries loss when
  it starts inside an answer or its end marker, and image tokens never do.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from vlmtrain.data.conversation import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Conversation, SampleError
from vlmtrain.data.placeholders import ImageLayout, as_layout, expand_videos
from vlmtrain.data.templates import ChatTemplate
from vlmtrain.errors import UserError
from vlmtrain.training.loss import IGNORE_INDEX

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


_MEDIA = re.compile(re.escape(IMAGE_PLACEHOLDER) + "|" + re.escape(VIDEO_PLACEHOLDER))


def images_first(text: str) -> str:
    """LLaVA's ``preprocess_multimodal``: a message with images becomes its images (each
    ``<image>\\n``) followed by the rest of its text, stripped; one without stays as it is."""
    n = text.count(IMAGE_PLACEHOLDER)
    if not n:
        return text
    return (f"{IMAGE_PLACEHOLDER}\n" * n + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with its BOS token: InternLM2's and Phi-3's do,
    Qwen2.5's has none. InternVL's training code reads ``tokenizer.add_bos_token``; transformers
    5 does not always set that flag, so the tokenizer's own output decides too."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if getattr(tokenizer, "add_bos_token", False):
        return True
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


@dataclass
class Rendered:
    """A rendered conversation. ``text`` decodes from ``input_ids`` (image tokens spelled out)."""

    text: str
    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int] = field(default_factory=list)
    """Token count after each complete turn (answer, end marker and separator): where a sample
    may be cut without cutting a turn."""


@dataclass
class _Piece:
    text: str
    loss: bool = False
    tiles: int = 0
    """> 0: an image of that many tiles (text is unused)."""
    size: tuple[int, int] | None = None
    """An anyres image's original (height, width): its token count depends on it."""
    markers: bool = True
    """An image with the layout's start / end tokens."""
    apart: bool = False
    """Tokenised apart from the text before it (the run is flushed first)."""


class Renderer:
    """Renders conversations for one tokenizer and one image layout (a model family's
    ``ImageLayout``; an int: InternVL's layout with that many tokens per tile)."""

    def __init__(self, tokenizer, layout: ImageLayout | int):
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("vlmtrain renders with a fast tokenizer (tokenizer.json): it needs token offsets")
        self.layout = layout = as_layout(layout)
        ids = tokenizer.convert_tokens_to_ids(list(layout.tokens))
        unknown = [t for t, i in zip(layout.tokens, ids)  # a layout may write <unk> itself (CogVLM on Vicuna)
                   if i is None or (i == tokenizer.unk_token_id and t != tokenizer.unk_token)]
        if unknown:
            raise UserError(f"tokenizer lacks the image tokens {' '.join(layout.tokens)}")
        self.tokenizer = tokenizer
        self.img_context = tokenizer.convert_tokens_to_ids(layout.context)
        self.img_start = tokenizer.convert_tokens_to_ids(layout.start) if layout.start else None
        self.img_end = tokenizer.convert_tokens_to_ids(layout.end) if layout.end else None
        self.bos = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else None

    def image_text(self, tiles: int, markers: bool = True, size: tuple[int, int] | None = None) -> str:
        """What an image of ``tiles`` tiles (an anyres image: of original ``size``) renders as
        (``markers``: with the layout's start / end tokens, when they are tokens)."""
        if markers and not self.layout.markers_are_text:
            return self.layout.image_text(tiles, size)
        return self.layout.context * self.layout.image_tokens(tiles, size)

    def render(self, conv: Conversation, template: ChatTemplate, num_tiles=(), frames=(),
               system: str | None = None, image_sizes=()) -> Rendered:
        """``num_tiles``: tiles per ``<image>`` in text order once videos are expanded (a frame is
        one); ``frames``: frame count per ``<video>``. ``system`` applies when the conversation has
        none of its own; None: the template's default. A last answer of None renders the prompt
        up to the assistant header. ``image_sizes``: each image's original (height, width), for
        an anyres layout (empty: every image has ``tokens_per_tile`` per tile)."""
        counts = iter(frames)
        turns = conv.turns
        if template.user_images_only:
            turns = [("".join(_MEDIA.findall(u)), a) for u, a in turns]
        elif template.image_first:
            turns = [(images_first(u), None if a is None else images_first(a)) for u, a in turns]
        try:
            turns = [(expand_videos(u, counts), None if a is None else expand_videos(a, counts))
                     for u, a in turns]
        except StopIteration:
            raise SampleError("placeholder_mismatch", "more <video> placeholders than videos") from None
        if next(counts, None) is not None:
            raise SampleError("placeholder_mismatch", "more videos than <video> placeholders")
        if any(a is None for _, a in turns[:-1]):
            raise ValueError("only the last answer of a conversation may be left open")
        if template.image_sep is not None:
            sep = IMAGE_PLACEHOLDER + template.image_sep
            turns = [(u.replace(IMAGE_PLACEHOLDER + "\n", sep), None if a is None else a.replace(IMAGE_PLACEHOLDER + "\n", sep))
                     for u, a in turns]
        strip = str.strip if template.strip else (lambda s: s)
        pieces: list[_Piece] = [_Piece(template.prefix)]
        if template.images_at_start:
            if frames:
                raise SampleError("bad_message", f"template {template.name} places images first and takes no video")
            n_images = sum(u.count(IMAGE_PLACEHOLDER) + (a or "").count(IMAGE_PLACEHOLDER) for u, a in turns)
            turns = [(_drop_images(u), None if a is None else _drop_images(a)) for u, a in turns]
            pieces += [_Piece("", tiles=-1) for _ in range(n_images)]
        text = conv.system if conv.system is not None else system
        if not template.system and text is not None:
            if conv.system is not None:
                raise SampleError("bad_message", f"a system message, and template {template.name} has no system block")
            raise UserError(f"a system prompt is set, and template {template.name} has no system block")
        text = template.default_system if text is None else text
        if template.system and text is not None:
            before, after = template.around("system")
            pieces.append(_Piece(before + strip(text) + after))
        ends = []  # piece index after each complete turn
        markers = template.image_markers
        for i, (user, answer) in enumerate(turns):
            before, after = template.around("user")
            pieces += [_Piece(before), *self._content(strip(user), False, markers),
                       _Piece(after + template.assistant)]
            if answer is None:
                break
            pieces += [_Piece(template.answer_prefix, loss=True, apart=template.answer_apart),
                       *self._content(strip(answer), True, markers)]
            if template.history_end is not None and i < len(turns) - 1:  # CogVLM's history: no end marker
                pieces.append(_Piece(template.history_end))
            else:
                pieces += [_Piece(template.answer_end, loss=True), _Piece(template.turn_sep, apart=template.answer_apart)]
            ends.append(len(pieces))
        tiles = [p.tiles for p in pieces if p.tiles]
        if len(tiles) != len(num_tiles):
            raise SampleError("placeholder_mismatch",
                              f"{len(tiles)} <image> placeholders (frames included) for {len(num_tiles)} images")
        if image_sizes and len(image_sizes) != len(num_tiles):
            raise ValueError(f"{len(image_sizes)} image sizes for {len(num_tiles)} images")
        sizes = list(image_sizes) or [None] * len(num_tiles)
        for p, n, size in zip((p for p in pieces if p.tiles), num_tiles, sizes):
            if n < 1:
                raise ValueError(f"an image has {n} tiles")
            p.tiles, p.size = n, size
        return self._tokenize(pieces, ends, self.bos if template.bos else None)

    def _content(self, text: str, loss: bool, markers: bool = True) -> list[_Piece]:
        out = []
        text_markers = markers and self.layout.markers_are_text
        for k, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:
                if text_markers:  # MiniGPT-4's <Img> ... </Img> are prompt text around the embeddings
                    out += [_Piece(self.layout.start), _Piece("", tiles=-1), _Piece(self.layout.end)]
                else:
                    out.append(_Piece("", tiles=-1, markers=markers))  # tile count filled in by render
            out.append(_Piece(part, loss))
        return out

    def _tokenize(self, pieces: list[_Piece], ends: list[int], bos: str | None) -> Rendered:
        ids, labels, texts, turn_ends = [], [], [], []
        if bos is not None:
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
            texts.append(bos)
        run: list[_Piece] = []
        run_ends: list[int] = []  # character offsets in the run where a turn ends

        def flush():
            chunk = "".join(p.text for p in run)
            starts = [0]  # character offset where each piece of the run starts
            for p in run:
                starts.append(starts[-1] + len(p.text))
            offsets = []
            if chunk:
                enc = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
                offsets = [start for start, _ in enc["offset_mapping"]]
                for tok, start in zip(enc["input_ids"], offsets):
                    piece = run[min(bisect.bisect_right(starts, start) - 1, len(run) - 1)]
                    ids.append(tok)
                    labels.append(tok if piece.loss else IGNORE_INDEX)
                texts.append(chunk)
            base = len(ids) - len(offsets)
            turn_ends.extend(base + bisect.bisect_left(offsets, pos) for pos in run_ends)
            run.clear()
            run_ends.clear()

        end_marks = set(ends)
        for i, p in enumerate(pieces):
            if p.tiles:
                flush()
                n = self.layout.image_tokens(p.tiles, p.size)
                token_markers = p.markers and not self.layout.markers_are_text
                start = [self.img_start] if token_markers and self.img_start is not None else []
                end = [self.img_end] if token_markers and self.img_end is not None else []
                image = start + [self.img_context] * n + end
                ids += image
                labels += [IGNORE_INDEX] * len(image)
                texts.append(self.image_text(p.tiles, token_markers, p.size))
            else:
                if p.apart:
                    flush()
                if p.text:
                    run.append(p)
            if i + 1 in end_marks:
                run_ends.append(sum(len(q.text) for q in run))
        flush()
        return Rendered("".join(texts), ids, labels, turn_ends)


def _drop_images(text: str) -> str:
    """``text`` without its ``<image>`` placeholders (and the newline after each): a template with
    ``images_at_start`` renders the images before everything."""
    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
