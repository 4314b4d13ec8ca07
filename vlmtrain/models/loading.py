"""Local checkpoints in every layout -> the transformers InternVL model, without network or remote code.

Layouts understood (detected from the key names):

- HF-native InternVL as files hold it (``vision_tower.*``, ``multi_modal_projector.*``,
  ``language_model.model.*``, ``language_model.lm_head.*``: the ``-hf`` repos, transformers'
  ``save_pretrained``, ``vlmtrain.export``) or as module names (``model.vision_tower.*`` ...).
- OpenGVLab InternVL (``vision_model.*``, ``mlp1.{0,1,3}.*``, ``language_model.*``), with a
  Qwen2 / Llama / Phi-3 LLM (HF key names under ``language_model.``) or an InternLM2 LLM
  (``tok_embeddings``, fused ``wqkv``, ``wo``, ``feed_forward.w1/w2/w3``, ``output``), which
  becomes the Llama layout: same maths, q/k/v split out of the grouped ``wqkv``.
- A standalone InternViT (``embeddings.*``, ``encoder.layers.*``) for ``model.vision.path``.
- A causal LM (HF ``model.embed_tokens`` ... ``lm_head``, or InternLM2) for ``model.llm.path``.

Every layout is first renamed to HF-native InternVL keys by the tables below; loading then checks
names and shapes against the configured model and fails on the first key that does not fit.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmtrain.errors import MissingPathError, UserError
from vlmtrain.models.run_checkpoint import find_checkpoint, is_checkpoint, is_run_dir, load_strict, read_weights

log = logging.getLogger("vlmtrain")

# -- reading ----------------------------------------------------------------------------------------


def weight_files(path: str | Path, key: str, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint file or directory; pickle files only with allow_pickle.
    ``key`` names the setting in errors."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        index = p / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [p / s for s in shards]
        else:
            files = sorted(p.glob("*.safetensors"))
            if not files:
                files = sorted(p.glob("*.bin")) + sorted(p.glob("*.pt")) + sorted(p.glob("*.pth"))
    else:
        raise MissingPathError(f"{key}: no checkpoint at {p}")
    if not files:
        raise MissingPathError(f"{key}: {p}: no *.safetensors (or *.bin) weight files")
    pickled = [f for f in files if f.suffix != ".safetensors"]
    if pickled and not allow_pickle:
        raise UserError(
            f"{key}: {pickled[0]}: pickle weights can run arbitrary code when loaded; convert to safetensors "
            "or set model.allow_pickle=true if you trust the file"
        )
    return files


def read_state_dict(path: str | Path, key: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: safetensors (single or sharded), pickle files (only with
    allow_pickle), or a vlmtrain run directory / checkpoint (``vlmtrain.models.run_checkpoint``: a
    LoRA run comes back merged), so a trained run's ViT can be reused by path (progressive scaling).
    ``key`` names the setting in errors."""
    p = Path(path).expanduser()
    if is_run_dir(p) or is_checkpoint(p):
        return read_weights(find_checkpoint(p, key), key)
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path, key, allow_pickle):
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        else:
            obj = torch.load(f, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):  # Lightning's {"state_dict": ...}, LAVIS / MiniGPT-4's {"model": ...}
                obj = obj.get("state_dict", obj["model"] if isinstance(obj.get("model"), dict) else obj)
            state.update(obj)
    return state


# -- rename tables ----------------------------------------------------------------------------------

VISION_RENAMES = [
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^encoder\.layers\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.projection_layer."),
    (r"^encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.", r"encoder.layer.\1.attention.\2."),
    (r"^encoder\.layers\.(\d+)\.ls1$", r"encoder.layer.\1.lambda_1"),
    (r"^encoder\.layers\.(\d+)\.ls2$", r"encoder.layer.\1.lambda_2"),
    (r"^encoder\.layers\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^encoder\.layers\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"encoder.layer.\1.mlp."),
]
"""OpenGVLab InternViT -> transformers InternVLVisionModel (``attn.qkv`` is split separately)."""

PROJECTOR_RENAMES = [
    (r"^0\.", "layer_norm."),
    (r"^1\.", "linear_1."),
    (r"^3\.", "linear_2."),
]
"""OpenGVLab ``mlp1`` (Sequential: LayerNorm, Linear, GELU, Linear) -> InternVLMultiModalProjector."""

INTERNLM2_RENAMES = [
    (r"^model\.tok_embeddings\.", "model.embed_tokens."),
    (r"^model\.layers\.(\d+)\.attention\.wo\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^model\.layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^model\.layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
    (r"^model\.layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
    (r"^model\.layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^model\.layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^model\.norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
]
"""InternLM2 causal LM -> Llama causal LM (``attention.wqkv`` is split separately)."""


HF_HUB_RENAMES = [
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
"""The file layout of the ``-hf`` repos and of transformers' ``save_pretrained`` -> module names."""


def _rename(key: str, table) -> str | None:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def convert_vision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenGVLab InternViT keys (relative to the ViT) -> InternVLVisionModel keys."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            q, k, v = value.chunk(3, dim=0)
            for name, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                out[f"encoder.layer.{m[1]}.attention.{name}.{m[2]}"] = t.clone()
            continue
        new = _rename(key, VISION_RENAMES)
        if new is None:
            raise UserError(f"vision checkpoint: no rename rule for key {key!r}")
        out[new] = value
    return out


def split_wqkv(w: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """InternLM2's fused projection, grouped per kv head as [q x (heads/kv_heads), k, v] -> q, k, v."""
    groups = num_heads // num_kv_heads
    rest = w.shape[1:]
    w = w.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = w[:, :groups].reshape(num_heads * head_dim, *rest)
    k = w[:, -2].reshape(num_kv_heads * head_dim, *rest)
    v = w[:, -1].reshape(num_kv_heads * head_dim, *rest)
    return q.clone(), k.clone(), v.clone()


def convert_internlm2(state: dict[str, torch.Tensor], text_config) -> dict[str, torch.Tensor]:
    """InternLM2 causal-LM keys -> Llama causal-LM keys (``model.*``, ``lm_head.*``)."""
    heads = text_config.num_attention_heads
    kv = text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    out = {}
    for key, value in state.items():
        m = re.match(r"^model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)$", key)
        if m:
            for name, t in zip(("q_proj", "k_proj", "v_proj"), split_wqkv(value, heads, kv, head_dim)):
                out[f"model.layers.{m[1]}.self_attn.{name}.{m[2]}"] = t
            continue
        new = _rename(key, INTERNLM2_RENAMES)
        if new is None:
            raise UserError(f"InternLM2 checkpoint: no rename rule for key {key!r}")
        out[new] = value
    return out


def convert_causal_lm(state: dict[str, torch.Tensor], text_config) -> dict[str, torch.Tensor]:
    """A causal LM's keys (HF or InternLM2) -> InternVL's ``model.language_model.*`` / ``lm_head.*``."""
    if any(k.startswith(("model.tok_embeddings.", "output.")) for k in state):
        state = convert_internlm2(state, text_config)
    out = {}
    for key, value in state.items():
        if key.startswith("model."):
            out["model.language_model." + key.removeprefix("model.")] = value
        elif key.startswith("lm_head."):
            out[key] = value
        else:
            raise UserError(f"language-model checkpoint: unexpected key {key!r}")
    return out


def layout_of(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in keys):
        return "hf_internvl"
    if any(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in keys):
        return "hf_hub_internvl"
    if any(k.startswith(("vision_model.", "mlp1.")) for k in keys):
        return "opengvlab_internvl"
    if any(k.startswith(("embeddings.", "encoder.layers.")) for k in keys):
        return "internvit"
    if any(k.startswith(("model.embed_tokens.", "model.tok_embeddings.")) for k in keys):
        return "causal_lm"
    raise UserError(f"unknown checkpoint layout (first keys: {keys[:3]})")


def to_hf_internvl(state: dict[str, torch.Tensor], text_config) -> dict[str, torch.Tensor]:
    """Any supported layout -> HF-native InternVL keys (only the parts the checkpoint holds)."""
    layout = layout_of(state)
    if layout == "hf_internvl":
        return dict(state)
    if layout == "hf_hub_internvl":
        return {_rename(k, HF_HUB_RENAMES) or k: v for k, v in state.items()}
    if layout == "internvit":
        return {"model.vision_tower." + k: v for k, v in convert_vision(state).items()}
    if layout == "causal_lm":
        return convert_causal_lm(state, text_config)
    groups: dict[str, dict] = {"vision_model.": {}, "mlp1.": {}, "language_model.": {}}
    for key, value in state.items():
        for prefix, group in groups.items():
            if key.startswith(prefix):
                group[key.removeprefix(prefix)] = value
                break
        else:
            raise UserError(f"OpenGVLab checkpoint: key {key!r} belongs to no part")
    out = {"model.vision_tower." + k: v for k, v in convert_vision(groups["vision_model."]).items()}
    for key, value in groups["mlp1."].items():
        new = _rename(key, PROJECTOR_RENAMES)
        if new is None:
            raise UserError(f"OpenGVLab checkpoint: no rename rule for key 'mlp1.{key}'")
        out["model.multi_modal_projector." + new] = value
    if groups["language_model."]:
        out.update(convert_causal_lm(groups["language_model."], text_config))
    return out


# -- loading into the model -------------------------------------------------------------------------


def resize_vocab_rows(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str,
                      keys: tuple[str, ...] = ("model.language_model.embed_tokens.weight", "lm_head.weight")) -> dict:
    """Fit the embedding and output rows (``keys``: the family's ``embedding_keys``) of a causal LM
    to the model's vocabulary.

    Rows for tokens the checkpoint lacks (the family's image tokens) start at the mean of the
    existing rows; rows beyond the model's vocabulary (a checkpoint padded to a multiple of 64 or
    128) are dropped.
    """
    own = model.state_dict()
    for key in keys:
        if key not in state or key not in own:
            continue
        have, want = state[key], own[key]
        if have.shape[1:] != want.shape[1:] or have.shape[0] == want.shape[0]:
            continue  # equal, or a real mismatch that load_strict reports
        if have.shape[0] > want.shape[0]:
            state[key] = have[: want.shape[0]].clone()
            log.info("%s: %s cut from %d to %d rows", source, key, have.shape[0], want.shape[0])
        else:
            extra = have.float().mean(0, keepdim=True).to(have.dtype).expand(want.shape[0] - have.shape[0], -1)
            state[key] = torch.cat([have, extra])
            log.info("%s: %s grown from %d to %d rows (new rows = mean row)", source, key, have.shape[0], want.shape[0])
    return state


def load_pretrained(model: torch.nn.Module, cfg) -> None:
    """Load what the ModelConfig names: a whole checkpoint (``model.path``), then the vision tower
    (``model.vision.path``: a ViT or whole VLM), the LLM (``model.llm.path``) and the projector
    (``model.projector_path``) over it. A part that no path names keeps its random init (e.g. the
    projector of a composed stage-1 model). Every layout goes through the family's rename tables
    (``Family.to_native``)."""
    from vlmtrain.models.family import family_of

    fam = family_of(model)
    text_config = model.config.text_config
    if cfg.path:
        state = fam.to_native(read_state_dict(cfg.path, "model.path", cfg.allow_pickle), text_config)
        load_strict(model, state, f"model.path={cfg.path}")
    if cfg.vision.path:
        load_strict(model, *_part_state(fam, cfg.vision.path, "model.vision.path", "vision_tower", text_config,
                                        cfg.allow_pickle))
    if cfg.llm.path:
        embed, head = fam.embedding_keys()
        state, key, part = _part_state(fam, cfg.llm.path, "model.llm.path", "language_model", text_config,
                                       cfg.allow_pickle)
        if head not in state and getattr(text_config, "tie_word_embeddings", False) is False:
            emb = state.get(embed)
            if emb is not None:  # a tied-embedding LLM (e.g. Qwen2.5-0.5B): untie by copying
                state[head] = emb.clone()
        state = resize_vocab_rows(state, model, key, (embed, head))
        load_strict(model, state, key, part)
    if cfg.projector_path:
        load_strict(model, *_part_state(fam, cfg.projector_path, "model.projector_path", "multi_modal_projector",
                                        text_config, cfg.allow_pickle))


def _part_state(fam, path: str, key: str, part: str, text_config, allow_pickle: bool) -> tuple[dict, str, list[str]]:
    """The weights of one part (``vision_tower``, ``language_model``, ``multi_modal_projector``) in the
    file ``path`` names, renamed by the family: (state, source for errors, the part's prefixes)."""
    prefixes = tuple(fam.part_prefixes()[part])
    state = fam.to_native(read_state_dict(path, key, allow_pickle), text_config)
    state = {k: v for k, v in state.items() if k.startswith(prefixes)}
    if not state:
        raise UserError(f"{key}={path}: holds no {part} weights")
    return state, f"{key}={path}", list(prefixes)


# -- configs of checkpoints -------------------------------------------------------------------------

TEMPLATE_NAMES = {"Hermes-2": "hermes2", "internvl2_5": "internvl2_5", "internlm2-chat": "internlm2-chat",
                  "phi3-chat": "phi3-chat", "llama3-chat": "llama3-chat"}
"""OpenGVLab ``template`` values -> vlmtrain's template names."""

_DROP_TEXT_KEYS = {"architectures", "transformers_version", "_name_or_path", "auto_map", "torch_dtype", "dtype",
                   "attn_implementation", "_attn_implementation_autoset", "use_flash_attn", "id2label", "label2id"}


def _internlm2_to_llama(c: dict) -> dict:
    out = {
        "model_type": "llama",
        "vocab_size": c["vocab_size"],
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c.get("num_key_value_heads", c["num_attention_heads"]),
        "max_position_embeddings": c.get("max_position_embeddings", 32768),
        "rms_norm_eps": c.get("rms_norm_eps", 1e-5),
        "rope_theta": c.get("rope_theta", 10000.0),
        "attention_bias": bool(c.get("bias", False)),
        "mlp_bias": False,
        "hidden_act": c.get("hidden_act", "silu"),
        "tie_word_embeddings": False,
    }
    scaling = c.get("rope_scaling")
    if scaling:
        out["rope_scaling"] = {"rope_type": scaling.get("type", scaling.get("rope_type")), "factor": scaling["factor"]}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if c.get(k) is not None:
            out[k] = c[k]
    return out


def llm_kwargs(c: dict) -> dict:
    """An LLM config.json (dict) -> kwargs of a transformers causal-LM config."""
    if c.get("model_type") == "internlm2":
        return _internlm2_to_llama(c)
    return {k: v for k, v in c.items() if k not in _DROP_TEXT_KEYS and v is not None}


def model_config_from_checkpoint(path: str | Path) -> dict:
    """The ModelConfig fields (as a dict) that describe a local checkpoint directory of any
    family (its config.json's ``model_type`` picks the family, ``family.MODEL_TYPES``)."""
    from vlmtrain.models.family import DEFAULT_FAMILY, MODEL_TYPES, family_for_checkpoint, family_spec

    p = Path(path).expanduser()
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise MissingPathError(f"{p}: no config.json")
    c = json.loads(cfg_file.read_text())
    model_type = c.get("model_type")
    if model_type not in MODEL_TYPES and "InternVLChatModel" in (c.get("architectures") or []):
        model_type = "internvl_chat"
    if model_type not in MODEL_TYPES:
        raise UserError(f"{cfg_file}: model_type {model_type!r} is not a checkpoint of a vlmtrain model family "
                        f"({', '.join(sorted(MODEL_TYPES))})")
    fam = family_for_checkpoint(model_type)
    fields = fam.config_from_checkpoint(c, cfg_file)
    if family_spec(fam)["_target_"] != DEFAULT_FAMILY:  # the default family needs no node
        fields.setdefault("family", family_spec(fam))
    return fields


def internvl_config_fields(c: dict, cfg_file) -> dict:
    """An InternVL config.json (HF-native or OpenGVLab) -> ModelConfig fields."""
    if c.get("model_type") == "internvl":
        v = c["vision_config"]
        vision = dict(
            hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
            image_size=_first(v.get("image_size", 448)), patch_size=_first(v.get("patch_size", 14)),
            norm_type=v.get("norm_type", "layer_norm"), use_qk_norm=v.get("use_qk_norm", False),
            attention_bias=v.get("attention_bias", True), layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            layer_scale_init_value=v.get("layer_scale_init_value", 0.1), hidden_act=v.get("hidden_act", "gelu"),
        )
        return dict(
            vision=vision, llm={"config": llm_kwargs(c["text_config"])},
            downsample_ratio=c.get("downsample_ratio", 0.5),
            projector_hidden_act=c.get("projector_hidden_act", "gelu"),
            vision_select_layer=c.get("vision_feature_layer", -1),
            image_token_id=c.get("image_token_id"),
        )
    if c.get("model_type") == "internvl_chat" or "InternVLChatModel" in (c.get("architectures") or []):
        v = c["vision_config"]
        rms = v.get("norm_type", "layer_norm") == "rms_norm"
        vision = dict(
            hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
            image_size=v.get("image_size", 448), patch_size=v.get("patch_size", 14),
            norm_type="rms_norm" if rms else "layer_norm", use_qk_norm=v.get("qk_normalization", False),
            attention_bias=v.get("qkv_bias", True), layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            layer_scale_init_value=v.get("initializer_factor", 0.1), hidden_act=v.get("hidden_act", "gelu"),
        )
        template = c.get("template")
        if c.get("ps_version", "v2") != "v2":
            raise UserError(f"{cfg_file}: ps_version {c.get('ps_version')!r} is not supported (only v2)")
        return dict(
            vision=vision, llm={"config": llm_kwargs(c["llm_config"])},
            downsample_ratio=c.get("downsample_ratio", 0.5),
            vision_select_layer=c.get("select_layer", -1),
            template=TEMPLATE_NAMES.get(template, template) if template else "internvl2_5",
        )
    raise UserError(f"{cfg_file}: model_type {c.get('model_type')!r} is not an InternVL checkpoint")


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x
