"""LoRA adapters through peft, injected in place so the model keeps its transformers structure.

``peft.inject_adapter_in_model`` swaps the targeted ``nn.Linear`` layers for LoRA layers without
wrapping the model, so the training code keeps calling ``model.model.language_model`` and
``model.lm_head`` as for full tuning. Adapters are written in peft's standard format
(``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<name>``), so
``peft.PeftModel.from_pretrained(InternVLForConditionalGeneration(...), dir)`` loads them; parts
that train fully beside the adapters (e.g. the projector) are saved as peft ``modules_to_save``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from vlmtrain.config import LoraConfig
from vlmtrain.errors import UserError
from vlmtrain.models.run_checkpoint import is_lora_key

TARGETS = {
    "llm_attention": r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|qkv_proj|o_proj)",
    "llm_mlp": r"model\.language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj|gate_up_proj)",
    "vit": r"model\.vision_tower\.encoder\.layer\.\d+\.(attention\.(q_proj|k_proj|v_proj|projection_layer)|mlp\.fc1|mlp\.fc2)",
}
"""Named groups of linear layers (full-name regexes; q/k/v/o of Llama, Qwen2 and Phi-3 layouts)."""

PART_MODULES = {
    "vision_tower": ["vision_tower"],
    "multi_modal_projector": ["multi_modal_projector"],
    "language_model": ["language_model", "lm_head"],
}
"""The module names peft's ``modules_to_save`` uses for each fully trained part."""

ADAPTER_NAME = "default"


def target_regex(cfg: LoraConfig, targets: dict[str, str] | None = None) -> str:
    """The regex of ``cfg``'s targets among ``targets`` (the model family's ``lora_targets``;
    None: InternVL's ``TARGETS``)."""
    targets = TARGETS if targets is None else targets
    if cfg.target_modules:
        return cfg.target_modules
    unknown = [t for t in cfg.targets if t not in targets]
    if unknown or not cfg.targets:
        raise UserError(f"stage.lora.targets: unknown {unknown or '[]'}; choose from {sorted(targets)}")
    return "|".join(f"(?:{targets[t]})" for t in cfg.targets)


def peft_config(cfg: LoraConfig, modules_to_save: list[str] | None = None,
                targets: dict[str, str] | None = None) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_regex(cfg, targets),
        modules_to_save=modules_to_save or None,
        bias="none",
    )


def add_lora(model: torch.nn.Module, cfg: LoraConfig, low_cpu_mem_usage: bool = False) -> list[str]:
    """Inject adapters in place; returns the names of the adapted modules. Base weights stay
    as they are (their ``requires_grad`` is the caller's business). ``low_cpu_mem_usage`` makes
    the adapters on the meta device (for a model built there)."""
    from vlmtrain.models.family import family_of

    targets = family_of(model).lora_targets
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    inject_adapter_in_model(peft_config(cfg, targets=targets), model, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=low_cpu_mem_usage)
    adapted = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not adapted:
        raise UserError(f"stage.lora: no module of the model matches {target_regex(cfg, targets)!r}")
    for n, p in model.named_parameters():  # peft froze everything else; restore the caller's choice
        key = n.replace(".base_layer.", ".")
        if not is_lora_key(n) and key in grads:
            p.requires_grad_(grads[key])
    return adapted


def has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run ``model`` as its base model: every adapter off (peft's ``enable_adapters(False)``), and
    every module in eval mode, inside the block; adapters, requires_grad flags and train/eval modes
    are put back as they were after it. A LoRA run's preference reference, without a copy."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise UserError("stage/reference=adapter needs a LoRA stage (stage.lora set), e.g. stage=mpo_lora")
    grads = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, g in grads.items():
            p.requires_grad_(g)
        for m, mode in modes.items():
            m.training = mode


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (peft's
    merge_and_unload, for a model whose adapters were injected in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


def gathered_state(model: torch.nn.Module, keep) -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` whose names ``keep`` accepts, whole and on the CPU,
    also where FSDP2 (DTensor shards) or DeepSpeed ZeRO-3 (partitioned parameters) split them.
    Under those strategies gathering is a collective, so every rank calls this. Activation
    checkpointing wrappers are left out of the names."""
    from torch.distributed.tensor import DTensor

    named = [(n.replace("_checkpoint_wrapped_module.", ""), t)
             for n, t in model.state_dict(keep_vars=True).items()]
    named = [(n, t) for n, t in named if keep(n)]
    partitioned = [t for _, t in named if hasattr(t, "ds_id")]
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    else:
        gather = nullcontext()
    with gather:
        return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone() for n, t in named}


def save_adapter(model: torch.nn.Module, out_dir: str | Path, cfg: LoraConfig, trainable_parts: list[str],
                 write: bool = True) -> Path:
    """Write the adapters (and the fully trained parts as ``modules_to_save``) in peft's format.

    Under sharded strategies every rank calls this (the tensors are gathered); only ``write`` ranks write."""
    from vlmtrain.models.family import family_of

    fam = family_of(model)
    out = Path(out_dir)
    modules_to_save = [m for part in trainable_parts for m in (fam.part_modules or PART_MODULES)[part]]
    marker = f".{ADAPTER_NAME}."

    def saved(name: str) -> bool:  # peft stores a module to save under its plain name
        return is_lora_key(name) or any(
            sep and (not head or head.endswith("."))
            for head, sep, _ in (name.partition(m + ".") for m in modules_to_save))

    tensors = {}
    for name, p in gathered_state(model, saved).items():
        key = name.replace(marker, ".") if is_lora_key(name) else name.replace(".base_layer.", ".")
        tensors["base_model.model." + key] = p.contiguous()
    if not write:
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_config(cfg, modules_to_save, fam.lora_targets).to_dict()
    config["base_model_name_or_path"] = None
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list))
    return out
