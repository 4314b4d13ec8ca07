"""`vlmtrain preview [data=...] index=N`: one sample as the model will see it (``vlmtrain.data.preview``).

    vlmtrain preview data=single data.path=train.jsonl index=3
    vlmtrain preview data=demo index=0 preview.format=json      # one JSON object

It composes the training config tree, so ``data=...`` means exactly what it means for training.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from vlmtrain.cli import Command, start
from vlmtrain.config import TrainConfig
from vlmtrain.data.preview import PreviewOptions, preview


@dataclass
class PreviewAppConfig(TrainConfig):
    index: int = 0
    """Sample index in the mixture (after repeat factors), 0-based."""
    preview: PreviewOptions = field(default_factory=PreviewOptions)


def print_preview(cfg) -> None:
    sys.stdout.write(preview(cfg) + "\n")


COMMAND = Command("preview", print_preview, schema=PreviewAppConfig, quiet=True)


def main() -> None:
    start(COMMAND)
