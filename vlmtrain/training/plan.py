"""Parameters and memory per GPU before you submit, computed on a meta-device model (a 78B config
takes about a second, no memory): what `vlmtrain plan` prints (``vlmtrain.cli.plan``;
``python -m vlmtrain.plan`` is the same).

    vlmtrain plan model=internvl2_5_8b stage=instruction_tuning hardware=gpu \\
        hardware.devices=8 hardware.strategy=deepspeed_stage_1 plan.gpu_memory_gb=80
    vlmtrain plan model=internvl2_5_78b stage=instruction_tuning hardware=gpu \\
        hardware.devices=8 hardware.num_nodes=4 hardware.strategy=deepspeed_stage_3
    vlmtrain plan model=internvl2_5_2b stage=lora

Prints parameters per part (total / trainable) and, per GPU, the memory of weights, gradients and
optimizer state under the configured strategy, then the same total under every ZeRO stage, so
you see whether a run fits with ZeRO-1 or needs ZeRO-3. Activations, the CUDA context and
allocator fragmentation are not counted: keep headroom (``plan.headroom_gb``).

Byte counts per parameter (``BYTES``): DeepSpeed keeps bf16 weights and gradients plus an fp32
master copy and Adam's two moments (2 + 2 + 12); Lightning's ``*-mixed`` precision elsewhere keeps
fp32 weights and gradients (4 + 4 + 8); ``bf16-true`` keeps everything in bf16 (2 + 2 + 4).
Frozen parameters cost their weight bytes only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vlmtrain.config import plain
from vlmtrain.errors import UserError
from vlmtrain.models.build import apply_stage
from vlmtrain.models.family import family_of
from vlmtrain.models.internvl import build_from_config
from vlmtrain.training.strategies import Sharding, deepspeed_sharding, sharding

GiB = 1024**3


@dataclass
class PlanOptions:
    gpu_memory_gb: float = 80.0
    """Memory of one GPU (GiB), to say whether the run fits."""
    headroom_gb: float = 10.0
    """Kept free for activations, CUDA context and fragmentation when judging fit."""
    zero_stage: int | None = None
    """Override the sharding the strategy reports (0 = none, 1 optimizer, 2 + gradients,
    3 + weights)."""
    optimizer_offload: bool = False
    """Optimizer state lives in CPU memory (DeepSpeed offload), whatever the strategy says."""


@dataclass(frozen=True)
class Bytes:
    weight: int
    grad: int
    optim: int


BYTES = {
    "deepspeed": Bytes(2, 2, 12),
    "mixed": Bytes(4, 4, 8),
    "fp32": Bytes(4, 4, 8),
    "half": Bytes(2, 2, 4),
}


def devices_per_node(devices) -> int:
    """hardware.devices as a number of ranks per node (``auto`` cannot be planned)."""
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, str):
        raise UserError(f"hardware.devices={devices!r}: give a number of GPUs per node to plan for")
    return len(devices)


def build_strategy(spec):
    """hardware.strategy as the object the trainer gets (``vlmtrain.training.run.build_trainer``), or
    the Lightning name it is. Without DeepSpeed installed its strategy cannot be built; its config is
    then read as it stands (the strategy's ``config`` is that same dict)."""
    if not isinstance(spec, DictConfig):
        return spec
    try:
        return instantiate(spec)
    except Exception as e:  # only a missing DeepSpeed is handled; everything else is re-raised
        if "DeepSpeed" in str(spec.get("_target_", "")) and "deepspeed" in str(e).lower():
            return OmegaConf.to_container(spec, resolve=True)
        raise


def sharding_of(hw, opts: PlanOptions) -> Sharding:
    """What hardware.strategy shards: the strategy is built and asked
    (``vlmtrain.training.strategies.sharding``); ``plan.zero_stage`` / ``plan.optimizer_offload``
    override it."""
    per_node = devices_per_node(hw.devices)
    strategy = build_strategy(hw.strategy)
    if isinstance(strategy, dict):  # a DeepSpeed config, DeepSpeed not installed
        sh = deepspeed_sharding(strategy.get("config") or {}, per_node * hw.num_nodes)
    else:
        sh = sharding(strategy, hw.num_nodes, per_node)
    if opts.zero_stage is not None:
        sh = replace(sh, zero_stage=opts.zero_stage)
    if opts.optimizer_offload:
        sh = replace(sh, optimizer_offload=True)
    return replace(sh, shard_ranks=max(1, sh.shard_ranks))


def bytes_of(precision: str, deepspeed: bool) -> Bytes:
    if precision in ("bf16-true", "16-true", "bf16", "16"):
        return BYTES["half"]
    if deepspeed and precision.endswith("mixed"):
        return BYTES["deepspeed"]
    return BYTES["mixed"] if precision.endswith("mixed") else BYTES["fp32"]


@dataclass
class PartCount:
    total: int = 0
    trainable: int = 0


def count_parameters(model) -> dict[str, PartCount]:
    fam = family_of(model)
    counts = {p: PartCount() for p in fam.parts}
    for name, p in model.named_parameters():
        c = counts[fam.part_of(name)]
        c.total += p.numel()
        c.trainable += p.numel() if p.requires_grad else 0
    return counts


def memory_per_gpu(total: int, trainable: int, b: Bytes, sh: Sharding) -> dict[str, float]:
    """Bytes per GPU of weights, gradients and optimizer state."""
    n = sh.shard_ranks
    weights = total * b.weight / (n if sh.zero_stage >= 3 else 1)
    grads = trainable * b.grad / (n if sh.zero_stage >= 2 else 1)
    optim = trainable * b.optim / (n if sh.zero_stage >= 1 else 1)
    cpu, cpu_weights = 0.0, 0.0
    if sh.optimizer_offload:
        cpu, optim = optim, 0.0
    if sh.param_offload:
        cpu_weights, weights = weights, 0.0
    return {"weights": weights, "gradients": grads, "optimizer": optim, "cpu_optimizer": cpu,
            "cpu_weights": cpu_weights}


def plan(cfg) -> dict:
    """Counts and memory for a ``vlmtrain plan`` config (model, stage, hardware, plan)."""
    image_token_id = cfg.model.image_token_id if cfg.model.image_token_id is not None else 0
    model = build_from_config(cfg.model, image_token_id, device="meta")
    apply_stage(model, cfg.stage, on_meta=True)
    counts = count_parameters(model)
    total = sum(c.total for c in counts.values())
    trainable = sum(c.trainable for c in counts.values())
    sh = sharding_of(cfg.hardware, cfg.plan)
    b = bytes_of(plain(cfg.hardware.precision), sh.deepspeed)
    mem = memory_per_gpu(total, trainable, b, sh)
    by_stage = {z: memory_per_gpu(total, trainable, b, replace(sh, zero_stage=z, param_offload=sh.param_offload and z >= 3))
                for z in range(4)}
    return {"counts": counts, "total": total, "trainable": trainable, "sharding": sh, "bytes": b,
            "memory": mem, "by_stage": by_stage}


def report(cfg, result: dict) -> str:
    sh, b, counts = result["sharding"], result["bytes"], result["counts"]
    budget = cfg.plan.gpu_memory_gb - cfg.plan.headroom_gb
    world = sh.shard_ranks
    lines = [f"model {cfg.model.name}, stage {cfg.stage.name}"
             + (f" (LoRA r={cfg.stage.lora.r} on {cfg.stage.lora.target_modules or [plain(t) for t in cfg.stage.lora.targets]})"
                if cfg.stage.lora else ""),
             f"{'part':<24}{'total':>16}{'trainable':>16}"]
    for part, c in counts.items():
        lines.append(f"{part:<24}{c.total:>16,}{c.trainable:>16,}")
    lines.append(f"{'all':<24}{result['total']:>16,}{result['trainable']:>16,}")
    lines.append("")
    spec = cfg.hardware.strategy
    name = str(spec.get("_target_", spec)).rsplit(".", 1)[-1] if isinstance(spec, DictConfig) else str(spec)
    lines.append(f"strategy {name} -> ZeRO-{sh.zero_stage} over {world} ranks"
                 f"{' (optimizer offloaded to CPU)' if sh.optimizer_offload and not sh.param_offload else ''}"
                 f"{' (weights and optimizer offloaded to CPU)' if sh.param_offload else ''}; precision "
                 f"{cfg.hardware.precision}: {b.weight} B/weight, {b.grad} B/grad, {b.optim} B/param optimizer state")
    mem = result["memory"]
    for k in ("weights", "gradients", "optimizer"):
        lines.append(f"  {k:<12}{mem[k] / GiB:>10.2f} GiB per GPU")
    used = mem["weights"] + mem["gradients"] + mem["optimizer"]
    verdict = "fits" if used / GiB <= budget else "does NOT fit"
    lines.append(f"  {'total':<12}{used / GiB:>10.2f} GiB per GPU: {verdict} in {cfg.plan.gpu_memory_gb:g} GiB "
                 f"with {cfg.plan.headroom_gb:g} GiB kept for activations (not counted)")
    if mem["cpu_optimizer"]:
        lines.append(f"  CPU optimizer state: {mem['cpu_optimizer'] / GiB:.2f} GiB per rank")
    if mem["cpu_weights"]:
        lines.append(f"  CPU weights: {mem['cpu_weights'] / GiB:.2f} GiB per rank")
    lines.append("")
    lines.append("same run under each ZeRO stage (weights + gradients + optimizer per GPU):")
    for z, m in result["by_stage"].items():
        t = (m["weights"] + m["gradients"] + m["optimizer"]) / GiB
        lines.append(f"  ZeRO-{z}: {t:>9.2f} GiB  {'fits' if t <= budget else 'does not fit'}")
    return "\n".join(lines)
