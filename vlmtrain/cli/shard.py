"""`vlmtrain shard [data=...] out=<dir>`: write a data config's datasets as webdataset tar shards
(``vlmtrain.data.shard``).

    vlmtrain shard data=single data.path=train.jsonl out=shards/
    vlmtrain shard data=single data.path=meta.json out=shards/ shard.max_size=500000000
    python -m vlmtrain hydra.searchpath=[file://$PWD/shards] data=shards      # train on them

It composes the training config tree, so ``data=...`` means exactly what it means for training.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from vlmtrain.cli import Command, start
from vlmtrain.config import TrainConfig
from vlmtrain.data.shard import ShardOptions, write_shards


@dataclass
class ShardAppConfig(TrainConfig):
    out: str = MISSING
    """Folder the shards (and data/shards.yaml) are written to."""
    shard: ShardOptions = field(default_factory=ShardOptions)


def write(cfg) -> None:
    write_shards(cfg.data, cfg.out, cfg.shard.max_size, cfg.shard.max_count,
                 log=lambda m: sys.stdout.write(m + "\n"))
    sys.stdout.write(f"data config: {Path(cfg.out).expanduser() / 'data' / 'shards.yaml'}\n")


COMMAND = Command("shard", write, schema=ShardAppConfig, quiet=True)


def main() -> None:
    start(COMMAND)
