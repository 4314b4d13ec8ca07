"""CogVLM (THUDM, arXiv 2311.03079): EVA2-CLIP-E ViT (final layer removed), a SwiGLU MLP adapter
with learned boi/eoi embeddings, and a visual expert in every LLM layer.

transformers has no native CogVLM class, so this module is the model, written from the facts of the
released ``THUDM/cogvlm-chat-hf`` (``modeling_cogvlm.py`` / ``visual.py``, transformers' CogVLM port)
with module names equal to the release's parameter names: ``state_dict()`` *is* the released layout
(``model.vision.*``, ``model.layers.N.self_attn.{vision,language}_expert_query_key_value``,
``{vision,language}_expert_dense``, ``mlp.{language,vision}_mlp.{gate,up,down}_proj``, ``lm_head``), so
an export loads where the release loads and a release loads here without renaming.

The release's rules, kept here:

- Token types: ``LANGUAGE`` 0, ``VISION`` 1. An image is ``2 + (S / p)^2`` VISION positions: boi, the
  ViT's patch features (CLS dropped) through the adapter, eoi. Their input embeddings are replaced by
  those features.
- Experts (``expert_mask``): a position uses the visual expert's QKV / dense / MLP when it and the
  next position are VISION; eoi (the last VISION position before text) uses the language weights.
- Position ids (``build_position_ids``): boi and eoi count as language; every patch of an image
  shares one position id (boi p, patches p + 1, eoi p + 2).
- Attention is causal over language and vision positions alike.
- Vision layers are post-norm inside the residual (``x + LN(attn(x))``, ``x + LN(mlp(x))``); the
  adapter is ``Linear -> LayerNorm -> GELU -> SwiGLU(gate_proj, dense_h_to_4h) -> dense_4h_to_h``.

What the release lacks for training is added here: packed rows (``cu_seq_lens``, attention through
``vlmtrain.models.attention``; positions restart per sample), a vision path under ``no_grad`` when
the ViT is frozen, zero-weight dummy images for text-only batches, per-layer activation
checkpointing (transformers' ``GradientCheckpointingLayer``) and left-padded batched generation
(``GenerationMixin`` with a ``DynamicCache``). No Lightning.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from vlmtrain.data.token_types import VISION_TOKEN_TYPE, sample_position_ids
from vlmtrain.models.attention import varlen_causal_attention
from vlmtrain.models.family import Family

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""The release's image normalisation (``build_conversation_input_ids``: OpenAI CLIP's)."""

VISION_DEFAULTS = dict(
    hidden_size=1792, num_hidden_layers=63, num_heads=16, intermediate_size=15360, patch_size=14,
    image_size=490, in_channels=3, layer_norm_eps=1e-6, hidden_act="gelu", dropout_prob=0.0,
)
"""EVA2-CLIP-E with its final layer removed (63 of 64), as ``cogvlm-chat-hf``'s ``vision_config``."""


class CogVLMConfig(PretrainedConfig):
    """The release's ``config.json`` fields (``vision_config`` a plain dict with its key names:
    ``num_heads``, ``in_channels``, ``num_positions``), plus ``image_token_id``: the token id
    vlmtrain writes at VISION positions (the release writes ``pad_token_id`` there; the id is never
    read, the token types decide)."""

    model_type = "cogvlm"

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
                 rms_norm_eps=1e-5, rope_theta=10000.0, template_version="chat", vision_config=None,
                 image_token_id=None, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                 use_cache=True, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps, self.rope_theta = initializer_range, rms_norm_eps, rope_theta
        self.template_version = template_version
        vision = {**VISION_DEFAULTS, **(vision_config or {})}
        vision.setdefault("num_positions", (vision["image_size"] // vision["patch_size"]) ** 2 + 1)
        self.vision_config = vision
        self.image_token_id = image_token_id
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def text_config(self):
        """The language model's config: CogVLM's config is one flat config (the release's)."""
        return self

    @property
    def num_vision_tokens(self) -> int:
        """VISION positions per image: boi + patches + eoi."""
        v = self.vision_config
        return (v["image_size"] // v["patch_size"]) ** 2 + 2


# -- token types, experts and position ids (the release's rules) ------------------------------------


def expert_mask(token_type_ids: torch.Tensor, cu_seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) True where the visual expert's weights apply: this and the next position are VISION
    (the release's ``get_expert_mask``). In a packed row a sample's last position never looks into
    the next sample."""
    tt = token_type_ids
    mask = torch.zeros_like(tt, dtype=torch.bool)
    mask[:, :-1] = (tt[:, :-1] == VISION_TOKEN_TYPE) & (tt[:, 1:] == VISION_TOKEN_TYPE)
    if cu_seq_lens is not None:
        mask[:, cu_seq_lens[1:].long() - 1] = False
    return mask


# -- vision: EVA2-CLIP-E and the adapter -------------------------------------------------------------


class PatchEmbedding(nn.Module):
    def __init__(self, v: dict):
        super().__init__()
        self.proj = nn.Conv2d(v["in_channels"], v["hidden_size"], kernel_size=v["patch_size"], stride=v["patch_size"])
        self.cls_embedding = nn.Parameter(torch.zeros(1, v["hidden_size"]))
        self.position_embedding = nn.Embedding(v["num_positions"], v["hidden_size"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        # through the embedding's forward, so FSDP2 gathers its weight when it is a unit of its own
        positions = self.position_embedding(torch.arange(x.shape[1], device=x.device))
        return x + positions.unsqueeze(0)


class VisionAttention(nn.Module):
    def __init__(self, v: dict):
        super().__init__()
        self.num_heads = v["num_heads"]
        self.query_key_value = nn.Linear(v["hidden_size"], 3 * v["hidden_size"])
        self.dense = nn.Linear(v["hidden_size"], v["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.query_key_value(x).reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # full attention over CLS + patches, 1/sqrt(d)
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))


class VisionMLP(nn.Module):
    def __init__(self, v: dict):
        super().__init__()
        self.fc1 = nn.Linear(v["hidden_size"], v["intermediate_size"])
        self.act = ACT2FN[v["hidden_act"]]
        self.fc2 = nn.Linear(v["intermediate_size"], v["hidden_size"])

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CogVLMVisionLayer(GradientCheckpointingLayer):
    def __init__(self, v: dict):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(v["hidden_size"], eps=v["layer_norm_eps"])
        self.attention = VisionAttention(v)
        self.mlp = VisionMLP(v)
        self.post_attention_layernorm = nn.LayerNorm(v["hidden_size"], eps=v["layer_norm_eps"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class VisionTransformer(nn.Module):
    def __init__(self, v: dict):
        super().__init__()
        self.layers = nn.ModuleList([CogVLMVisionLayer(v) for _ in range(v["num_hidden_layers"])])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """The adapter: Linear (ViT width -> LLM width) -> LayerNorm -> GELU -> SwiGLU MLP."""

    def __init__(self, config: CogVLMConfig, in_features: int):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.linear_proj = nn.Linear(in_features, h, bias=False)
        self.norm1 = nn.LayerNorm(h)
        self.act1 = nn.GELU()
        self.dense_h_to_4h = nn.Linear(h, i, bias=False)
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.dense_4h_to_h = nn.Linear(i, h, bias=False)

    def forward(self, x):
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """Images (N, 3, S, S), normalised -> (N, 2 + patches, LLM width): boi, adapted patches, eoi."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        v = config.vision_config
        self.patch_embedding = PatchEmbedding(v)
        self.transformer = VisionTransformer(v)
        self.linear_proj = GLU(config, in_features=v["hidden_size"])
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT runs under no_grad when none of its parameters trains (a frozen ViT keeps no
        activations); the adapter, boi and eoi still train. One forward, so sharded strategies
        gather this module's own parameters (boi, eoi) around it."""
        vit_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.transformer.parameters())
        with nullcontext() if vit_grad else torch.no_grad():
            feats = self.transformer(self.patch_embedding(pixel_values.to(self.patch_embedding.proj.weight.dtype)))
        x = self.linear_proj(feats[:, 1:])  # CLS dropped
        n = x.shape[0]
        return torch.cat([self.boi.expand(n, -1, -1).to(x.dtype), x, self.eoi.expand(n, -1, -1).to(x.dtype)], dim=1)


# -- the language model with its visual expert -------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _route(x: torch.Tensor, vision: torch.Tensor, vision_fn, language_fn) -> torch.Tensor:
    """language_fn on the language positions, vision_fn on the visual-expert positions, (B, T, out).

    Every call runs both functions (on an empty selection when a kind is absent), so every expert
    parameter takes part in every forward and backward: sharded strategies (FSDP2, ZeRO-3) and DDP
    then see the same parameters on every rank and step."""
    flat, mask = x.reshape(-1, x.shape[-1]), vision.reshape(-1)
    v_out, l_out = vision_fn(flat[mask]), language_fn(flat[~mask])
    out = flat.new_empty(flat.shape[0], l_out.shape[-1])
    out[mask], out[~mask] = v_out.to(out.dtype), l_out.to(out.dtype)
    return out.reshape(*x.shape[:-1], -1)


class VisionExpertMLP(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, x, vision):
        return _route(x, vision, self.vision_mlp, self.language_mlp)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionExpertAttention(nn.Module):
    def __init__(self, config: CogVLMConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.layer_idx = layer_idx
        self.rope_theta = config.rope_theta
        h = config.hidden_size
        self.vision_expert_query_key_value = nn.Linear(h, 3 * h, bias=False)
        self.vision_expert_dense = nn.Linear(h, h, bias=False)
        self.language_expert_query_key_value = nn.Linear(h, 3 * h, bias=False)
        self.language_expert_dense = nn.Linear(h, h, bias=False)
        self.packed_backend = "auto"
        """Backend of packed rows (``vlmtrain.models.attention``; ``model.attention``)."""

    def _rope(self, q, k, position_ids):
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=q.device, dtype=torch.float32)
                                         / self.head_dim))
        freqs = position_ids.float()[..., None] * inv  # (B, T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # (B, T, 1, D)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def forward(self, x, vision, position_ids, attention_mask=None, cache: Cache | None = None,
                cu_seq_lens=None, max_length=0):
        b, t, _ = x.shape
        qkv = _route(x, vision, self.vision_expert_query_key_value, self.language_expert_query_key_value)
        q, k, v = (s.reshape(b, t, self.num_heads, self.head_dim) for s in qkv.split(self.hidden_size, dim=-1))
        q, k = self._rope(q, k, position_ids)
        scale = 1.0 / math.sqrt(self.head_dim)
        if cu_seq_lens is not None:
            if b != 1:
                raise ValueError(f"packed attention takes one packed row per forward, got a batch of {b}")
            out = varlen_causal_attention(q[0], k[0], v[0], cu_seq_lens, int(max_length), scale,
                                          self.packed_backend).unsqueeze(0)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(attention_mask, t, k.shape[2]),
                                                 scale=scale).transpose(1, 2)
        out = out.reshape(b, t, self.hidden_size)
        return _route(out, vision, self.vision_expert_dense, self.language_expert_dense)


def _causal_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor:
    """(B or 1, 1, q_len, kv_len) bool: causal (the queries are the last q_len of kv_len positions)
    and, with a 2-D padding mask over the kv positions, no padded keys. A position always sees
    itself, so a padding query's row is never empty (its output is never used)."""
    device = attention_mask.device if attention_mask is not None else None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        keys = attention_mask[:, None, None, -kv_len:].bool()
        mask = (mask & keys) | (k_pos == q_pos)[None, None]
    return mask


class CogVLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: CogVLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = VisionExpertAttention(config, layer_idx)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, vision, position_ids, attention_mask=None, cache=None, cu_seq_lens=None,
                max_length=0):
        x = x + self.self_attn(self.input_layernorm(x), vision, position_ids, attention_mask, cache,
                               cu_seq_lens, max_length)
        return x + self.mlp(self.post_attention_layernorm(x), vision)


class CogVLMPreTrainedModel(PreTrainedModel):
    config_class = CogVLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CogVLMDecoderLayer", "CogVLMVisionLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, EVA2CLIPModel):
            nn.init.normal_(module.boi, std=std)
            nn.init.normal_(module.eoi, std=std)
        elif isinstance(module, PatchEmbedding):
            nn.init.normal_(module.cls_embedding, std=std)


class CogVLMModel(CogVLMPreTrainedModel):
    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision = EVA2CLIPModel(config)
        self.layers = nn.ModuleList([CogVLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised images -> (N, 2 + patches, D) (``EVA2CLIPModel.forward``)."""
        return self.vision(pixel_values)

    def forward(self, input_ids=None, pixel_values=None, token_type_ids=None, attention_mask=None,
                position_ids=None, cache=None, inputs_embeds=None, use_cache=None, cu_seq_lens=None,
                max_length=0, dummy_vision=False, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if token_type_ids is None:
            token_type_ids = vision_token_types(input_ids, self.config.image_token_id)
        if pixel_values is not None:
            feats = self.encode_images(normalize_clip(pixel_values)).to(inputs_embeds.dtype)
            if dummy_vision:
                inputs_embeds = inputs_embeds + 0.0 * feats.sum()
            else:
                inputs_embeds = scatter_image_features(inputs_embeds, token_type_ids, feats)
        if position_ids is None:
            position_ids = sample_position_ids(token_type_ids, cu_seq_lens, attention_mask)
        vision = expert_mask(token_type_ids, cu_seq_lens)
        if use_cache and cache is None and cu_seq_lens is None:
            cache = DynamicCache(config=self.config)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, vision, position_ids, attention_mask=attention_mask, cache=cache,
                      cu_seq_lens=cu_seq_lens, max_length=max_length)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache)


def vision_token_types(input_ids: torch.Tensor, image_token_id: int | None) -> torch.Tensor:
    """VISION where the image token is, LANGUAGE elsewhere (what the renderer's CogVLM layout writes)."""
    if image_token_id is None:
        return torch.zeros_like(input_ids)
    return (input_ids == image_token_id).long()


def scatter_image_features(embeds: torch.Tensor, token_type_ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """VISION positions, in order, take the image features (N images x (2 + patches))."""
    mask = token_type_ids == VISION_TOKEN_TYPE
    n = feats.shape[0] * feats.shape[1]
    message = (f"VISION positions != {feats.shape[0]} images x {feats.shape[1]} = {n} image features: "
               "the data side and the model disagree on tokens per image")
    if mask.is_cuda:
        torch._assert_async(mask.sum() == n, message)
    elif int(mask.sum()) != n:
        raise ValueError(f"{int(mask.sum())} {message}")
    return embeds.masked_scatter(mask.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))


_CLIP: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_clip(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32 normalised with CLIP's mean and std (the release's transform);
    float input is taken as already normalised."""
    if pixels.is_floating_point():
        return pixels
    if pixels.device not in _CLIP:
        mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255
        inv_std = 1.0 / (torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1) * 255)
        _CLIP[pixels.device] = (mean, inv_std)
    mean, inv_std = _CLIP[pixels.device]
    return (pixels.float() - mean) * inv_std


class CogVLMForCausalLM(CogVLMPreTrainedModel, GenerationMixin):
    """The release's ``CogVLMForCausalLM``: ``model`` (``CogVLMModel``) + ``lm_head``."""

    _tied_weights_keys = {}

    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_attn_implementation(self, attn_implementation):
        """``vlmtrain.models.attention.use_packed_attention`` names the language model's packed
        backend (``packed_<backend>``); CogVLM's layers call the attention helpers themselves."""
        from vlmtrain.models.attention import PREFIX

        name = attn_implementation.get("text_config") if isinstance(attn_implementation, dict) else attn_implementation
        if isinstance(name, str) and name.startswith(PREFIX):
            set_packed_backend(self, name[len(PREFIX):])

    def forward(self, input_ids=None, pixel_values=None, token_type_ids=None, attention_mask=None,
                position_ids=None, cache=None, inputs_embeds=None, use_cache=None, labels=None,
                logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, token_type_ids=token_type_ids,
                         attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None,
                                      pixel_values=None, use_cache=True, **kwargs):
        """The whole prompt (images included) on the first step; afterwards the last token only, at
        the next position of its row (the positions of the full sequence, by the release's rule)."""
        token_types = vision_token_types(input_ids, self.config.image_token_id)
        positions = sample_position_ids(token_types, None, attention_mask)
        past = cache.get_seq_length() if cache is not None else 0
        if past:
            input_ids, token_types, positions = input_ids[:, past:], token_types[:, past:], positions[:, past:]
            pixel_values = None
        return {"input_ids": input_ids, "token_type_ids": token_types, "position_ids": positions,
                "attention_mask": attention_mask, "pixel_values": pixel_values, "cache": cache,
                "use_cache": use_cache, "logits_to_keep": kwargs.get("logits_to_keep", 0)}


# -- building, parts, the visual expert's initialisation ----------------------------------------------


def init_visual_expert(model: CogVLMForCausalLM) -> None:
    """Every layer's visual expert (QKV, dense, MLP) := the language weights, as CogVLM initialises
    it from the pretrained LLM."""
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            a.vision_expert_query_key_value.weight.copy_(a.language_expert_query_key_value.weight)
            a.vision_expert_dense.weight.copy_(a.language_expert_dense.weight)
            layer.mlp.vision_mlp.load_state_dict(layer.mlp.language_mlp.state_dict())


VISUAL_EXPERT_KEYS = ("self_attn.vision_expert_", "mlp.vision_mlp.")


def part_of(param_name: str) -> str:
    """Which part a parameter belongs to: ``vision_tower`` (the ViT), ``multi_modal_projector``
    (the adapter with boi / eoi), ``visual_expert`` (each layer's vision QKV, dense and MLP) or
    ``language_model`` (the frozen LLM's weights, embeddings and head)."""
    name = param_name.removeprefix("base_model.model.")
    if name.startswith(("model.vision.patch_embedding.", "model.vision.transformer.")):
        return "vision_tower"
    if name.startswith("model.vision."):
        return "multi_modal_projector"
    if name.startswith("model.layers.") and any(k in name for k in VISUAL_EXPERT_KEYS):
        return "visual_expert"
    if name.startswith(("model.", "lm_head.")):
        return "language_model"
    raise KeyError(f"parameter {param_name!r} belongs to no known part")


def transformer_blocks(model: CogVLMForCausalLM) -> dict[str, nn.ModuleList]:
    return {"vision_tower": model.model.vision.transformer.layers, "language_model": model.model.layers}


def set_packed_backend(model: CogVLMForCausalLM, backend: str) -> None:
    for layer in model.model.layers:
        layer.self_attn.packed_backend = backend


def cogvlm_config(cfg, image_token_id: int | None) -> CogVLMConfig:
    """A ``ModelConfig`` (``model.vision``: the ViT; ``model.llm.config``: the LLM, Llama names) ->
    the release's ``CogVLMConfig``."""
    from omegaconf import DictConfig, OmegaConf

    v = cfg.vision
    text = cfg.llm.config
    text = OmegaConf.to_container(text, resolve=True) if isinstance(text, DictConfig) else dict(text)
    unknown = set(text) - set(LLM_KEYS)
    if unknown:
        from vlmtrain.errors import UserError

        raise UserError(f"model.llm.config: {sorted(unknown)} do not apply to CogVLM's LLM (keys: {sorted(LLM_KEYS)})")
    text.pop("model_type", None)  # type: ignore[call-arg]  # stubs narrower than the code's use
    vision = dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers, num_heads=v.num_attention_heads,
                  intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size,
                  layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
    return CogVLMConfig(vision_config=vision, image_token_id=image_token_id, **text)


LLM_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "rope_theta",
            "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "template_version")
"""``model.llm.config`` keys CogVLM's LLM takes (Vicuna / Llama-2: no GQA, no biases)."""


def build_cogvlm(cfg, image_token_id: int | None = None, seed: int = 0, device=None,
                 init_weights: bool = True) -> CogVLMForCausalLM:
    """Random-init CogVLM, deterministic in ``seed``, its visual expert a copy of the language
    weights. ``device="meta"`` builds without memory (``vlmtrain plan``); ``init_weights=False``
    allocates without initialising (every weight is loaded next)."""
    config = cogvlm_config(cfg, image_token_id if image_token_id is not None else cfg.image_token_id)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return CogVLMForCausalLM(config)
    if not init_weights:
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = CogVLMForCausalLM(config)
        return model if device is None else model.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CogVLMForCausalLM(config)
    init_visual_expert(model)
    return model if device is None else model.to(device)


# -- the family (vlmtrain.models.family): what the rest of vlmtrain trains CogVLM through ----------


class _LayerGroup:
    """One part's transformer layers as a "tower" for activation checkpointing: CogVLM's ViT and LLM
    live in one ``PreTrainedModel``, whose own ``gradient_checkpointing_enable`` would switch both."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        func = partial(checkpoint, **(gradient_checkpointing_kwargs or {"use_reentrant": False}))
        for layer in self.layers:
            layer._gradient_checkpointing_func = func
            layer.gradient_checkpointing = True


class _Decoder(nn.Module):
    """``Family.decoder``: CogVLM's language model without its head, called as the training step
    calls a decoder (``inputs_embeds``, ``position_ids``, packed ``cu_seq_lens_q`` ...), plus the
    ``token_type_ids`` the data side carries (the visual expert's routing)."""

    def __init__(self, model: CogVLMModel):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, position_ids=None, attention_mask=None, token_type_ids=None, use_cache=False,
                cu_seq_lens_q=None, max_length_q=0, **kwargs):
        if token_type_ids is None:
            raise ValueError("CogVLM's decoder needs token_type_ids (the data side's ImageLayout.token_types)")
        return self.model(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids, use_cache=use_cache, cu_seq_lens=cu_seq_lens_q,
                          max_length=max_length_q)


class CogVLMFamily(Family):
    """CogVLM (``vlmtrain.models.cogvlm``; no native transformers class). Parts: the three of
    ``config.PARTS`` (ViT; adapter with boi/eoi; the LLM's own weights) and ``visual_expert``
    (each layer's vision QKV, dense and MLP), so a stage can train the expert with the LLM frozen.

    ``image_token``: the token written at VISION positions; ``<IMG_CONTEXT>`` (added to the
    tokenizer) for the tiny model, ``<unk>`` (id 0, the release's pad) for Vicuna's vocabulary,
    which has no room for new rows in the released checkpoint."""

    model_class = CogVLMForCausalLM
    config_model_types = ("cogvlm",)
    processor_tokens = {}
    parts = ("vision_tower", "multi_modal_projector", "language_model", "visual_expert")
    lora_targets = {
        "llm_attention": r"model\.layers\.\d+\.self_attn\.language_expert_(query_key_value|dense)",
        "llm_mlp": r"model\.layers\.\d+\.mlp\.language_mlp\.(gate_proj|up_proj|down_proj)",
        "expert_attention": r"model\.layers\.\d+\.self_attn\.vision_expert_(query_key_value|dense)",
        "expert_mlp": r"model\.layers\.\d+\.mlp\.vision_mlp\.(gate_proj|up_proj|down_proj)",
        "vit": r"model\.vision\.transformer\.layers\.\d+\.(attention\.(query_key_value|dense)|mlp\.fc1|mlp\.fc2)",
    }
    part_modules = {
        "vision_tower": ["patch_embedding", "transformer"],
        "multi_modal_projector": ["vision"],  # boi / eoi are parameters of model.vision itself
        "language_model": ["embed_tokens", "language_expert_query_key_value", "language_expert_dense",
                           "language_mlp", "input_layernorm", "post_attention_layernorm", "norm", "lm_head"],
        "visual_expert": ["vision_expert_query_key_value", "vision_expert_dense", "vision_mlp"],
    }

    def __init__(self, image_token: str = "<IMG_CONTEXT>"):
        self.image_token = image_token

    def layout(self, cfg):
        from vlmtrain.data.placeholders import ImageLayout

        v = cfg.vision
        return ImageLayout(context=self.image_token, start="", end="",
                           tokens_per_tile=(v.image_size // v.patch_size) ** 2 + 2,
                           special_tokens=() if self.image_token == "<unk>" else (self.image_token,),
                           mean=CLIP_MEAN, std=CLIP_STD, image_mode="resize", token_types=True)

    def hf_config(self, cfg, image_token_id: int):
        return cogvlm_config(cfg, image_token_id)

    def init_weights(self, model, cfg) -> None:
        init_visual_expert(model)

    def part_of(self, param_name: str) -> str:
        return part_of(param_name)

    def part_prefixes(self) -> dict[str, list[str]]:
        return {"vision_tower": ["model.vision.patch_embedding.", "model.vision.transformer."],
                "multi_modal_projector": ["model.vision.linear_proj.", "model.vision.boi", "model.vision.eoi"],
                "language_model": ["model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."],
                "visual_expert": []}

    def embedding_keys(self) -> tuple[str, str]:
        return "model.embed_tokens.weight", "lm_head.weight"

    def towers(self, model) -> dict:
        return {k: _LayerGroup(v) for k, v in transformer_blocks(model).items()}

    def transformer_blocks(self, model) -> dict[str, nn.ModuleList]:
        return transformer_blocks(model)

    def encode_images(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        return model.model.encode_images(normalize_clip(pixel_values))

    def decoder(self, model) -> nn.Module:
        return _Decoder(model.model)

    def lm_head(self, model) -> nn.Module:
        return model.lm_head

    def to_native(self, state: dict, text_config) -> dict:
        from vlmtrain.models import cogvlm_layout as layout

        if layout.is_cogvlm_state(state):
            return layout.release_state(state)
        if any(k.endswith(".self_attn.q_proj.weight") for k in state):
            return layout.llama_to_cogvlm(state, "checkpoint")
        return state

    def config_from_checkpoint(self, c: dict, cfg_file) -> dict:
        from pathlib import Path

        from vlmtrain.models.cogvlm_layout import model_fields_from_release

        fields = model_fields_from_release(Path(cfg_file).parent)
        fields["family"] = {"_target_": "vlmtrain.models.cogvlm.CogVLMFamily",
                            "image_token": "<IMG_CONTEXT>" if fields["image_token_id"] else "<unk>"}
        return fields

    def flops_dims(self, config):
        from vlmtrain.training.flops import InternVLDims

        v = config.vision_config
        return InternVLDims(vit_hidden=v["hidden_size"], vit_layers=v["num_hidden_layers"],
                            vit_intermediate=v["intermediate_size"], tile_size=v["image_size"],
                            patch_size=v["patch_size"], downsample_ratio=1.0, llm_hidden=config.hidden_size,
                            llm_layers=config.num_hidden_layers, llm_heads=config.num_attention_heads,
                            llm_kv_heads=config.num_attention_heads,
                            llm_head_dim=config.hidden_size // config.num_attention_heads,
                            llm_intermediate=config.intermediate_size, vocab_size=config.vocab_size)
