"""Prompts with media -> generated text, for a trained model (what eval and chat share).

A prompt is rendered by ``vlmtrain.data.prompt.PromptEncoder``: the renderer training uses, with
the last answer left open, so the model reads exactly the prefix training showed it for the same
conversation; images tile by training's pixel path (no augmentation) and a video gives
``num_frames`` frames by the model card's rule. Generation is transformers' ``generate`` on the
native InternVL model, batched with left padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from vlmtrain.data.prompt import Prompt, PromptEncoder
from vlmtrain.data.templates import get_template
from vlmtrain.models.family import family_of


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


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when visible, else cpu), or any torch device name (cpu, cuda, cuda:1, ...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class InferenceEngine:
    def __init__(self, trained, max_tiles: int = 12, num_frames: int = 8, template: str | None = None,
                 system: str | None = None, device: str | torch.device = "cpu"):
        self.model = trained.model.to(device)
        self.tokenizer = trained.tokenizer
        cfg = trained.model_cfg
        self.template = get_template(template or cfg.template)
        self.system = system
        self.tile_size = cfg.vision.image_size
        self.family = family_of(cfg)
        self.layout = self.family.layout(cfg)
        self.tokens_per_tile = self.layout.tokens_per_tile
        self.max_tiles, self.num_frames = max_tiles, num_frames
        self.prompts = PromptEncoder(self.tokenizer, self.layout, self.template, self.tile_size,
                                     max_tiles, num_frames, system, self.layout.image_mode)
        self.device = torch.device(device)
        stop = [self.tokenizer.convert_tokens_to_ids(self.template.stop)] if self.template.stop else []
        if self.tokenizer.eos_token_id is not None:
            stop.append(self.tokenizer.eos_token_id)
        self.stop_ids = sorted(set(i for i in stop if i is not None))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]

    # -- prompt ---------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> tuple[list[int], torch.Tensor | None]:
        """Token ids of the prompt (ending with the assistant header) and its tiles, in order."""
        rendered, pixels, _ = self.prompts.encode(prompt)
        return rendered.input_ids, pixels

    # -- generation -----------------------------------------------------------------------------
    def _inputs(self, prompts: list[Prompt]) -> dict:
        encoded = [self.prompts.encode(p) for p in prompts]
        width = max(len(r.input_ids) for r, _, _ in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, (r, _, _) in enumerate(encoded):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(r.input_ids):] = torch.tensor(r.input_ids)
            mask[i, width - len(r.input_ids):] = 1
        pixels = [px for _, px, _ in encoded if px is not None]
        sizes = [size for _, _, s in encoded for size in (s or [])] or None
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
        inputs.update(self.family.generate_kwargs(inputs.get("pixel_values"), sizes))
        return inputs

    def _generate_kwargs(self, gen: GenerationConfig) -> dict:
        kw = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, eos_token_id=self.stop_ids,
                  pad_token_id=self.pad_id, repetition_penalty=gen.repetition_penalty)
        end = self.template.answer_end
        if end.strip() and end not in self.tokenizer.get_vocab():
            # an end marker of plain text (MiniGPT-4's "###"): transformers stops on the string
            kw.update(stop_strings=[end], tokenizer=self.tokenizer)
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
        return [self.answer(self.tokenizer.decode(row, skip_special_tokens=True)) for row in new]

    def answer(self, text: str) -> str:
        """The generated text up to the template's end marker (a text marker such as plain's
        newline or MiniGPT-4's ``###`` stays in the decoded text; special tokens do not)."""
        end = self.template.answer_end
        return (text.split(end)[0] if end.strip() or end == "\n" else text).strip()

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
