"""`vlmtrain export ckpt=<run dir | .ckpt> out=<dir> [dtype=bfloat16]`: an HF-native InternVL
directory, what serving engines and ``transformers.AutoModelForImageTextToText`` load
(``vlmtrain.models.export``).

    vlmtrain export ckpt=outputs/2026-11-21/12-00-00 out=exported/shapes-8b
    vlmtrain export ckpt=runs/lora/checkpoints/last.ckpt out=exported/lora dtype=bfloat16
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from vlmtrain.cli import Command, start
from vlmtrain.config import DType
from vlmtrain.models.export import export


@dataclass
class ExportConfig:
    ckpt: str = MISSING
    """A run directory or a .ckpt inside one (or an HF / OpenGVLab directory, to re-export it)."""
    out: str = MISSING
    dtype: DType | None = None
    """Cast the weights (bfloat16, float16, float32); None keeps the trained dtype."""
    max_tiles: int = 12
    """The image processor's tile budget (max_patches)."""


COMMAND = Command("export", export, config_name="export", schema=ExportConfig, schema_name="vlmtrain_export_schema")


def main() -> None:
    start(COMMAND)
