"""CogVLM's checkpoint layouts: the released ``cogvlm-chat-hf`` files (read and written), a Llama /
Vicuna causal LM as CogVLM's language weights (``model.llm.path``), and a CogVLM checkpoint or run
as the source of the ViT (``model.vision.path``).

vlmtrain's CogVLM module names equal the release's parameter names (``vlmtrain.models.cogvlm``), so
the release loads without renaming: ``release_state`` only drops the rotary ``inv_freq`` buffers some
copies carry (recomputed here). A Llama LM maps by ``LLAMA_TO_COGVLM``: q/k/v are fused in the
release's order into ``language_expert_query_key_value``, ``o_proj`` is ``language_expert_dense``, the
MLP is ``mlp.language_mlp``; the visual expert then starts as a copy of those weights (the paper's
initialisation).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vlmtrain.errors import UserError

ROTARY_BUFFER = re.compile(r"\.rotary_emb\.inv_freq$")

LLAMA_TO_COGVLM = [
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$", r"model.layers.\1.self_attn.language_expert_dense.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$", r"model.layers.\1.mlp.language_mlp.\2_proj.weight"),
    (r"^(model\.layers\.\d+\.(input|post_attention)_layernorm\.weight)$", r"\1"),
    (r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight)$", r"\1"),
]
"""A Llama-2 / Vicuna causal LM -> CogVLM's language weights (q/k/v are fused separately)."""

_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$")


def is_cogvlm_state(state: dict) -> bool:
    return any(".self_attn.language_expert_query_key_value." in k for k in state)


def release_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released (or exported) CogVLM state dict as vlmtrain's module keys: the same names, without
    the rotary ``inv_freq`` buffers (recomputed from ``rope_theta``)."""
    return {k: v for k, v in state.items() if not ROTARY_BUFFER.search(k)}


def llama_to_cogvlm(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A Llama causal LM's tensors as CogVLM's language weights, visual expert copied from them."""
    out, qkv = {}, {}
    for key, value in state.items():
        if ROTARY_BUFFER.search(key):
            continue
        m = _QKV.match(key)
        if m:
            qkv.setdefault(int(m.group(1)), {})[m.group(2)] = value
            continue
        for pattern, repl in LLAMA_TO_COGVLM:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            raise UserError(f"model.llm.path: {source}: {key!r} is not a Llama weight CogVLM's LLM can take "
                            "(CogVLM's LLM is Llama / Vicuna without GQA or biases)")
    for layer, parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"model.llm.path: {source}: layer {layer} lacks {sorted({'q', 'k', 'v'} - set(parts))}_proj")
        if not parts["q"].shape == parts["k"].shape == parts["v"].shape:
            raise UserError(f"model.llm.path: {source}: layer {layer}: q/k/v shapes differ (grouped-query attention); "
                            "CogVLM's fused QKV needs as many key/value heads as query heads")
        out[f"model.layers.{layer}.self_attn.language_expert_query_key_value.weight"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    for key in list(out):
        if ".self_attn.language_expert_" in key:
            out[key.replace(".language_expert_", ".vision_expert_")] = out[key]
        elif ".mlp.language_mlp." in key:
            out[key.replace(".mlp.language_mlp.", ".mlp.vision_mlp.")] = out[key]
    return out


def cogvlm_to_llama(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``llama_to_cogvlm`` on the language weights (the visual expert dropped): what a
    Llama causal LM holds. Used to test the table both ways."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^model\.layers\.(\d+)\.self_attn\.language_expert_query_key_value\.weight$", key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"model.layers.{m.group(1)}.self_attn.{name}_proj.weight"] = part
        elif ".language_expert_dense." in key:
            out[key.replace("language_expert_dense", "o_proj")] = value
        elif ".mlp.language_mlp." in key:
            out[key.replace(".mlp.language_mlp.", ".mlp.")] = value
        elif key.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")) \
                and ".vision_" not in key:
            out[key] = value
    return out


def vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ViT (``model.vision.patch_embedding`` / ``transformer``) of a CogVLM checkpoint or run."""
    keep = ("model.vision.patch_embedding.", "model.vision.transformer.")
    return {k: v for k, v in state.items() if k.startswith(keep)}


RELEASE_VISION_KEYS = {"hidden_size", "num_hidden_layers", "num_heads", "intermediate_size", "patch_size",
                       "image_size", "in_channels", "num_positions", "layer_norm_eps", "hidden_act", "dropout_prob"}


def model_fields_from_release(path: str | Path) -> dict:
    """ModelConfig fields (vision, llm.config) from a release-layout ``config.json``."""
    c = json.loads((Path(path) / "config.json").read_text())
    v = c.get("vision_config") or {}
    llm = {k: c[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                             "bos_token_id", "eos_token_id", "pad_token_id") if k in c}
    llm.update(model_type="llama", rope_theta=c.get("rope_theta", 10000.0))
    return {
        "vision": {"hidden_size": v["hidden_size"], "num_hidden_layers": v["num_hidden_layers"],
                   "num_attention_heads": v["num_heads"], "intermediate_size": v["intermediate_size"],
                   "image_size": v["image_size"], "patch_size": v["patch_size"],
                   "layer_norm_eps": v.get("layer_norm_eps", 1e-6), "hidden_act": v.get("hidden_act", "gelu")},
        "llm": {"config": llm},
        "template": "cogvlm_chat",
        "image_token_id": c.get("image_token_id", c.get("pad_token_id", 0)),
    }


def release_config_dict(model) -> dict:
    """The release's ``config.json`` for a vlmtrain CogVLM (``architectures: [CogVLMForCausalLM]``):
    its field names, so engines that read the release's config read the export's."""
    c = model.config
    out = {
        "architectures": ["CogVLMForCausalLM"], "model_type": "cogvlm",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "hidden_act": c.hidden_act, "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "template_version": c.template_version, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "image_token_id": c.image_token_id,
        "vision_config": {k: c.vision_config[k] for k in sorted(RELEASE_VISION_KEYS) if k in c.vision_config},
        "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    return out


def check_loadable(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Names and shapes of ``state`` against the model, failing on the first key that does not fit."""
    expected = model.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise UserError(f"{source}: {key!r} is not a parameter of the configured CogVLM")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(f"{source}: {key}: shape {tuple(value.shape)} != the configured {tuple(expected[key].shape)}")
