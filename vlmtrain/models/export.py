"""A trained model as an HF-native directory of its family's transformers class (InternVL, LLaVA, ...), what serving engines and
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
from vlmtrain.data.render import tokenizer_adds_bos
from vlmtrain.data.templates import ChatTemplate, get_template
from vlmtrain.models.checkpoint import MODEL_CONFIG_FILE, load_trained
from vlmtrain.models.family import family_of


def export_tokenizer(tokenizer, template: ChatTemplate, out: Path, processor_tokens: dict[str, str] | None = None,
                     image_placeholder: str = "<IMG_CONTEXT>"):
    """Save the tokenizer with the chat template and the processor's image-token attributes
    (``Family.processor_tokens``; ``image_placeholder``: what the template writes per image)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        extra = {"extra_special_tokens": processor_tokens} if processor_tokens else {}
        tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True, **extra)
    # engines tokenise a rendered template without special tokens: the BOS is the template's to write
    tok.chat_template = chat_template_jinja(template, tok.bos_token if tokenizer_adds_bos(tok) else None,
                                            image_placeholder)
    tok.save_pretrained(out)
    cfg_file = out / "tokenizer_config.json"
    saved = json.loads(cfg_file.read_text())
    for key in ("local_files_only", "is_local"):  # loading options, not tokenizer settings
        saved.pop(key, None)
    cfg_file.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n")
    return tok


def processor_configs(model_cfg, max_tiles: int) -> dict[str, dict]:
    """The native processor's files for this model (``Family.processor_files``)."""
    return family_of(model_cfg).processor_files(model_cfg, max_tiles)


def export(cfg) -> Path:
    """Export ``cfg.ckpt`` to ``cfg.out`` (the ``vlmtrain export`` config: ckpt, out, dtype, max_tiles)."""
    trained = load_trained(cfg.ckpt, getattr(torch, cfg.dtype) if cfg.dtype else None)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model, model_cfg = trained.model, trained.model_cfg
    template = get_template(model_cfg.template)
    fam = family_of(model_cfg)
    tok = export_tokenizer(trained.tokenizer, template, out, fam.processor_tokens, fam.layout(model_cfg).placeholder)
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
