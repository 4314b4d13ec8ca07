"""LLaVA-1.5 and LLaVA-NeXT as vlmtrain model families, on transformers' native
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``.

LLaVA-1.5 is CLIP ViT-L/14-336 (features of layer -2, CLS dropped: 576 tokens per 336 px image),
the ``mlp2x_gelu`` projector (Linear, GELU, Linear; ``model.multi_modal_projector.linear_1/2``)
and Vicuna-1.5; one ``<image>`` token per image feature. The native module names are the
vlmtrain parts' names (``model.vision_tower``, ``model.multi_modal_projector``,
``model.language_model`` + ``lm_head``), so freezing, LoRA, FSDP and export work as for InternVL.

Checkpoint layouts read (``LlavaFamily.to_native``; ``from_native`` writes the original one back):

- HF-native, as module names (``model.vision_tower.*``) or as the ``-hf`` repos' files hold
  them (``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
  ``language_model.lm_head.*``);
- the original LLaVA layout (``LlavaLlamaForCausalLM``: ``model.embed_tokens``,
  ``model.layers.*``, ``lm_head``, the projector as ``model.mm_projector.{0,2}.*`` and, where saved,
  the ViT as ``model.vision_tower.vision_tower.vision_model.*``); ``ORIGINAL_RENAMES``;
  transformers 5's CLIPVisionModel has no ``vision_model`` level (``model.vision_tower.encoder.*``);
- a CLIP checkpoint for ``model.vision.path`` (``vision_model.*``; its text half is ignored);
- a causal LM (Vicuna) for ``model.llm.path``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from vlmtrain.data.anyres import AnyRes
from vlmtrain.data.images import normalize_pixels
from vlmtrain.data.placeholders import CLIP_MEAN, CLIP_STD, ImageLayout
from vlmtrain.errors import UserError
from vlmtrain.models.family import Family, drop_path_hooks, full_parameter, plain_dict, rename_state, vision_no_grad

IMAGE_TOKEN = "<image>"

ORIGINAL_RENAMES = [
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^model\.image_newline$", "model.image_newline"),
    (r"^model\.(?!vision_tower\.|multi_modal_projector\.)", "model.language_model."),
    (r"^lm_head\.", "lm_head."),
]
"""Original LLaVA (``LlavaLlamaForCausalLM``) -> native module names. The order matters: the
multimodal keys first, every other ``model.*`` key is the LLM's."""

NATIVE_TO_ORIGINAL = [
    (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
    (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
    (r"^model\.vision_tower\.", "model.vision_tower.vision_tower.vision_model."),
    (r"^model\.image_newline$", "model.image_newline"),
    (r"^model\.language_model\.", "model."),
    (r"^lm_head\.", "lm_head."),
]
"""Native -> original LLaVA, the inverse of ``ORIGINAL_RENAMES``."""

HF_HUB_RENAMES = [
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^image_newline$", "model.image_newline"),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
"""The ``llava-hf`` repos' file layout -> module names."""

CLIP_L_336 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
"""openai/clip-vit-large-patch14-336's vision tower (what the original LLaVA configs name)."""


class LlavaFamily(Family):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``). Settings: ``projector_bias`` (the
    mlp2x_gelu Linears have biases)."""

    model_class = LlavaForConditionalGeneration
    config_class = LlavaConfig
    config_model_types = ("llava",)
    processor_tokens = {"image_token": IMAGE_TOKEN}
    lora_targets = {
        "llm_attention": r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
        "llm_mlp": r"model\.language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
        "vit": r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)"
               r"|mlp\.fc1|mlp\.fc2)",
    }
    part_modules = {"vision_tower": ["vision_tower"], "multi_modal_projector": ["multi_modal_projector"],
                    "language_model": ["language_model", "lm_head"]}

    def __init__(self, projector_bias: bool = True):
        self.projector_bias = projector_bias

    # -- build -------------------------------------------------------------------------------------
    def layout(self, cfg) -> ImageLayout:
        v = cfg.vision
        return ImageLayout(context=IMAGE_TOKEN, start="", end="", special_tokens=(IMAGE_TOKEN,),
                           tokens_per_tile=(v.image_size // v.patch_size) ** 2, processor_placeholder=IMAGE_TOKEN,
                           mean=CLIP_MEAN, std=CLIP_STD, image_mode=cfg.image_mode)

    def vision_config(self, cfg) -> dict:
        v = cfg.vision
        return dict(model_type="clip_vision_model", hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                    num_attention_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
                    image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                    layer_norm_eps=v.layer_norm_eps, **plain_dict(v.config))

    def text_config(self, cfg) -> dict:
        text = plain_dict(cfg.llm.config)
        text.setdefault("tie_word_embeddings", False)
        return text

    def config_kwargs(self, cfg) -> dict:
        return {}

    def hf_config(self, cfg, image_token_id: int):
        v = cfg.vision
        return self.config_class(  # type: ignore[call-arg]  # stubs narrower than the code's use
            vision_config=self.vision_config(cfg), text_config=self.text_config(cfg), image_token_id=image_token_id,
            projector_hidden_act=cfg.projector_hidden_act, vision_feature_layer=cfg.vision_select_layer,
            vision_feature_select_strategy="default", image_seq_length=(v.image_size // v.patch_size) ** 2,
            multimodal_projector_bias=self.projector_bias, tie_word_embeddings=False, **self.config_kwargs(cfg))

    # -- parts -------------------------------------------------------------------------------------
    def part_prefixes(self) -> dict[str, list[str]]:
        return {"vision_tower": ["model.vision_tower."],
                "multi_modal_projector": ["model.multi_modal_projector.", "model.image_newline"],
                "language_model": ["model.language_model.", "lm_head."]}

    def embedding_keys(self) -> tuple[str, str]:
        return "model.language_model.embed_tokens.weight", "lm_head.weight"

    def towers(self, model) -> dict[str, nn.Module]:
        return {"vision_tower": model.model.vision_tower, "language_model": model.model.language_model}

    def transformer_blocks(self, model) -> dict[str, nn.ModuleList]:
        return {"vision_tower": model.model.vision_tower.encoder.layers,
                "language_model": model.model.language_model.layers}

    def add_drop_path(self, model, rate: float) -> list:
        return drop_path_hooks(model.model.vision_tower.encoder.layers, "self_attn", "mlp", rate)

    # -- forward -----------------------------------------------------------------------------------
    def vision_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles -> the selected ViT layer's patch features, CLS dropped (N, patches, C)."""
        tower = model.model.vision_tower
        layer = model.config.vision_feature_layer
        pixels = normalize_pixels(pixel_values, CLIP_MEAN, CLIP_STD).to(model.dtype)
        with vision_no_grad(tower):
            out = tower(pixel_values=pixels, output_hidden_states=True)
            return out.hidden_states[layer][:, 1:]

    def encode_images(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        return model.model.multi_modal_projector(self.vision_features(model, pixel_values))

    def decoder(self, model) -> nn.Module:
        return model.model.language_model

    def lm_head(self, model) -> nn.Module:
        return model.lm_head

    # -- checkpoints -------------------------------------------------------------------------------
    def to_native(self, state: dict, text_config) -> dict:
        from vlmtrain.models.loading import convert_causal_lm

        keys = list(state)
        if any(k.startswith(("model.vision_tower.", "model.multi_modal_projector.", "model.language_model."))
               for k in keys) and not any(k.startswith("model.mm_projector.") for k in keys):
            if not any(k.startswith("model.vision_tower.vision_tower.") for k in keys):
                return dict(state)
        if any(k.startswith(("vision_tower.", "multi_modal_projector.", "language_model.")) for k in keys):
            return rename_state(state, HF_HUB_RENAMES, "LLaVA-hf checkpoint")
        if any(k.startswith(("model.mm_projector.", "model.vision_tower.vision_tower.")) for k in keys):
            return rename_state(state, ORIGINAL_RENAMES, "original LLaVA checkpoint")
        if any(k.startswith("vision_model.") for k in keys):  # CLIP: its vision half
            return {("model.vision_tower." + k.removeprefix("vision_model.") if k.startswith("vision_model.")
                     else "clip." + k): v for k, v in state.items()}
        if any(k.startswith("model.embed_tokens.") for k in keys):
            return convert_causal_lm(state, text_config)
        raise UserError(f"unknown LLaVA checkpoint layout (first keys: {keys[:3]})")

    def from_native(self, state: dict) -> dict:
        return rename_state(state, NATIVE_TO_ORIGINAL, "native LLaVA state")

    def config_from_checkpoint(self, c: dict, cfg_file) -> dict:
        from vlmtrain.models.loading import llm_kwargs

        if "text_config" in c:  # HF-native LlavaConfig
            v = c.get("vision_config") or {}
            vision = dict(hidden_size=v.get("hidden_size", 1024), num_hidden_layers=v.get("num_hidden_layers", 24),
                          num_attention_heads=v.get("num_attention_heads", 16),
                          intermediate_size=v.get("intermediate_size", 4096), image_size=v.get("image_size", 336),
                          patch_size=v.get("patch_size", 14), hidden_act=v.get("hidden_act", "quick_gelu"),
                          layer_norm_eps=v.get("layer_norm_eps", 1e-5))
            if v.get("projection_dim") is not None:
                vision["config"] = {"projection_dim": v["projection_dim"]}
            text = llm_kwargs(c["text_config"])
            layer = c.get("vision_feature_layer", -2)
            image_token_id = c.get("image_token_id", c.get("image_token_index"))
        else:  # original LLaVA: the LLM's config at the top, the ViT named by mm_vision_tower
            tower = str(c.get("mm_vision_tower", ""))
            if "clip-vit-large-patch14-336" not in tower:
                raise UserError(f"{cfg_file}: mm_vision_tower {tower!r}: only openai/clip-vit-large-patch14-336 "
                                "is known to vlmtrain's LLaVA family")
            if c.get("mm_projector_type", "linear") != "mlp2x_gelu":
                raise UserError(f"{cfg_file}: mm_projector_type {c.get('mm_projector_type')!r}: only mlp2x_gelu")
            vision = dict(CLIP_L_336)
            text = llm_kwargs({k: v for k, v in c.items() if not k.startswith(("mm_", "image_", "tune_", "freeze_"))
                               and k not in ("use_mm_proj", "tokenizer_padding_side", "tokenizer_model_max_length")})
            text["model_type"] = "llama"
            layer = c.get("mm_vision_select_layer", -2)
            image_token_id = None
        fields = dict(vision=vision, llm={"config": text}, vision_select_layer=layer, template="vicuna_v1",
                      image_mode="pad", projector_hidden_act=c.get("projector_hidden_act", "gelu"))
        if image_token_id is not None:
            fields["image_token_id"] = image_token_id
        if "text_config" not in c and str(c.get("image_aspect_ratio", "")).startswith("anyres"):
            fields.update(next_fields(c))  # original LLaVA-NeXT (llava-v1.6-*): the same model_type
        return fields

    # -- export ------------------------------------------------------------------------------------
    def image_processor(self, model_cfg) -> dict:
        s = model_cfg.vision.image_size
        return {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
                "do_resize": True, "size": {"shortest_edge": s}, "do_center_crop": True,
                "crop_size": {"height": s, "width": s}, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                "do_convert_rgb": True}

    def processor_files(self, model_cfg, max_tiles: int) -> dict[str, dict]:
        return {
            "processor_config.json": {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN,
                                      "patch_size": model_cfg.vision.patch_size,
                                      "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1},
            "preprocessor_config.json": self.image_processor(model_cfg),
        }

    def flops_dims(self, config):
        from vlmtrain.training.flops import InternVLDims

        cfg = config
        return InternVLDims.from_hf_config(_NoShuffle(cfg))


class _NoShuffle:
    """A LLaVA config seen as InternVLDims reads an InternVL one: no pixel shuffle (ratio 1)."""

    def __init__(self, config):
        self.vision_config, self.text_config = config.vision_config, config.text_config
        self.downsample_ratio = 1.0


class LlavaNextFamily(LlavaFamily):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA-1.5's parts plus the learned
    ``image_newline`` and anyres grids (``image_grid_pinpoints``, (height, width) each). Settings:
    ``image_grid_pinpoints``.

    With ``data.image_mode=anyres`` an image is its whole-image tile then its grid's tiles
    (``vlmtrain.data.anyres``); its features are packed by transformers' own
    ``LlavaNextModel.pack_image_features`` (base features, then the grid's feature map unpadded
    to the image's aspect, an ``image_newline`` after each row), which the data side's token count
    matches. Single-tile modes (``crop``, ``pad``: LLaVA-NeXT's stage 1 aligns the projector on
    square images, ``mm_patch_merge_type=flat``) give LLaVA-1.5's 576 features an image."""

    model_class = LlavaNextForConditionalGeneration
    config_class = LlavaNextConfig
    config_model_types = ("llava_next",)

    def __init__(self, projector_bias: bool = True, image_grid_pinpoints=None):
        super().__init__(projector_bias)
        self.image_grid_pinpoints = [list(p) for p in (image_grid_pinpoints or
                                                        [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])]

    def layout(self, cfg) -> ImageLayout:
        v = cfg.vision
        grids = AnyRes(tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints), v.image_size,
                       v.image_size // v.patch_size)
        return dataclasses.replace(super().layout(cfg), anyres=grids)

    def config_kwargs(self, cfg) -> dict:
        return {"image_grid_pinpoints": self.image_grid_pinpoints}

    def image_features(self, model, pixel_values: torch.Tensor, tile_index: torch.Tensor | None = None,
                       image_sizes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        if image_sizes is None:  # one tile an image: LLaVA-1.5's flat features
            return super().image_features(model, pixel_values, tile_index)
        feats = self.encode_images(model, pixel_values)
        if tile_index is not None:
            feats = feats[tile_index]
        config = model.config
        counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                  for size in image_sizes]
        if sum(counts) != feats.shape[0]:
            raise ValueError(f"{feats.shape[0]} tiles for anyres images of {sum(counts)} tiles (sizes {image_sizes})")
        packed, _ = model.model.pack_image_features(list(feats.split(counts)), image_sizes, "default",
                                                    full_parameter(model.model.image_newline))
        return torch.cat(packed)

    def dummy_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        return super().dummy_features(model, pixel_values) + 0.0 * full_parameter(model.model.image_newline).sum()

    def generate_kwargs(self, pixel_values: torch.Tensor | None,
                        image_sizes: list[tuple[int, int]] | None = None) -> dict:
        if pixel_values is None:
            return {}
        if image_sizes is None:
            raise UserError("LLaVA-NeXT generates from anyres images only (model.image_mode=anyres): transformers' "
                            "LlavaNextForConditionalGeneration packs features by each image's size")
        return {"image_sizes": torch.tensor(image_sizes, dtype=torch.long, device=pixel_values.device)}

    def processor_files(self, model_cfg, max_tiles: int) -> dict[str, dict]:
        files = super().processor_files(model_cfg, max_tiles)
        files["processor_config.json"]["processor_class"] = "LlavaNextProcessor"
        files["preprocessor_config.json"].update(
            image_processor_type="LlavaNextImageProcessor", processor_class="LlavaNextProcessor",
            image_grid_pinpoints=self.image_grid_pinpoints, do_pad=True)
        return files

    def config_from_checkpoint(self, c: dict, cfg_file) -> dict:
        return {**super().config_from_checkpoint(c, cfg_file), **next_fields(c)}


def next_fields(c: dict) -> dict:
    """The ModelConfig fields that make a LLaVA checkpoint config LLaVA-NeXT's: the family with the
    config's pinpoints, anyres images."""
    return {"family": {"_target_": "vlmtrain.models.llava.LlavaNextFamily",
                       "image_grid_pinpoints": c.get("image_grid_pinpoints")},
            "image_mode": "anyres"}
