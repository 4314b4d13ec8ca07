"""`vlmtrain train [group=option ...]` (or `python -m vlmtrain [train] ...`): compose the config and train.

    python -m vlmtrain stage=mlp_warmup                      # tiny model, demo data, CPU
    python -m vlmtrain stage=instruction_tuning init_from=outputs/<date>/<time>
    python -m vlmtrain --cfg job                            # print the composed config

A visible GPU makes ``hardware=gpu`` the default when the command names no hardware.
"""

from __future__ import annotations

from vlmtrain.cli import Command, start
from vlmtrain.training.run import train

COMMAND = Command("train", train, gpu_default=True, prog="vlmtrain")


def main() -> None:
    start(COMMAND)
