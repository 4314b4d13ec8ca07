"""What the data tools (``vlmtrain.preview``, ``vlmtrain.stats``, ``vlmtrain.shard``) share: they
compose the training config tree (so ``data=...`` means exactly what it means for training), with
the tool's own keys added by a schema that extends the training one."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from vlmtrain.conf import CONFIG_DIR, register
from vlmtrain.config import schema_node

QUIET_HYDRA = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled",
               "hydra/hydra_logging=disabled"]
"""The tools only read data: no output folder, no log files."""


def use_schema(schema) -> None:
    """Register ``schema`` (a subclass of TrainConfig) as the root schema for this process."""
    register()
    ConfigStore.instance().store(name="vlmtrain_schema", node=schema_node(schema))


def run_data_tool(schema, fn, config_name: str = "config") -> None:
    """Compose ``config_name``.yaml (the training root, or a tool's root that includes it) on
    ``schema`` and call ``fn(cfg)``; bad input exits 2 with one line."""
    use_schema(schema)
    for o in QUIET_HYDRA:
        key = o.split("=")[0]
        if not any(a.startswith(key + "=") for a in sys.argv[1:]):
            sys.argv.append(o)

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        try:
            fn(cfg)
        except (FileNotFoundError, ValueError, IndexError) as e:
            if os.environ.get("VLMTRAIN_DEBUG"):
                raise
            print(f"{schema.__module__.split('.')[-1]}: error: {e}", file=sys.stderr)
            sys.exit(2)

    _main()


def build_mixture(cfg: DictConfig, training: bool = True):
    """(MixtureDataset, tokenizer) for a composed config, as training builds them."""
    from vlmtrain.data.mixture import MixtureDataset
    from vlmtrain.models.build import load_tokenizer
    from vlmtrain.models.internvl import tokens_per_tile

    tokenizer = load_tokenizer(cfg.model)
    v = cfg.model.vision
    n = tokens_per_tile(v.image_size, v.patch_size, cfg.model.downsample_ratio)
    return MixtureDataset(cfg.data, tokenizer, n, cfg.seed, training=training), tokenizer
