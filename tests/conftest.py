"""Shared fixtures: compose the real config tree and shrink it for CPU tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from vlmtrain.cli import CONFIG_DIR, register

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Demo data and caches go to a temp dir, never the user's home."""
    os.environ.setdefault("VLMTRAIN_CACHE", str(tmp_path_factory.mktemp("vlmtrain_cache")))
    os.environ.setdefault("WANDB_MODE", "offline")
    register()


def compose_config(overrides=(), run_dir: Path | None = None, config_name: str = "config"):
    """The real config, composed as `python -m vlmtrain` would, with run_dir set."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return cfg
