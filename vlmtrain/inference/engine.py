"""Prompts with media -> generated text, for a trained model (what eval and chat share).

A prompt is rendered with the model's chat template exactly as training renders a conversation
(system block, earlier turns with their answers, then the new user turn and the assistant
header); each ``<image>`` expands to ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) +
``</img>`` and a ``<video>`` to ``Frame-1: <image>\\nFrame-2: <image>...`` with one tile per
frame at segment centres. Generation is transformers' ``generate`` on the native InternVL model,
batched with left padding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from threading import Thread

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from vlmtrain.data.conversation import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from vlmtrain.data.images import load_image, to_pixel_values
from vlmtrain.data.templates import get_template
from vlmtrain.data.tiling import tile_image, tiles_per_image
from vlmtrain.errors import UserError
from vlmtrain.models.internvl import tokens_per_tile


@dataclass
class GenerationConfig:
    """How answers are decoded (greedy unless do_sample)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0


@dataclass
class Prompt:
    query: str
    images: list = field(default_factory=list)
    """Paths or PIL images, one per ``<image>`` in query and history (in order)."""
    videos: list = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)
    """Earlier (user, assistant) turns; their media come first in ``images``."""
    system: str | None = None


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when visible, else cpu), or any torch device name (cpu, cuda, cuda:1, ...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def video_frames(path, num_frames: int):
    """``num_frames`` RGB frames at the centres of equal segments of the video (the data side's
    evaluation sampling, so a model sees video at inference as it was evaluated in training)."""
    from vlmtrain.data.conversation import SampleError
    from vlmtrain.data.video import read_frames

    try:
        return read_frames(path, num_frames, num_frames, rng=None)
    except SampleError as e:
        raise UserError(f"{path}: {e}") from None


class InferenceEngine:
    def __init__(self, trained, max_tiles: int = 12, num_frames: int = 8, template: str | None = None,
                 system: str | None = None, device: str | torch.device = "cpu"):
        self.model = trained.model.to(device)
        self.tokenizer = trained.tokenizer
        cfg = trained.model_cfg
        self.template = get_template(template or cfg.template)
        self.system = system
        self.tile_size = cfg.vision.image_size
        self.tokens_per_tile = tokens_per_tile(cfg.vision.image_size, cfg.vision.patch_size, cfg.downsample_ratio)
        self.max_tiles, self.num_frames = max_tiles, num_frames
        self.device = torch.device(device)
        stop = [self.tokenizer.convert_tokens_to_ids(self.template.stop)] if self.template.stop else []
        if self.tokenizer.eos_token_id is not None:
            stop.append(self.tokenizer.eos_token_id)
        self.stop_ids = sorted(set(i for i in stop if i is not None))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]

    # -- prompt ---------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> tuple[list[int], torch.Tensor | None]:
        """Token ids of the prompt (ending with the assistant header) and its tiles, in order."""
        t = self.template
        text = t.render_system(prompt.system if prompt.system is not None else self.system)
        for user, answer in prompt.history:
            text += t.user.format(content=user) + answer + t.answer_end + t.turn_sep
        text += t.user.format(content=prompt.query)
        n_img, n_vid = text.count(IMAGE_PLACEHOLDER), text.count(VIDEO_PLACEHOLDER)
        if n_img != len(prompt.images) or n_vid != len(prompt.videos):
            raise UserError(
                f"{n_img} <image> / {n_vid} <video> placeholders for {len(prompt.images)} images / "
                f"{len(prompt.videos)} videos"
            )
        images, videos = iter(prompt.images), iter(prompt.videos)
        per_image = tiles_per_image(max(1, n_img), self.max_tiles)
        groups: list[list] = []

        def media(m: re.Match) -> str:
            if m.group(0) == IMAGE_PLACEHOLDER:
                src = next(images)
                img = src.convert("RGB") if hasattr(src, "convert") else load_image(src)
                tiles = tile_image(img, 1, per_image, self.tile_size, True)
                groups.append(tiles)
                return self._image_text(len(tiles))
            lines = []
            for i, frame in enumerate(video_frames(next(videos), self.num_frames)):
                groups.append([frame.convert("RGB").resize((self.tile_size, self.tile_size), Image.BICUBIC)])
                lines.append(f"Frame-{i + 1}: {self._image_text(1)}")
            return "\n".join(lines)

        text = re.sub(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}", media, text)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        pixels = to_pixel_values([tile for g in groups for tile in g]) if groups else None
        return ids, pixels

    def _image_text(self, n_tiles: int) -> str:
        return "<img>" + "<IMG_CONTEXT>" * (self.tokens_per_tile * n_tiles) + "</img>"

    # -- generation -----------------------------------------------------------------------------
    def _inputs(self, prompts: list[Prompt]) -> dict:
        encoded = [self.encode(p) for p in prompts]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, (ids, _) in enumerate(encoded):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        pixels = [px for _, px in encoded if px is not None]
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
        return inputs

    def _generate_kwargs(self, gen: GenerationConfig) -> dict:
        kw = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, eos_token_id=self.stop_ids,
                  pad_token_id=self.pad_id, repetition_penalty=gen.repetition_penalty)
        if gen.do_sample:
            kw.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], gen: GenerationConfig) -> list[str]:
        inputs = self._inputs(prompts)
        if gen.do_sample:
            torch.manual_seed(gen.seed)
        out = self.model.generate(**inputs, **self._generate_kwargs(gen))
        new = out[:, inputs["input_ids"].shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    def stream(self, prompt: Prompt, gen: GenerationConfig):
        """Yield text pieces as tokens are generated."""
        inputs = self._inputs([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        if gen.do_sample:
            torch.manual_seed(gen.seed)

        def run():
            with torch.no_grad():
                self.model.generate(**inputs, **self._generate_kwargs(gen), streamer=streamer)

        thread = Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
