"""A trained model back from wherever it lives: a vlmtrain run directory, one of its ``.ckpt``
files, an exported / HF-native InternVL directory or an OpenGVLab-layout directory.

What eval, chat and export load. LoRA runs come back with their adapters merged (finding and
reading a run's checkpoint is ``vlmtrain.models.run_checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from vlmtrain.config import LoraConfig, ModelConfig
from vlmtrain.errors import MissingPathError
from vlmtrain.models.build import build_model, load_tokenizer
from vlmtrain.models.family import family_of
from vlmtrain.models.internvl import build_from_config
from vlmtrain.models.loading import model_config_from_checkpoint
from vlmtrain.models.run_checkpoint import find_run, load_strict, lora_config_of, read_run_config, read_weights

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


def structured_model_config(node) -> DictConfig:
    return cast(DictConfig, OmegaConf.merge(OmegaConf.structured(ModelConfig), node))


def load_trained(path: str | Path, dtype: torch.dtype | None = None) -> TrainedModel:
    """The model at ``path`` (the ``ckpt`` setting), built from its own config and strictly loaded."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingPathError(f"ckpt: nothing at {p}")
    run = find_run(p, "ckpt")
    if run is not None:
        saved = read_run_config(run.run_dir)
        model_cfg = structured_model_config(saved.model)
        tok_dir = run.run_dir / "tokenizer"
        if tok_dir.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        else:
            tokenizer = load_tokenizer(model_cfg)
        context = family_of(model_cfg).layout(model_cfg).context
        model = build_from_config(model_cfg, tokenizer.convert_tokens_to_ids(context), init_weights=False)
        load_strict(model, read_weights(run.ckpt, "ckpt"), str(run.ckpt))  # LoRA adapters come merged
        trainable = list((saved.get("stage") or {}).get("trainable") or [])
        lora, source = lora_config_of(saved), run.run_dir
    else:
        if not (p / "config.json").is_file():
            raise MissingPathError(f"ckpt: {p} is neither a run directory, a checkpoint nor an HF / OpenGVLab checkpoint "
                            "directory (no config.json)")
        side = p / MODEL_CONFIG_FILE
        fields = OmegaConf.load(side) if side.is_file() else {"name": p.name, **model_config_from_checkpoint(p)}
        model_cfg = structured_model_config(fields)
        model_cfg.path, model_cfg.vision.path, model_cfg.llm.path, model_cfg.projector_path = str(p), None, None, None
        model_cfg.tokenizer = None
        tokenizer = load_tokenizer(model_cfg)
        model = build_model(model_cfg, tokenizer)
        trainable, lora, source = list(family_of(model).parts), None, p
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return TrainedModel(model, tokenizer, model_cfg, source, trainable, lora)
