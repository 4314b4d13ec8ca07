"""The InternVL model: transformers' native ``InternVLForConditionalGeneration``.

We build on the transformers classes rather than our own copy so that a vlmtrain checkpoint *is* an
HF-native InternVL checkpoint (export is ``save_pretrained``, serving engines load it) and the
three parts carry transformers' names: ``model.vision_tower`` (InternViT),
``model.multi_modal_projector`` (LayerNorm -> Linear -> GELU -> Linear on pixel-shuffled
features) and ``model.language_model`` (+ ``lm_head``). What transformers lacks for training, we
add from outside through public APIs: stochastic depth via forward hooks (``add_drop_path``), a
vision path that builds no autograd graph when the ViT is frozen, and a loss that never
materialises full logits (``vlmtrain.training.loss``).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import InternVLConfig, InternVLForConditionalGeneration

from vlmtrain.config import PARTS, ModelConfig
from vlmtrain.data.images import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels
from vlmtrain.data.placeholders import ImageLayout
from vlmtrain.errors import UserError
from vlmtrain.models.family import Family, drop_path_hooks, vision_no_grad

IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")


def tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    """256 for 448 px tiles, patch 14, pixel shuffle 0.5."""
    side = image_size // patch_size
    return int(side * downsample_ratio) ** 2


def internvl_config(cfg: ModelConfig, image_token_id: int) -> InternVLConfig:
    v = cfg.vision
    vision = dict(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size,
        image_size=[v.image_size, v.image_size],
        patch_size=[v.patch_size, v.patch_size],
        norm_type=v.norm_type,
        use_qk_norm=v.use_qk_norm,
        attention_bias=v.attention_bias,
        layer_norm_eps=v.layer_norm_eps,
        layer_scale_init_value=v.layer_scale_init_value,
        hidden_act=v.hidden_act,
        use_mean_pooling=True,  # InternViT has no final norm
    )
    text = cfg.llm.config
    text = OmegaConf.to_container(text, resolve=True) if isinstance(text, DictConfig) else dict(text)
    text.setdefault("tie_word_embeddings", False)
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=tokens_per_tile(v.image_size, v.patch_size, cfg.downsample_ratio),
        downsample_ratio=cfg.downsample_ratio,
        projector_hidden_act=cfg.projector_hidden_act,
        vision_feature_layer=cfg.vision_select_layer,
        vision_feature_select_strategy="default",  # drop CLS
        tie_word_embeddings=False,
    )


def build_from_config(
    cfg: ModelConfig,
    image_token_id: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    init_weights: bool = True,
) -> InternVLForConditionalGeneration:
    """Random-init model of ``cfg``'s family (InternVL unless ``model.family`` names another),
    deterministic in ``seed``. ``device="meta"`` builds the architecture without allocating or
    initialising any weight (a 78B config is inspected in seconds); ``init_weights=False``
    allocates without initialising (every weight is loaded next)."""
    from vlmtrain.models.family import family_of

    return family_of(cfg).build(cfg, image_token_id, seed, device, init_weights)


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side * side, dim) fixed 2D sin-cos position codes, row-major: half the channels encode the
    row, half the column, each as sin/cos pairs over geometric frequencies (MAE's formula)."""
    if dim % 4:
        raise UserError(f"model.vision.sincos_position_init needs hidden_size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    grid = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def parts(model: InternVLForConditionalGeneration) -> dict[str, nn.Module]:
    """The three parts; the LM head belongs to the language model."""
    return {
        "vision_tower": model.model.vision_tower,
        "multi_modal_projector": model.model.multi_modal_projector,
        "language_model": nn.ModuleList([model.model.language_model, model.lm_head]),
    }


def part_of(param_name: str) -> str:
    """Which part a parameter of InternVLForConditionalGeneration belongs to (other families:
    ``family_of(model).part_of``)."""
    for part in PARTS:
        if param_name.startswith(f"model.{part}."):
            return part
    if param_name.startswith("lm_head."):
        return "language_model"
    raise KeyError(f"parameter {param_name!r} belongs to no known part")


def transformer_blocks(model: InternVLForConditionalGeneration) -> dict[str, nn.ModuleList]:
    """The transformer blocks of the parts that have them: ViT layers and LLM decoder layers."""
    return {"vision_tower": model.model.vision_tower.encoder.layer,
            "language_model": model.model.language_model.layers}


def set_activation_checkpointing(model: InternVLForConditionalGeneration, entries) -> None:
    """Activation checkpointing (recompute in backward) for the named parts, through transformers'
    own per-layer checkpointing. The projector is too small to be worth it.

    An entry is a part (every block) or ``part:fraction``, which checkpoints that fraction of the
    part's blocks, evenly spread (``vision_tower:0.5``: every other ViT layer), to trade memory
    for recompute in between the two ends."""
    from vlmtrain.models.family import family_of

    fam = family_of(model)
    towers, blocks = fam.towers(model), fam.transformer_blocks(model)
    for entry in entries:
        name, _, fraction = str(entry).partition(":")
        if name not in towers:
            raise UserError(f"model.gradient_checkpointing: {entry!r} cannot be checkpointed; "
                             f"choose from {sorted(towers)} (optionally as part:fraction)")
        try:
            share = float(fraction) if fraction else 1.0
        except ValueError:
            share = -1.0
        if not 0.0 < share <= 1.0:
            raise UserError(f"model.gradient_checkpointing: {entry!r}: the fraction must be in (0, 1]")
        towers[name].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]  # stubs narrower than the code's use
        for i, block in enumerate(blocks[name]):  # block i is checkpointed when i x share crosses an integer
            block.gradient_checkpointing = int((i + 1) * share) > int(i * share)


def compile_blocks(model: InternVLForConditionalGeneration, part_names) -> None:
    """Regional ``torch.compile`` of every transformer block of the named parts, with dynamic
    shapes: one compiled graph serves every tile count (ViT) and packed length (LLM), and the
    identical blocks share it. Inductor fuses the eager element-wise work between the matmuls
    (norms, activations, layer scale, residual adds, autocast casts), which is memory-bound."""
    from vlmtrain.models.family import family_of

    towers = family_of(model).transformer_blocks(model)
    unknown = set(part_names) - set(towers)
    if unknown:
        raise UserError(f"model.compile: {sorted(unknown)} cannot be compiled; choose from {sorted(towers)}")
    for name in part_names:
        for block in towers[name]:
            block.compile(dynamic=True)


def add_drop_path(vision_tower: nn.Module, rate: float) -> list:
    """Stochastic depth on both residual branches of every ViT layer, rising linearly to ``rate``.

    A forward hook scales a branch's output by mask / keep_prob per sample; since the branch is
    then multiplied by the layer scale and added to the residual, this equals timm's DropPath.
    Returns the hook handles (remove them to turn drop path off).
    """
    return drop_path_hooks(vision_tower.encoder.layer, "attention", "mlp", rate)


def encode_images(model: InternVLForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Tiles (N, 3, S, S) -> LLM embeddings (N, tokens_per_tile, D), by the model's family.

    Tiles come as the data loader ships them, uint8, and are normalised here on their device
    (``normalize_pixels``); float tiles are taken as already normalised. When no vision-tower
    parameter needs a gradient the ViT runs under no_grad, so a frozen ViT holds no activations for
    backward (the projector still trains).
    """
    from vlmtrain.models.family import family_of

    return family_of(model).encode_images(model, pixel_values)


def multimodal_embeddings(
    model: InternVLForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    dummy_vision: bool = False,
    tile_index: torch.Tensor | None = None,
    image_sizes: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Token embeddings with the image context positions replaced, in order, by projected tile
    features (``Family.multimodal_embeddings``).

    ``tile_index``: which tile of ``pixel_values`` each image of the text shows, tile by tile in
    text order (None: every tile once, in order). A preference pair's chosen and rejected answers
    share their prompt's images: the vision tower encodes each tile once and the index feeds its
    features to both sequences.

    With ``dummy_vision`` the tiles belong to no text position (a text-only batch): their features
    enter the graph with weight zero, so every rank runs the vision tower every step and sharded
    strategies (FSDP, ZeRO-3) never wait on a rank that skipped it.
    """
    from vlmtrain.models.family import family_of

    return family_of(model).multimodal_embeddings(model, input_ids, pixel_values, dummy_vision, tile_index,
                                                  image_sizes)


class InternVLFamily(Family):
    """InternVL 1.5 / 2 / 2.5: InternViT, pixel shuffle + MLP projector, any causal LM
    (transformers' ``InternVLForConditionalGeneration``; layouts: ``vlmtrain.models.loading``)."""

    model_class = InternVLForConditionalGeneration
    config_model_types = ("internvl", "internvl_chat")
    processor_tokens = {"start_image_token": "<img>", "end_image_token": "</img>",
                        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    lora_targets = {
        "llm_attention": r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|qkv_proj|o_proj)",
        "llm_mlp": r"model\.language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj|gate_up_proj)",
        "vit": r"model\.vision_tower\.encoder\.layer\.\d+\.(attention\.(q_proj|k_proj|v_proj|projection_layer)|mlp\.fc1|mlp\.fc2)",
    }
    part_modules = {"vision_tower": ["vision_tower"], "multi_modal_projector": ["multi_modal_projector"],
                    "language_model": ["language_model", "lm_head"]}

    def layout(self, cfg) -> ImageLayout:
        v = cfg.vision
        return ImageLayout(context="<IMG_CONTEXT>", start="<img>", end="</img>", special_tokens=IMAGE_TOKENS,
                           tokens_per_tile=tokens_per_tile(v.image_size, v.patch_size, cfg.downsample_ratio),
                           mean=IMAGENET_MEAN, std=IMAGENET_STD, image_mode=cfg.image_mode)

    def hf_config(self, cfg, image_token_id: int):
        return internvl_config(cfg, image_token_id)

    def init_weights(self, model, cfg) -> None:
        if cfg.vision.sincos_position_init:
            with torch.no_grad():
                pos = model.model.vision_tower.embeddings.position_embeddings  # (1, 1 + patches, hidden): CLS first
                pos[0, 1:] = sincos_2d(cfg.vision.image_size // cfg.vision.patch_size, pos.shape[-1])
                pos[0, 0] = 0.0

    def part_prefixes(self) -> dict[str, list[str]]:
        return {"vision_tower": ["model.vision_tower."], "multi_modal_projector": ["model.multi_modal_projector."],
                "language_model": ["model.language_model.", "lm_head."]}

    def part_of(self, param_name: str) -> str:
        return part_of(param_name)

    def embedding_keys(self) -> tuple[str, str]:
        return "model.language_model.embed_tokens.weight", "lm_head.weight"

    def towers(self, model) -> dict[str, nn.Module]:
        return {"vision_tower": model.model.vision_tower, "language_model": model.model.language_model}

    def transformer_blocks(self, model) -> dict[str, nn.ModuleList]:
        return transformer_blocks(model)

    def add_drop_path(self, model, rate: float) -> list:
        return add_drop_path(model.model.vision_tower, rate)

    def decoder(self, model) -> nn.Module:
        return model.model.language_model

    def lm_head(self, model) -> nn.Module:
        return model.lm_head

    def encode_images(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        tower = model.model.vision_tower
        layer = model.config.vision_feature_layer
        with vision_no_grad(tower):
            out = tower(pixel_values=normalize_pixels(pixel_values).to(model.dtype), output_hidden_states=layer != -1)
            feats = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
            feats = feats[:, 1:, :]  # drop CLS
            n, hw, c = feats.shape
            side = int(hw**0.5)
            feats = model.model.pixel_shuffle(feats.reshape(n, side, side, c), model.config.downsample_ratio)
            feats = feats.reshape(n, -1, feats.shape[-1])
        return model.model.multi_modal_projector(feats)

    def to_native(self, state: dict, text_config) -> dict:
        from vlmtrain.models.loading import to_hf_internvl

        return to_hf_internvl(state, text_config)

    def config_from_checkpoint(self, c: dict, cfg_file) -> dict:
        from vlmtrain.models.loading import internvl_config_fields

        return internvl_config_fields(c, cfg_file)

    def processor_files(self, model_cfg, max_tiles: int) -> dict[str, dict]:
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

    def flops_dims(self, config):
        from vlmtrain.training.flops import InternVLDims

        return InternVLDims.from_hf_config(config)
