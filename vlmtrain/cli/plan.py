"""`vlmtrain plan model=<...> stage=<...> hardware=<...>`: parameters and memory per GPU before you
submit, computed on a meta-device model (``vlmtrain.training.plan``).

    vlmtrain plan model=internvl2_5_8b stage=instruction_tuning hardware=gpu \\
        hardware.devices=8 hardware.strategy=deepspeed_stage_1 plan.gpu_memory_gb=80
    vlmtrain plan model=internvl2_5_2b stage=lora
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmtrain.cli import Command, start
from vlmtrain.config import HardwareConfig, ModelConfig, StageConfig, typed
from vlmtrain.training.plan import PlanOptions, plan, report


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    plan: PlanOptions = field(default_factory=PlanOptions)
    data: Any = None
    """Data keys a stage file sets (``# @package _global_`` stages such as llava_pretrain pin their
    template and image mode); plan does not read them."""
    optim: Any = None
    """The training's optim group: the strategy (built to ask what it shards) may read it
    (DeepSpeed's ``gradient_clipping: ${optim.grad_clip}``)."""


def print_plan(cfg) -> None:
    typed_cfg = typed(cfg, PlanConfig)  # once: resolved, choices as Enums, ranges checked
    print(report(typed_cfg, plan(typed_cfg)))


COMMAND = Command("plan", print_plan, config_name="plan", schema=PlanConfig, schema_name="vlmtrain_plan_schema")


def main() -> None:
    start(COMMAND)
