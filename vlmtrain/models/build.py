"""Model + tokenizer from a ModelConfig, and what a stage does to them (freezing, drop path)."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, InternVLForConditionalGeneration

from vlmtrain.config import PARTS, ModelConfig, StageConfig
from vlmtrain.models.attention import use_packed_attention
from vlmtrain.models.internvl import (
    IMAGE_TOKENS,
    add_drop_path,
    build_from_config,
    part_of,
    set_activation_checkpointing,
)


def load_tokenizer(cfg: ModelConfig):
    """The configured tokenizer (local files only), else the one vlmtrain ships."""
    from vlmtrain.assets import TOKENIZER_DIR

    path = cfg.tokenizer or cfg.path or str(TOKENIZER_DIR)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    missing = [t for t in IMAGE_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return tok


def build_model(cfg: ModelConfig, tokenizer, seed: int = 0) -> InternVLForConditionalGeneration:
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    vocab = cfg.llm.config.get("vocab_size")
    if vocab is not None and vocab < len(tokenizer):
        raise ValueError(
            f"model.llm.config.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)"
        )
    model = build_from_config(cfg, image_token_id, seed)
    configure_training(model, cfg)
    return model


def configure_training(model: InternVLForConditionalGeneration, cfg: ModelConfig) -> None:
    """Packed attention backend and per-part activation checkpointing, as configured."""
    use_packed_attention(model, cfg.attention)
    set_activation_checkpointing(model, cfg.gradient_checkpointing)


def apply_stage(model: InternVLForConditionalGeneration, stage: StageConfig) -> list[str]:
    """Freeze everything but the stage's trainable parts; add the stage's ViT drop path.

    Returns the names of the trainable parameters.
    """
    unknown = set(stage.trainable) - set(PARTS)
    if unknown:
        raise ValueError(f"stage.trainable: unknown parts {sorted(unknown)}; parts are {list(PARTS)}")
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name) in stage.trainable)
        if p.requires_grad:
            trainable.append(name)
    if "vision_tower" in stage.trainable:
        add_drop_path(model.model.vision_tower, stage.drop_path)
    return trainable


def load_weights(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Load a full state dict, failing on the first key that is missing, extra or mis-shaped."""
    own = model.state_dict()
    for key, value in state_dict.items():
        if key not in own:
            raise ValueError(f"{source}: unexpected key {key!r} (not in the configured model)")
        if own[key].shape != value.shape:
            raise ValueError(
                f"{source}: shape mismatch at {key!r}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            )
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise ValueError(f"{source}: missing key {missing[0]!r} (and {len(missing) - 1} more)")
    model.load_state_dict(state_dict)
