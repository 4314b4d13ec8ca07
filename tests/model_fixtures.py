"""Tiny trained-looking artefacts for the model-side tests: a run directory as `python -m vlmtrain`
writes it (config.yaml, checkpoints/last.ckpt, tokenizer/), without running a training."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from conftest import compose_config
from vlmtrain.models.build import apply_stage, build_model, load_tokenizer


def make_run_dir(run_dir: Path, overrides=(), seed: int = 0, noise: float = 0.02):
    """A run directory holding the tiny model with perturbed weights (so answers differ)."""
    cfg = compose_config(list(overrides), run_dir=run_dir)
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, seed)
    apply_stage(model, cfg.stage)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}},
               run_dir / "checkpoints" / "last.ckpt")
    tok.save_pretrained(run_dir / "tokenizer")
    return cfg, model, tok
