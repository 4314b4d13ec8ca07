"""A trained model as an HF-native InternVL directory, what serving engines and
``transformers.AutoModelForImageTextToText`` load: what `vlmtrain export` writes
(``vlmtrain.cli.export``; ``python -m vlmtrain.export`` is the same).

    vlmtrain export ckpt=outputs/2026-11-21/12-00-00 out=exported/shapes-8b
    vlmtrain export ckpt=runs/lora/checkpoints/last.ckpt out=exported/lora dtype=bfloat16

The directory holds: ``model.safetensors`` (LoRA adapters merged into their base weights; every
fully trained part, ViT and projector included, as trained) and ``config.json``
(``architectures: [InternVLForConditionalGeneration]``); ``generation_config.json`` stopping at
the template's end-of-turn token; the tokenizer with a Jinja chat template that renders exactly
what vlmtrain trained on (``vlmtrain.data.chat_template``) and the InternVL image tokens declared
for ``InternVLProcessor``; the
processor configs (``processor_config.json``, ``preprocessor_config.json`` for the dynamic-tiling
image processor with vlmtrain's tile size, budget and normalisation, ``video_preprocessor_config.json``);
and ``vlmtrain_model.yaml`` (the ModelConfig, so vlmtrain's eval and chat reload the same template).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import cast

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from vlmtrain.data.chat_template import chat_template_jinja
from vlmtrain.data.images import IMAGENET_MEAN, IMAGENET_STD
from vlmtrain.data.render import tokenizer_adds_bos
from vlmtrain.data.templates import ChatTemplate, get_template
from vlmtrain.models.checkpoint import MODEL_CONFIG_FILE, load_trained
from vlmtrain.models.internvl import tokens_per_tile

IMAGE_TOKENS_FOR_PROCESSOR = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
"""What transformers' InternVLProcessor reads from the tokenizer. ``<video>`` is only a text
placeholder the processor expands into frames; it never reaches the model."""


def export_tokenizer(tokenizer, template: ChatTemplate, out: Path):
    """Save the tokenizer with the chat template and the processor's image-token attributes."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True, extra_special_tokens=IMAGE_TOKENS_FOR_PROCESSOR)
    # engines tokenise a rendered template without special tokens: the BOS is the template's to write
    tok.chat_template = chat_template_jinja(template, tok.bos_token if tokenizer_adds_bos(tok) else None)
    tok.save_pretrained(out)
    cfg_file = out / "tokenizer_config.json"
    saved = json.loads(cfg_file.read_text())
    for key in ("local_files_only", "is_local"):  # loading options, not tokenizer settings
        saved.pop(key, None)
    cfg_file.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n")
    return tok


def processor_configs(model_cfg, max_tiles: int) -> dict[str, dict]:
    """The processor files InternVLProcessor.save_pretrained writes, for this model's tiling."""
    size = {"height": model_cfg.vision.image_size, "width": model_cfg.vision.image_size}
    norm = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_normalize": True,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True, "do_resize": True}
    return {
        "processor_config.json": {
            "processor_class": "InternVLProcessor",
            "image_seq_length": tokens_per_tile(model_cfg.vision.image_size, model_cfg.vision.patch_size,
                                                model_cfg.downsample_ratio),
        },
        "preprocessor_config.json": {
            "image_processor_type": "GotOcr2ImageProcessorFast", "processor_class": "InternVLProcessor",
            "crop_to_patches": True, "min_patches": 1, "max_patches": max_tiles, "size": size,
            "resample": 3, **norm,  # bicubic, like vlmtrain's tiling
        },
        "video_preprocessor_config.json": {
            "video_processor_type": "InternVLVideoProcessor", "processor_class": "InternVLProcessor",
            "size": size, "resample": 3, "do_sample_frames": False, "initial_shift": True, **norm,
        },
    }


def export(cfg) -> Path:
    """Export ``cfg.ckpt`` to ``cfg.out`` (the ``vlmtrain export`` config: ckpt, out, dtype, max_tiles)."""
    trained = load_trained(cfg.ckpt, getattr(torch, cfg.dtype) if cfg.dtype else None)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model, model_cfg = trained.model, trained.model_cfg
    template = get_template(model_cfg.template)
    tok = export_tokenizer(trained.tokenizer, template, out)
    stop = [tok.convert_tokens_to_ids(template.stop)] if template.stop else []
    if tok.eos_token_id is not None and tok.eos_token_id not in stop:
        stop.append(tok.eos_token_id)
    model.generation_config.eos_token_id = stop or None
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)  # type: ignore[operator]
    for name, content in processor_configs(model_cfg, cfg.max_tiles).items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    saved = cast(dict, OmegaConf.to_container(model_cfg, resolve=True))
    saved.update(path=None, tokenizer=None)
    saved["vision"]["path"] = saved["llm"]["path"] = None
    (out / MODEL_CONFIG_FILE).write_text("# vlmtrain's ModelConfig of this export (reloaded by eval/chat)\n"
                                         + OmegaConf.to_yaml(OmegaConf.create(saved)))
    print(f"exported {trained.source} -> {out}"
          + (f" (LoRA r={trained.lora.r} merged)" if trained.lora is not None else ""))
    return out
