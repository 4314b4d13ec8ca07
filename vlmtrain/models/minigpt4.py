"""MiniGPT-4 as a vlmtrain model family, on transformers' native ``Blip2ForConditionalGeneration``
with a causal-LM (Vicuna) text config.

MiniGPT-4 is BLIP-2's frozen visual side (EVA ViT-g/14 at 224 px with ``ln_vision``, the
Q-Former with 32 learned queries; its text embeddings and text FFNs removed) and one Linear
(``llama_proj``) into a frozen Vicuna. Blip2ForConditionalGeneration holds that layout
parameter for parameter: ``vision_model`` (the ViT; ``post_layernorm`` is ``ln_vision``),
``query_tokens``, ``qformer`` (``use_qformer_text_input=False``: no text FFN, no word
embeddings; ``qformer.layernorm`` is the BERT embeddings' LayerNorm applied to the queries),
``language_projection`` (``llama_proj``) and ``language_model`` (the LlamaForCausalLM). One
difference: EVA's attention has a q bias and a v bias but no k bias; transformers' Blip2 keeps one
``qkv.bias`` whose k third is zero (frozen in MiniGPT-4, so it stays zero; ``from_native``
refuses a non-zero one).

vlmtrain's parts: ``vision_tower`` = ViT + Q-Former + queries (both frozen in MiniGPT-4),
``multi_modal_projector`` = ``language_projection``, ``language_model`` = Vicuna.

The image tokens: MiniGPT-4 splices the 32 projected queries into the prompt at ``<ImageHere>``
inside ``<Img>...</Img>`` (plain text, tokenised with the prompt); vlmtrain writes 32
``<ImageHere>`` tokens there, the native class's ``image_token_id``.

Checkpoint layouts (``to_native`` / ``from_native``): native (``save_pretrained``) and MiniGPT-4's
own module names (LAVIS: ``visual_encoder.*``, ``ln_vision.*``, ``Qformer.bert.*``,
``query_tokens``, ``llama_proj.*``, ``llama_model.*``; ``MINIGPT4_RENAMES``). MiniGPT-4's released
``pretrained_minigpt4*.pth`` holds ``llama_proj`` only (the rest is BLIP-2's and Vicuna's).
"""

from __future__ import annotations

import re
from contextlib import nullcontext

import torch
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration

from vlmtrain.data.images import normalize_pixels
from vlmtrain.data.placeholders import CLIP_MEAN, CLIP_STD, ImageLayout
from vlmtrain.errors import UserError
from vlmtrain.models.family import Family, drop_path_hooks, full_parameter, plain_dict, rename_state, vision_no_grad

IMAGE_TOKEN = "<ImageHere>"

_V = r"^visual_encoder\.blocks\.(\d+)\."
_Q = r"^Qformer\.bert\.encoder\.layer\.(\d+)\."
_NV = "vision_model.encoder.layers.\\1."
_NQ = "qformer.encoder.layer.\\1."
MINIGPT4_RENAMES = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (_V + r"norm1\.", _NV + "layer_norm1."),
    (_V + r"norm2\.", _NV + "layer_norm2."),
    (_V + r"attn\.qkv\.weight$", _NV + "self_attn.qkv.weight"),
    (_V + r"attn\.proj\.", _NV + "self_attn.projection."),
    (_V + r"mlp\.", _NV + "mlp."),
    (r"^ln_vision\.", "vision_model.post_layernorm."),
    (r"^query_tokens$", "query_tokens"),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (_Q + r"(attention|crossattention)\.self\.", _NQ + "\\2.attention."),
    (_Q + r"(attention|crossattention)\.output\.", _NQ + "\\2.output."),
    (_Q + r"(intermediate_query|output_query)\.", _NQ + "\\2."),
    (r"^llama_proj\.", "language_projection."),
    (r"^llama_model\.", "language_model."),
]
"""MiniGPT-4 (LAVIS module names) -> Blip2ForConditionalGeneration; EVA's ``attn.q_bias`` /
``attn.v_bias`` become ``qkv.bias`` = [q_bias, 0, v_bias] (``to_native``)."""

NATIVE_TO_MINIGPT4 = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"visual_encoder.blocks.\1.attn.qkv.weight"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision_model\.post_layernorm\.", "ln_vision."),
    (r"^query_tokens$", "query_tokens"),
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
     r"Qformer.bert.encoder.layer.\1.\2.self."),
    (r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.",
     r"Qformer.bert.encoder.layer.\1.\2.output."),
    (r"^qformer\.encoder\.layer\.(\d+)\.(intermediate_query|output_query)\.", r"Qformer.bert.encoder.layer.\1.\2."),
    (r"^language_projection\.", "llama_proj."),
    (r"^language_model\.", "llama_model."),
]
"""The inverse of ``MINIGPT4_RENAMES`` (``qkv.bias`` split back into q_bias / v_bias)."""

QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               cross_attention_frequency=2, layer_norm_eps=1e-12, hidden_act="gelu", max_position_embeddings=512,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
"""BLIP-2's Q-Former (BERT-base, cross-attention every other layer). Dropout 0: MiniGPT-4 keeps its
frozen Q-Former in eval mode (``disabled_train``); set ``family.qformer.hidden_dropout_prob=0.1``
(BLIP-2's) for a stage that trains it."""


class MiniGPT4Family(Family):
    """MiniGPT-4 (``Blip2ForConditionalGeneration``). Settings: ``num_query_tokens`` (32) and
    ``qformer`` (Q-Former config keywords over BLIP-2's, ``QFORMER``)."""

    model_class = Blip2ForConditionalGeneration
    config_model_types = ("blip-2",)
    processor_tokens = {"image_token": IMAGE_TOKEN}
    lora_targets = {
        "llm_attention": r"language_model\.model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
        "llm_mlp": r"language_model\.model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
        "vit": r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(qkv|projection)|mlp\.fc1|mlp\.fc2)",
    }
    part_modules = {"vision_tower": ["vision_model", "qformer"], "multi_modal_projector": ["language_projection"],
                    "language_model": ["language_model"]}

    def __init__(self, num_query_tokens: int = 32, qformer: dict | None = None):
        self.num_query_tokens = num_query_tokens
        self.qformer = {**QFORMER, **(qformer or {})}

    # -- build -------------------------------------------------------------------------------------
    def layout(self, cfg) -> ImageLayout:
        return ImageLayout(context=IMAGE_TOKEN, start="<Img>", end="</Img>", markers_are_text=True,
                           special_tokens=(IMAGE_TOKEN,), tokens_per_tile=self.num_query_tokens,
                           processor_placeholder=IMAGE_TOKEN, mean=CLIP_MEAN, std=CLIP_STD, image_mode=cfg.image_mode)

    def hf_config(self, cfg, image_token_id: int):
        v = cfg.vision
        vision = dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                      num_attention_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
                      image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                      layer_norm_eps=v.layer_norm_eps, qkv_bias=v.attention_bias, **plain_dict(v.config))
        text = plain_dict(cfg.llm.config)
        text.setdefault("tie_word_embeddings", False)
        qformer = dict(self.qformer, encoder_hidden_size=v.hidden_size, use_qformer_text_input=False)
        return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,  # type: ignore[call-arg]  # stubs narrower than the code's use
                           num_query_tokens=self.num_query_tokens, image_token_index=image_token_id,
                           tie_word_embeddings=False)

    def init_weights(self, model, cfg) -> None:
        with torch.no_grad():  # MiniGPT-4's init_Qformer: query_tokens ~ N(0, initializer_range)
            model.query_tokens.normal_(0.0, model.config.qformer_config.initializer_range)
            for layer in model.vision_model.encoder.layers:  # EVA has no k bias
                third = layer.self_attn.qkv.bias.shape[0] // 3
                layer.self_attn.qkv.bias[third:2 * third].zero_()

    # -- parts -------------------------------------------------------------------------------------
    def part_prefixes(self) -> dict[str, list[str]]:
        return {"vision_tower": ["vision_model.", "qformer.", "query_tokens"],
                "multi_modal_projector": ["language_projection."], "language_model": ["language_model."]}

    def embedding_keys(self) -> tuple[str, str]:
        return "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"

    def towers(self, model) -> dict[str, nn.Module]:
        return {"vision_tower": model.vision_model, "language_model": model.language_model}

    def transformer_blocks(self, model) -> dict[str, nn.ModuleList]:
        return {"vision_tower": model.vision_model.encoder.layers, "language_model": model.language_model.model.layers}

    def add_drop_path(self, model, rate: float) -> list:
        return drop_path_hooks(model.vision_model.encoder.layers, "self_attn", "mlp", rate)

    # -- forward -----------------------------------------------------------------------------------
    def encode_images(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """MiniGPT-4's encode_img: ln_vision(ViT(image)), the Q-Former's queries attending to it,
        then llama_proj: (N, 32, D)."""
        pixels = normalize_pixels(pixel_values, CLIP_MEAN, CLIP_STD).to(model.dtype)
        with vision_no_grad(model.vision_model):  # the ViT's features; the Q-Former below may train
            image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        trains = model.query_tokens.requires_grad or any(p.requires_grad for p in model.qformer.parameters())
        with nullcontext() if trains and torch.is_grad_enabled() else torch.no_grad():
            mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            queries = full_parameter(model.query_tokens).expand(image_embeds.shape[0], -1, -1)
            out = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=mask).last_hidden_state
        return model.language_projection(out[:, :self.num_query_tokens].to(model.language_projection.weight.dtype))

    def decoder(self, model) -> nn.Module:
        return model.language_model.model

    def lm_head(self, model) -> nn.Module:
        return model.language_model.lm_head

    # -- checkpoints -------------------------------------------------------------------------------
    def to_native(self, state: dict, text_config) -> dict:
        from vlmtrain.models.loading import convert_causal_lm

        keys = list(state)
        if any(k.startswith(("vision_model.", "qformer.", "language_projection.", "language_model."))
               for k in keys) or keys == ["query_tokens"]:
            return dict(state)
        if any(k.startswith(("visual_encoder.", "ln_vision.", "Qformer.", "llama_proj.", "llama_model."))
               for k in keys) or "query_tokens" in state:
            state = dict(state)
            biases = {}
            for key in [k for k in state if re.match(_V + r"attn\.(q|v)_bias$", k)]:
                m = re.match(_V + r"attn\.(q|v)_bias$", key)
                biases.setdefault(m[1], {})[m[2]] = state.pop(key)  # type: ignore[index]  # stubs narrower than the code's use
            out = rename_state(state, MINIGPT4_RENAMES, "MiniGPT-4 checkpoint")
            for i, b in biases.items():
                out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat(
                    [b["q"], torch.zeros_like(b["v"]), b["v"]])
            return out
        if any(k.startswith("model.embed_tokens.") for k in keys):  # Vicuna for model.llm.path
            return {_llm_key(k): v for k, v in convert_causal_lm(state, text_config).items()}
        raise UserError(f"unknown MiniGPT-4 checkpoint layout (first keys: {keys[:3]})")

    def from_native(self, state: dict) -> dict:
        state = dict(state)
        biases = {}
        for key in [k for k in state if re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", k)]:
            i = key.split(".")[3]
            q, k, v = state.pop(key).chunk(3)
            if k.abs().max() > 0:
                raise UserError(f"{key}: the k bias is not zero; EVA's attention (MiniGPT-4's layout) has none")
            biases[i] = (q, v)
        out = rename_state(state, NATIVE_TO_MINIGPT4, "native Blip2 state")
        for i, (q, v) in biases.items():
            out[f"visual_encoder.blocks.{i}.attn.q_bias"] = q.clone()
            out[f"visual_encoder.blocks.{i}.attn.v_bias"] = v.clone()
        return out

    def config_from_checkpoint(self, c: dict, cfg_file) -> dict:
        from vlmtrain.models.loading import llm_kwargs

        v, q = c.get("vision_config") or {}, c.get("qformer_config") or {}
        text = c.get("text_config") or {}
        if text.get("model_type") not in (None, "llama"):
            raise UserError(f"{cfg_file}: a BLIP-2 with a {text.get('model_type')!r} LLM is not MiniGPT-4 (llama)")
        vision = dict(hidden_size=v.get("hidden_size", 1408), num_hidden_layers=v.get("num_hidden_layers", 39),
                      num_attention_heads=v.get("num_attention_heads", 16),
                      intermediate_size=v.get("intermediate_size", 6144), image_size=v.get("image_size", 224),
                      patch_size=v.get("patch_size", 14), hidden_act=v.get("hidden_act", "gelu"),
                      layer_norm_eps=v.get("layer_norm_eps", 1e-6), attention_bias=v.get("qkv_bias", True))
        keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "cross_attention_frequency", "layer_norm_eps", "hidden_act", "max_position_embeddings")
        family = {"_target_": "vlmtrain.models.minigpt4.MiniGPT4Family",
                  "num_query_tokens": c.get("num_query_tokens", 32),
                  "qformer": {k: q[k] for k in keep if k in q}}
        return dict(family=family, vision=vision, llm={"config": llm_kwargs(text)}, template="minigpt4",
                    image_mode="resize", image_token_id=c.get("image_token_id", c.get("image_token_index")))

    # -- export ------------------------------------------------------------------------------------
    def processor_files(self, model_cfg, max_tiles: int) -> dict[str, dict]:
        s = model_cfg.vision.image_size
        return {
            "processor_config.json": {"processor_class": "Blip2Processor", "num_query_tokens": self.num_query_tokens},
            "preprocessor_config.json": {
                "image_processor_type": "BlipImageProcessor", "processor_class": "Blip2Processor",
                "do_resize": True, "size": {"height": s, "width": s}, "resample": 3, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
                "image_std": list(CLIP_STD), "do_convert_rgb": True},
        }

    def flops_dims(self, config):
        from vlmtrain.training.flops import InternVLDims

        v, t = config.vision_config, config.text_config
        heads = t.num_attention_heads
        return InternVLDims(
            vit_hidden=v.hidden_size, vit_layers=v.num_hidden_layers, vit_intermediate=v.intermediate_size,
            tile_size=v.image_size, patch_size=v.patch_size,
            downsample_ratio=(config.num_query_tokens / (v.image_size // v.patch_size) ** 2) ** 0.5,
            llm_hidden=t.hidden_size, llm_layers=t.num_hidden_layers, llm_heads=heads,
            llm_kv_heads=getattr(t, "num_key_value_heads", None) or heads,
            llm_head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads,
            llm_intermediate=t.intermediate_size, vocab_size=t.vocab_size)


def _llm_key(key: str) -> str:
    """``convert_causal_lm``'s InternVL-style names -> Blip2's ``language_model.*``."""
    if key.startswith("model.language_model."):
        return "language_model.model." + key.removeprefix("model.language_model.")
    return "language_model." + key  # lm_head.*
