"""Model families: what one VLM architecture provides so the rest of vlmtrain trains it.

A family is a class picked by the model config file, never by a name compared in code::

    # conf/model/llava_1_5_7b.yaml
    family:
      _target_: vlmtrain.models.llava.LlavaFamily      # + the family's own settings (keyword args)

``family_of(cfg)`` instantiates ``model.family`` (unset: InternVL); ``family_of(model)`` finds
the family of a built model (it is attached at build time, else looked up by the HF config's
``model_type`` in ``MODEL_TYPES``). Adding a family is: model config files, a module with a
``Family`` subclass (the model class is transformers' native one where it exists), a rename
table in that module where the released checkpoint layout is not the native one, stage files,
and a chat template (``vlmtrain.data.templates``, data). The data side (``vlmtrain.data``) knows
families only through ``ImageLayout`` and ``PixelSpec``.

What a family provides (methods of ``Family``; ``vlmtrain.models.internvl.InternVLFamily`` is the
reference implementation):

- **Model build from config**: ``model_class`` and ``hf_config(cfg, image_token_id)`` (a
  transformers config from the ModelConfig: ``vision``, ``llm.config`` and the family's own
  settings); ``build`` (random init seeded, ``device="meta"`` for ``plan``, or allocation only when
  every weight is loaded next) and ``init_weights`` (family-specific init after the random init).
- **Image tokens / placeholders on the data side**: ``layout(cfg)`` ->
  ``vlmtrain.data.placeholders.ImageLayout`` (data, the one renderer reads it): an ``<image>``
  placeholder renders as ``start + context * (tokens_per_tile * tiles) + end`` (an ``anyres``
  layout, LLaVA-NeXT's: the token count of the image's size, which samples carry); the context
  token's id is the model's ``image_token_id``; ``special_tokens`` are added to the tokenizer;
  ``processor_placeholder`` is what the exported Jinja template writes per image (the native
  processor expands it); ``mean``/``std`` the pixel normalisation the model applies on the
  device (and LLaVA's padding colour). How an image becomes tiles (InternVL's dynamic tiling,
  LLaVA's pad-to-square, ...) is ``data.image_mode`` (``vlmtrain.data.images``), set by the
  family's stage files; where a placeholder goes when the data has none is
  ``vlmtrain.data.placeholders.place_media`` (``<image>\\n`` before the first query, as LLaVA
  and InternVL do; a template's ``image_sep`` replaces that newline).
- **Template names**: the model config's ``template`` (a ``vlmtrain.data.templates`` entry) and
  each stage's (stage files may set ``data.template``).
- **Parts and freeze groups**: every parameter belongs to one of ``config.PARTS``
  (``part_of``): vision_tower / multi_modal_projector / language_model, whatever the native
  module names; ``stage.trainable`` freezes by part. ``part_prefixes`` lists the state-dict
  prefixes of each part (loading one part from its own checkpoint), ``towers`` and
  ``transformer_blocks`` the modules activation checkpointing, compilation and FSDP wrap,
  ``lora_targets`` the linear layers ``stage.lora.targets`` names, ``add_drop_path`` the ViT's
  stochastic depth.
- **Forward for training**: ``encode_images`` (tiles -> projected features, no autograd graph
  for a frozen ViT), ``image_features`` (those features in text order: every tile's rows, or a
  family's packing by image size, LLaVA-NeXT's), ``multimodal_embeddings`` (the generic scatter
  into the context tokens; ``tile_index`` lets a preference pair's answers share their prompt's
  tiles; ``dummy_features`` is a text-only batch's zero-weight vision graph), ``decoder`` (the
  LLM without head: packed attention goes through it, ``inputs_embeds`` + ``position_ids`` +
  the packed kwargs) and ``lm_head`` (the loss never materialises full logits). The objectives
  (``vlmtrain.training.objective`` / ``preference``) call only these.
- **Checkpoint layout / rename table**: ``to_native(state, text_config)`` renames any layout the
  family reads (the original project's: LLaVA's ``model.mm_projector.*``, MiniGPT-4's
  ``llama_proj.*``, InternVL's OpenGVLab layout) to the native module names; ``from_native``
  is the inverse for the original layout (tests hold them to each other);
  ``config_from_checkpoint(config_json)`` reads a checkpoint's config.json into ModelConfig
  fields; ``config_model_types`` names the config.json ``model_type`` values it reads.
- **Export / reload**: export is the native class's ``save_pretrained`` plus
  ``processor_files(model_cfg, max_tiles)`` (the native processor's configs) and
  ``processor_tokens`` (tokenizer attributes the processor reads); reload is the same build +
  strict load (``vlmtrain.models.checkpoint``), so transformers' native class loads an export.
- **Chat / eval hooks**: generation is the native class's ``generate`` with the inputs the
  inference engine builds from ``layout`` and ``pixels``; ``generate_kwargs(pixel_values, ...)``
  adds what a family's generate needs beyond ``input_ids``/``attention_mask``/``pixel_values``.
- **FLOPs**: ``flops_dims(config)`` -> ``vlmtrain.training.flops.InternVLDims`` for the logged MFU.

Stage files of a family are ``# @package _global_`` when they pin data keys (template, image
mode) beside the stage; ``stage.trainable`` names parts, never module names.
"""

from __future__ import annotations

import importlib
import re
from contextlib import nullcontext

import torch
from torch import nn

from vlmtrain.config import PARTS
from vlmtrain.data.placeholders import ImageLayout
from vlmtrain.errors import UserError


class Family:
    """The interface (see the module docstring). Subclasses are instantiated by Hydra from
    ``model.family``; their keyword arguments are the family's own settings."""

    model_class: type = None  # type: ignore[assignment]
    config_model_types: tuple[str, ...] = ()
    processor_tokens: dict[str, str] = {}
    lora_targets: dict[str, str] = {}
    parts: tuple[str, ...] = PARTS
    """The freeze groups ``stage.trainable`` names (``part_of``'s values): ``config.PARTS``, and a
    family may add its own (CogVLM's ``visual_expert``, inside the LLM's layers)."""
    part_modules: dict[str, list[str]] = {}
    """Module names of each part as peft's ``modules_to_save`` takes them."""

    # -- build -------------------------------------------------------------------------------------
    def layout(self, cfg) -> ImageLayout:
        raise NotImplementedError

    def hf_config(self, cfg, image_token_id: int):
        raise NotImplementedError

    def init_weights(self, model, cfg) -> None:
        """After the seeded random init (not for meta or loaded builds)."""

    def build(self, cfg, image_token_id: int | None = None, seed: int = 0, device=None, init_weights: bool = True):
        """Random-init model, deterministic in ``seed``; ``device="meta"``: no memory, no init;
        ``init_weights=False``: allocated, uninitialised (every weight is loaded next)."""
        if image_token_id is None:
            if cfg.image_token_id is None:
                raise UserError("model.image_token_id is not set and no tokenizer was given")
            image_token_id = cfg.image_token_id
        config = self.hf_config(cfg, image_token_id)
        if device is not None and torch.device(device).type == "meta":
            with torch.device("meta"):
                return self.attach(self.model_class(config))
        if not init_weights:
            from transformers.initialization import no_init_weights

            with no_init_weights():
                model = self.model_class(config)
            return self.attach(model if device is None else model.to(device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_class(config)
            self.init_weights(model, cfg)  # under the same seed: its draws (MiniGPT-4's queries) too
        return self.attach(model if device is None else model.to(device))

    def attach(self, model):
        model.__dict__["vlm_family"] = self  # a plain attribute: not a submodule, not saved
        return model

    # -- parts -------------------------------------------------------------------------------------
    def part_of(self, param_name: str) -> str:
        """Which of ``config.PARTS`` a parameter (native name) belongs to."""
        for part, prefixes in self.part_prefixes().items():
            if param_name.startswith(tuple(prefixes)):
                return part
        raise KeyError(f"parameter {param_name!r} belongs to no known part")

    def part_prefixes(self) -> dict[str, list[str]]:
        """State-dict prefixes of each part (of the native module names)."""
        raise NotImplementedError

    def embedding_keys(self) -> tuple[str, str]:
        """(input embedding, output head) weight names of the language model."""
        raise NotImplementedError

    def towers(self, model) -> dict[str, nn.Module]:
        """The PreTrainedModels whose gradient checkpointing can be switched on, by part."""
        raise NotImplementedError

    def transformer_blocks(self, model) -> dict[str, nn.ModuleList]:
        raise NotImplementedError

    def add_drop_path(self, model, rate: float) -> list:
        if rate > 0:
            raise UserError(f"stage.drop_path={rate}: this model family has no drop path")
        return []

    # -- forward -----------------------------------------------------------------------------------
    def encode_images(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles (N, 3, S, S), uint8 or normalised float -> LLM embeddings (N, tokens_per_tile, D)."""
        raise NotImplementedError

    def decoder(self, model) -> nn.Module:
        """The language model without its head (takes inputs_embeds, returns last_hidden_state)."""
        raise NotImplementedError

    def lm_head(self, model) -> nn.Module:
        raise NotImplementedError

    def image_token_id(self, model) -> int:
        return model.config.image_token_id

    def image_features(self, model, pixel_values: torch.Tensor, tile_index: torch.Tensor | None = None,
                       image_sizes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """The features that replace the context tokens, (M, D) in text order: each tile's
        ``encode_images`` rows (``tile_index``: which tile each image tile of the text shows).
        ``image_sizes``: anyres images' original sizes (a family with an anyres layout packs by them)."""
        if image_sizes is not None:
            raise ValueError("image sizes are given, and this model family has no anyres layout")
        feats = self.encode_images(model, pixel_values)
        if tile_index is not None:
            feats = feats[tile_index]
        return feats.reshape(-1, feats.shape[-1])

    def dummy_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """A zero-weight scalar over the tiles' features and every vision-side parameter the
        real path uses: what a text-only batch adds, so every rank's graph holds the same parameters."""
        return 0.0 * self.encode_images(model, pixel_values).sum()

    def multimodal_embeddings(self, model, input_ids, pixel_values, dummy_vision: bool = False,
                              tile_index: torch.Tensor | None = None,
                              image_sizes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Token embeddings with the context-token positions replaced, in order, by the projected
        image features (``image_features``). ``dummy_vision``: tiles of no text position (a
        text-only batch) enter the graph with weight zero, so sharded strategies see every rank
        run the vision tower. ``tile_index``: which tile each image of the text shows, in text
        order (None: every tile once, in order): a preference pair's answers share their prompt's
        tiles. ``image_sizes``: anyres images' original (height, width), in text order."""
        embeds = model.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        if dummy_vision:
            return embeds + self.dummy_features(model, pixel_values).to(embeds.dtype)
        feats = self.image_features(model, pixel_values, tile_index, image_sizes).to(embeds.dtype)
        mask = input_ids == self.image_token_id(model)
        message = (f"image context tokens != {feats.shape[0]} image features: the data side and the model "
                   "disagree on an image's token count")
        if mask.is_cuda:
            # checked on the device: a host sync would stall the CPU until the ViT has run
            torch._assert_async(mask.sum() == feats.shape[0], message)
        elif int(mask.sum()) != feats.shape[0]:
            raise ValueError(f"{int(mask.sum())} {message}")
        return embeds.masked_scatter(mask.unsqueeze(-1), feats)

    def generate_kwargs(self, pixel_values: torch.Tensor | None,
                        image_sizes: list[tuple[int, int]] | None = None) -> dict:
        return {}

    # -- checkpoints -------------------------------------------------------------------------------
    def to_native(self, state: dict, text_config) -> dict:
        """Any layout this family reads -> native module names (the rename tables)."""
        return state

    def from_native(self, state: dict) -> dict:
        """Native names -> the original project's layout (the inverse of ``to_native``)."""
        return state

    def config_from_checkpoint(self, c: dict, cfg_file) -> dict:
        """A checkpoint's config.json (dict) -> ModelConfig fields."""
        raise UserError(f"{cfg_file}: this model family does not read checkpoint configs")

    # -- export ------------------------------------------------------------------------------------
    def processor_files(self, model_cfg, max_tiles: int) -> dict[str, dict]:
        return {}

    def flops_dims(self, config):
        """``vlmtrain.training.flops.InternVLDims`` of a built model's config (MFU, rank balance)."""
        raise NotImplementedError


def rename_state(state: dict, table, what: str) -> dict:
    """``state`` with every key renamed by the first matching ``(pattern, replacement)`` of
    ``table``; a key no rule matches is an error naming ``what`` (a rename table is complete)."""
    out = {}
    for key, value in state.items():
        for pattern, repl in table:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise UserError(f"{what}: no rename rule for key {key!r}")
    return out


def plain_dict(node) -> dict:
    """A config node (DictConfig or mapping, None as empty) as a plain dict, interpolations resolved."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})  # type: ignore[return-value]  # stubs narrower than the code's use


def full_parameter(param: torch.Tensor) -> torch.Tensor:
    """A parameter used outside its module's forward, whole. FSDP2 gathers a unit's parameters
    in its forward and averages their gradients over the ranks after its backward; the objectives
    call a model's parts directly, so parameters held by a module whose forward never runs
    (MiniGPT-4's query tokens, LLaVA-NeXT's image_newline) stay sharded DTensors and FSDP2 never
    reduces their gradients. Here the gather is differentiable and its backward does FSDP2's part:
    each rank's gradient is a partial sum, reduce-scattered onto the shards and divided by the
    rank count (FSDP2's average), so the parameter trains as in one process."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if not isinstance(param, DTensor):
        return param
    mesh = param.device_mesh
    whole = param.redistribute(mesh, [Replicate()] * mesh.ndim).to_local(grad_placements=[Partial()] * mesh.ndim)
    if whole.requires_grad:
        ranks = mesh.size()
        whole.register_hook(lambda grad: grad / ranks)
    return whole


def vision_no_grad(tower: nn.Module):
    """no_grad unless some parameter of ``tower`` trains (a frozen ViT keeps no activations)."""
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
    return nullcontext() if grad else torch.no_grad()


def drop_path_hooks(layers, attention: str, mlp: str, rate: float) -> list:
    """Stochastic depth on both residual branches of every layer, rising linearly to ``rate``:
    a forward hook scales the branch output (``layer.<attention>`` returns a tuple, ``layer.<mlp>``
    a tensor) by mask / keep_prob per sample, which equals timm's DropPath on a residual branch.
    Returns the hook handles (remove them to turn drop path off)."""
    handles = []
    if rate <= 0:
        return handles
    n = len(layers)
    for i, layer in enumerate(layers):
        p = rate * i / max(1, n - 1)
        if p <= 0:
            continue
        handles.append(getattr(layer, attention).register_forward_hook(_drop_path_hook(p, tuple_output=True)))
        handles.append(getattr(layer, mlp).register_forward_hook(_drop_path_hook(p, tuple_output=False)))
    return handles


def _drop_path_hook(p: float, tuple_output: bool):
    keep = 1.0 - p

    def hook(module, args, output):
        if not module.training:
            return output
        x = output[0] if tuple_output else output
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep) / keep
        return (x * mask, *output[1:]) if tuple_output else x * mask

    return hook


DEFAULT_FAMILY = "vlmtrain.models.internvl.InternVLFamily"

MODEL_TYPES = {
    "internvl": DEFAULT_FAMILY,
    "internvl_chat": DEFAULT_FAMILY,
    "llava": "vlmtrain.models.llava.LlavaFamily",
    "llava_llama": "vlmtrain.models.llava.LlavaFamily",
    "llava_next": "vlmtrain.models.llava.LlavaNextFamily",
    "blip-2": "vlmtrain.models.minigpt4.MiniGPT4Family",
    "cogvlm": "vlmtrain.models.cogvlm.CogVLMFamily",
}
"""HF config ``model_type`` -> family class, for models and checkpoints that come without a
vlmtrain ModelConfig (a plain HF directory, a model built elsewhere). Families register here."""


def _import(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def family_of(obj) -> Family:
    """The family of a ModelConfig (its ``family`` node, instantiated) or of a built model."""
    if isinstance(obj, nn.Module):
        fam = obj.__dict__.get("vlm_family")
        if fam is None and hasattr(obj, "base_model") and obj.base_model is not obj:  # peft wrapper
            fam = obj.base_model.__dict__.get("vlm_family") or getattr(obj.base_model, "model", obj).__dict__.get("vlm_family")
        if fam is not None:
            return fam
        model_type = getattr(getattr(obj, "config", None), "model_type", None)
        if model_type not in MODEL_TYPES:
            raise UserError(f"no vlmtrain model family for model_type {model_type!r}")
        return _import(MODEL_TYPES[model_type])()
    spec = obj.get("family") if hasattr(obj, "get") else getattr(obj, "family", None)
    if not spec:
        return _import(DEFAULT_FAMILY)()
    from hydra.utils import instantiate

    if "_target_" not in spec:
        raise UserError(f"model.family needs a _target_ (got keys {sorted(spec)})")
    fam = instantiate(spec, _convert_="all")
    if not isinstance(fam, Family):
        raise UserError(f"model.family._target_={spec['_target_']} is not a vlmtrain Family")
    return fam


def family_for_checkpoint(model_type: str | None) -> Family:
    if model_type not in MODEL_TYPES:
        raise UserError(f"model_type {model_type!r} is no vlmtrain model family; known: {sorted(MODEL_TYPES)}")
    return _import(MODEL_TYPES[model_type])()


def family_spec(fam: Family) -> dict:
    """The ``model.family`` node that rebuilds ``fam`` (its class; settings are the caller's)."""
    cls = type(fam)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}"}


def image_layout(model_cfg) -> ImageLayout:
    """The data side's ImageLayout of a ModelConfig (its family's ``layout``)."""
    return family_of(model_cfg).layout(model_cfg)


__all__ = ["PARTS", "Family", "ImageLayout", "family_of", "family_for_checkpoint", "image_layout", "vision_no_grad"]
