"""`vlmtrain eval ckpt=<run dir | .ckpt | HF dir> [data=<config>]`: answer a held-out set in batches
and score it (``vlmtrain.inference.evaluation``).

    vlmtrain eval ckpt=outputs/2026-11-21/12-00-00                 # demo held-out split
    vlmtrain eval ckpt=runs/s2/checkpoints/last.ckpt data=demo_val eval.batch_size=16
    vlmtrain eval ckpt=runs/lp data=demo_val eval.group_by=question_types
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from vlmtrain.cli import Command, start
from vlmtrain.config import DataConfig, DType
from vlmtrain.inference.engine import GenerationConfig
from vlmtrain.inference.evaluation import EvalOptions, evaluate


@dataclass
class EvalConfig:
    ckpt: str = MISSING
    """A run directory, a .ckpt, or an exported / HF-native InternVL directory."""
    out: str | None = None
    """Where predictions.jsonl and metrics.json go (default: <ckpt dir>/eval)."""
    device: str = "auto"
    """auto (cuda when visible), cpu, cuda, cuda:1, ..."""
    dtype: DType | None = None
    """float32 / bfloat16 / float16; None keeps the checkpoint's."""
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalOptions = field(default_factory=EvalOptions)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64))
    model: Any = None
    """Filled from the checkpoint (data configs interpolate ``${model.template}`` etc.)."""
    stage: Any = None
    """Absorbs the stage keys a training data config may set; unused here."""


COMMAND = Command("eval", evaluate, config_name="eval", schema=EvalConfig, schema_name="vlmtrain_eval_schema")


def main() -> None:
    start(COMMAND)
