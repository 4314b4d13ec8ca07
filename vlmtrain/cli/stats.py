"""`vlmtrain stats [data=...]`: what a data config holds, per dataset, before spending GPU hours on
it (``vlmtrain.data.stats``).

    vlmtrain stats data=single data.path=train.jsonl
    vlmtrain stats data=single data.path=meta.json stats.plot=stats.png

It composes the training config tree, so ``data=...`` means exactly what it means for training.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from vlmtrain.cli import Command, start
from vlmtrain.config import TrainConfig
from vlmtrain.data.mixture import build_mixture
from vlmtrain.data.stats import StatsOptions, collect, plot, report


@dataclass
class StatsAppConfig(TrainConfig):
    stats: StatsOptions = field(default_factory=StatsOptions)


def print_stats(cfg) -> None:
    dataset, _ = build_mixture(cfg)
    stats = collect(dataset, cfg.stats.max_lines)
    sys.stdout.write(report(stats) + "\n")
    if cfg.stats.plot:
        plot(stats, cfg.stats.plot)
        sys.stdout.write(f"figure: {cfg.stats.plot}\n")


COMMAND = Command("stats", print_stats, schema=StatsAppConfig, quiet=True)


def main() -> None:
    start(COMMAND)
