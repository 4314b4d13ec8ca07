"""A prompt for generation -> the model's inputs, through the renderer training uses.

Chat and evaluation ask a model about a conversation whose last answer is to be generated: its
earlier turns, the new query, its media and system text. The text is ``render.Renderer``'s with the
last answer left open, so it is, token for token, the prefix training renders for the same
conversation. Images are tiled by training's pixel path (no augmentation); a video gives
``num_frames`` frames by the model card's rule (``video.inference_frame_indices``), one tile each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from vlmtrain.data.anyres import NO_VIDEO
from vlmtrain.data.conversation import Conversation, SampleError
from vlmtrain.data.images import load_image, to_pixel_values
from vlmtrain.data.placeholders import ImageLayout
from vlmtrain.data.render import Rendered, Renderer
from vlmtrain.data.resize import resize_bicubic
from vlmtrain.data.templates import ChatTemplate
from vlmtrain.data.tiling import check_image_mode, single_tile, tile_image, tiles_per_image
from vlmtrain.data.video import read_frames
from vlmtrain.errors import UserError


@dataclass
class Prompt:
    query: str
    images: list = field(default_factory=list)
    """Paths, bytes or PIL images, one per ``<image>`` in history and query (in order)."""
    videos: list = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)
    """Earlier (user, assistant) turns; their media come first in ``images`` / ``videos``."""
    system: str | None = None
    """The conversation's own system text; None: the encoder's (config), else the template's."""

    def conversation(self) -> Conversation:
        return Conversation(turns=[*self.history, (self.query, None)], system=self.system,
                            images=list(self.images), videos=list(self.videos))


class PromptEncoder:
    """Token ids and pixels of prompts for one tokenizer, template and tiling."""

    def __init__(self, tokenizer, tokens_per_tile: ImageLayout | int, template: ChatTemplate, tile_size: int,
                 max_tiles: int = 12, num_frames: int = 8, system: str | None = None, image_mode: str = "tile"):
        """``tokens_per_tile``: the model family's ImageLayout (an int: InternVL's with that count);
        ``image_mode``: how an image becomes tiles (``data.image_mode``)."""
        self.renderer = Renderer(tokenizer, tokens_per_tile)
        self.layout = self.renderer.layout
        self.image_mode = check_image_mode(image_mode, self.layout)
        self.template, self.tile_size, self.system = template, tile_size, system
        self.max_tiles, self.num_frames = max_tiles, num_frames

    def encode(self, prompt: Prompt) -> tuple[Rendered, torch.Tensor | None, list[tuple[int, int]] | None]:
        """The rendered prompt (ending with the assistant header), its normalised tiles in
        placeholder order, and (anyres layouts) each image's original (height, width), else None.
        A placeholder / media mismatch is a UserError."""
        conv = prompt.conversation()
        try:
            conv.check_media()
            tiles, num_tiles, frames, sizes = [], [], [], []
            per_image = tiles_per_image(len(conv.images), self.max_tiles) if conv.images else 0
            for kind, src in conv.media():
                if kind == "image":
                    img = src.convert("RGB") if isinstance(src, Image.Image) else load_image(src)
                    if self.image_mode == "tile":
                        image_tiles = tile_image(img, 1, per_image, self.tile_size)
                    elif self.image_mode == "anyres":
                        image_tiles = self.layout.anyres.tiles(img)
                        sizes.append((img.height, img.width))
                    else:
                        image_tiles = [single_tile(img, self.image_mode, self.tile_size, self.layout.mean)]
                    tiles += image_tiles
                    num_tiles.append(len(image_tiles))
                else:
                    if self.image_mode == "anyres":
                        raise UserError(NO_VIDEO)
                    video = read_frames(src, self.num_frames, self.num_frames, rng=None)
                    tiles += [resize_bicubic(f, (self.tile_size, self.tile_size)) for f in video]
                    num_tiles += [1] * len(video)
                    frames.append(len(video))
            rendered = self.renderer.render(conv, self.template, num_tiles, frames, self.system, sizes)
        except SampleError as e:
            raise UserError(str(e)) from None
        pixels = to_pixel_values(tiles, self.layout.mean, self.layout.std) if tiles else None
        return rendered, pixels, (sizes or None)
