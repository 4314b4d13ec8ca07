"""Model + tokenizer from a ModelConfig, and what a stage does to them (freezing, drop path)."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, InternVLForConditionalGeneration

from vlmtrain.config import ModelConfig, StageConfig, plain
from vlmtrain.errors import UserError
from vlmtrain.models.attention import use_packed_attention
from vlmtrain.models.family import family_of
from vlmtrain.models.internvl import (
    build_from_config,
    compile_blocks,
    set_activation_checkpointing,
)
from vlmtrain.models.loading import load_pretrained
from vlmtrain.models.lora import add_lora
from vlmtrain.models.run_checkpoint import is_lora_key
from vlmtrain.models.speed import fuse_vit_qkv, set_selective_checkpointing


def load_tokenizer(cfg: ModelConfig):
    """The configured tokenizer (local files only), else the one vlmtrain ships."""
    from vlmtrain.assets import TOKENIZER_DIR

    path = cfg.tokenizer or cfg.path or cfg.llm.path or str(TOKENIZER_DIR)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        remote = _remote_tokenizer_class(path)
        if remote:
            raise UserError(
                f"the tokenizer at {path} is {remote}, which only loads by running the checkpoint's code; "
                "vlmtrain never does: set model.tokenizer to a directory with a tokenizer.json "
                "(e.g. the matching -hf release's)"
            ) from None
        raise UserError(f"cannot load a tokenizer from {path}: {e}") from None
    missing = [t for t in family_of(cfg).layout(cfg).special_tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return tok


def _remote_tokenizer_class(path) -> str | None:
    """The tokenizer class a checkpoint's tokenizer_config.json maps to its own code, if any."""
    import json
    from pathlib import Path

    f = Path(path) / "tokenizer_config.json"
    if not f.is_file():
        return None
    c = json.loads(f.read_text())
    auto = c.get("auto_map", {}).get("AutoTokenizer")
    return (c.get("tokenizer_class") or str(auto)) if auto else None


PLACEHOLDER_TOKENS = ("<video>",)
"""Tokens that only mark where a processor expands media; they never reach the model (an exported
tokenizer declares ``<video>`` for transformers' InternVLProcessor)."""


def rows_needed(tokenizer) -> int:
    """Embedding rows the tokenizer needs: its largest id + 1, placeholders aside."""
    return 1 + max(i for t, i in tokenizer.get_vocab().items() if t not in PLACEHOLDER_TOKENS)


def build_model(cfg: ModelConfig, tokenizer, seed: int = 0) -> InternVLForConditionalGeneration:
    """The configured architecture (``model.family``) with the weights the config names
    (``model.path``, ``model.vision.path``, ``model.llm.path``); parts no path names are randomly
    initialised."""
    context = family_of(cfg).layout(cfg).context
    image_token_id = tokenizer.convert_tokens_to_ids(context)
    vocab = cfg.llm.config.get("vocab_size")
    needed = rows_needed(tokenizer)
    if vocab is not None and vocab < needed:
        raise UserError(f"model.llm.config.vocab_size={vocab} is smaller than the tokenizer ({needed} tokens)")
    tokenizer_from_checkpoint = bool(cfg.tokenizer or cfg.path or cfg.llm.path)
    if tokenizer_from_checkpoint and cfg.image_token_id is not None and cfg.image_token_id != image_token_id:
        raise UserError(
            f"model.image_token_id={cfg.image_token_id} but the tokenizer puts {context} at {image_token_id}"
        )
    # a whole checkpoint overwrites every weight (strictly checked): skip the random init
    model = build_from_config(cfg, image_token_id, seed, init_weights=not cfg.path)
    if cfg.path or cfg.vision.path or cfg.llm.path or cfg.projector_path:
        load_pretrained(model, cfg)
    if cfg.init_dtype:
        round_weights(model, cfg.init_dtype)
    if cfg.compute_dtype:
        model.to(floating_dtype(cfg.compute_dtype, "model.compute_dtype"))
    configure_training(model, cfg)
    return model


def floating_dtype(name: str, key: str) -> torch.dtype:
    target = getattr(torch, str(plain(name)), None)
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        raise UserError(f"{key}={name!r} is not a torch floating-point dtype (e.g. bfloat16)")
    return target


def round_weights(model: torch.nn.Module, dtype: str) -> None:
    """Every floating-point weight rounded to ``dtype`` (kept in its own dtype)."""
    target = floating_dtype(dtype, "model.init_dtype")
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.to(target))


def configure_training(model: InternVLForConditionalGeneration, cfg: ModelConfig) -> None:
    """Packed attention backend, fused ViT q/k/v, per-part activation checkpointing (whole-block or
    selective) and compilation, as configured."""
    use_packed_attention(model, plain(cfg.attention))  # its errors quote the bare name
    if cfg.fuse_vit_qkv:
        fuse_vit_qkv(model)
    set_activation_checkpointing(model, cfg.gradient_checkpointing)
    set_selective_checkpointing(model, [plain(p) for p in cfg.selective_checkpointing],
                                family_of(model).transformer_blocks(model),
                                cfg.gradient_checkpointing)
    compile_blocks(model, cfg.compile)


def apply_stage(model: InternVLForConditionalGeneration, stage: StageConfig, on_meta: bool = False) -> list[str]:
    """Freeze everything but the stage's trainable parts (and its LoRA adapters, injected here);
    add the stage's ViT drop path.

    Returns the names of the trainable parameters.
    """
    fam = family_of(model)
    unknown = set(stage.trainable) - set(fam.parts)
    if unknown:
        raise UserError(f"stage.trainable: unknown parts {sorted(unknown)}; parts are {list(fam.parts)}")
    if stage.lora is not None:
        add_lora(model, stage.lora, low_cpu_mem_usage=on_meta)
    trainable = []
    for name, p in model.named_parameters():
        is_adapter = is_lora_key(name)
        part = fam.part_of(name)
        if is_adapter and part in stage.trainable:
            raise UserError(
                f"stage: {part} is both in stage.trainable and adapted by stage.lora ({name}); pick one"
            )
        p.requires_grad_(is_adapter or part in stage.trainable)
        if p.requires_grad:
            trainable.append(name)
    if "vision_tower" in stage.trainable:
        fam.add_drop_path(model, stage.drop_path)
    return trainable
