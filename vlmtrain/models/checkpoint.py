"""A trained model back from wherever it lives: a vlmtrain run directory, one of its ``.ckpt``
files, an exported / HF-native InternVL directory or an OpenGVLab-layout directory.

What eval, chat and export load. LoRA runs come back with their adapters merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from vlmtrain.config import PARTS, LoraConfig, ModelConfig

MODEL_CONFIG_FILE = "vlmtrain_model.yaml"
"""Written beside an exported model: the ModelConfig it was built from (template included)."""


@dataclass
class TrainedModel:
    model: torch.nn.Module
    tokenizer: object
    model_cfg: DictConfig
    """A ModelConfig (structured DictConfig)."""
    source: Path
    """The run directory or checkpoint directory it came from."""
    trainable_parts: list[str]
    """Parts that trained fully in the run (all three for a checkpoint directory)."""
    lora: LoraConfig | None = None
    """The run's adapters config (already merged into the weights)."""


@dataclass
class RunCheckpoint:
    run_dir: Path
    ckpt: Path


def find_run_checkpoint(path: str | Path) -> RunCheckpoint | None:
    """A run directory (its checkpoints/last.ckpt) or a .ckpt inside one; None for anything else."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".ckpt":
        for run_dir in (p.parent.parent, p.parent):
            if (run_dir / "config.yaml").is_file():
                return RunCheckpoint(run_dir, p)
        raise FileNotFoundError(f"{p}: no config.yaml in its run directory ({p.parent.parent})")
    if p.is_dir() and (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        ckpt = p / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{p}: run directory without checkpoints/last.ckpt")
        return RunCheckpoint(p, ckpt)
    return None


def structured_model_config(node) -> DictConfig:
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), node)


def run_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The HF-model weights of a Lightning checkpoint (keys without the module's ``model.``)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def load_trained(path: str | Path, dtype: torch.dtype | None = None) -> TrainedModel:
    from vlmtrain.models.build import build_model, load_tokenizer
    from vlmtrain.models.internvl import build_from_config
    from vlmtrain.models.loading import check_and_load, model_config_from_checkpoint
    from vlmtrain.models.lora import add_lora, merge_lora

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"ckpt: nothing at {p}")
    run = find_run_checkpoint(p)
    if run is not None:
        saved = OmegaConf.load(run.run_dir / "config.yaml")
        model_cfg = structured_model_config(saved.model)
        tok_dir = run.run_dir / "tokenizer"
        if tok_dir.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        else:
            tokenizer = load_tokenizer(model_cfg)
        model = build_from_config(model_cfg, tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), init_weights=False)
        stage = saved.get("stage") or {}
        lora = None
        if stage.get("lora"):
            lora = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoraConfig), stage.lora))
            add_lora(model, lora)
        check_and_load(model, run_state_dict(run.ckpt), str(run.ckpt))
        if lora is not None:
            merge_lora(model)
        trainable = list(stage.get("trainable") or [])
        source = run.run_dir
    else:
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"ckpt: {p} is neither a run directory, a .ckpt nor a checkpoint directory")
        side = p / MODEL_CONFIG_FILE
        fields = OmegaConf.load(side) if side.is_file() else {"name": p.name, **model_config_from_checkpoint(p)}
        model_cfg = structured_model_config(fields)
        model_cfg.path, model_cfg.vision.path, model_cfg.llm.path = str(p), None, None
        model_cfg.tokenizer = None
        tokenizer = load_tokenizer(model_cfg)
        model = build_model(model_cfg, tokenizer)
        trainable, lora, source = list(PARTS), None, p
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return TrainedModel(model, tokenizer, model_cfg, source, trainable, lora)
