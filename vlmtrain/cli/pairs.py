"""`vlmtrain pairs ckpt=<run dir> out=DIR [data=...]`: preference pairs sampled from a trained
checkpoint against the data's ground truth, and DropoutNTP, with reference log-probs beside them
(``vlmtrain.inference.pairs``).

    vlmtrain pairs ckpt=runs/sft out=pairs/                      # the demo questions (data=demo)
    vlmtrain pairs ckpt=runs/sft out=pairs_val/ data=demo_val    # the held-out split
    vlmtrain pairs ckpt=runs/sft data=single data.path=prefs.jsonl pairs.mode=reference
    vlmtrain stage=mpo init_from=runs/sft data=single data.path=pairs/shapes.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from vlmtrain.cli import Command, start
from vlmtrain.config import DataConfig
from vlmtrain.inference.pairs import PairOptions, build_pairs


@dataclass
class PairsConfig:
    ckpt: str = MISSING
    """A run directory, a .ckpt, or an exported / HF-native InternVL directory (the SFT model)."""
    out: str | None = None
    """Where ``<dataset>.jsonl`` (+ ``.ref.jsonl``) and ``pairs.json`` go (build mode)."""
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    pairs: PairOptions = field(default_factory=PairOptions)
    model: Any = None
    """Filled from the checkpoint (data configs interpolate ``${model.template}`` etc.)."""
    stage: Any = None
    """Absorbs the stage keys a training data config may set; unused here."""


COMMAND = Command("pairs", build_pairs, config_name="pairs", schema=PairsConfig, schema_name="vlmtrain_pairs_schema")


def main() -> None:
    start(COMMAND)
