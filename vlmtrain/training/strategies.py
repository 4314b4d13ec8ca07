"""Distributed strategies: FSDP2 sharding of the VLM; what each strategy shards (``sharding``, which
``vlmtrain plan`` asks); and how each runs one optimizer step's micro-batches (``step_protocol``:
the gradient synchronisation around each micro-batch, clipping and the optimizer step), so the
LightningModule's training_step holds no strategy-specific code.

`conf/hardware/fsdp.yaml` picks ``FSDP2Strategy``: Lightning's ModelParallelStrategy (FSDP2,
``fully_shard``) with the sharding plan of an InternVL model. FSDP2 shards per parameter, so a
stage that freezes most of the model (mlp_warmup trains only the projector) needs nothing special:
frozen and trainable tensors may share a unit. Every parameter must belong to a unit whose
``forward`` runs (a sharded parameter is a DTensor until its unit's forward gathers it), so the
plan is: one unit per transformer block (ViT and LLM, matched by class name), then one unit per
module that directly holds parameters outside any block (patch embedding, projector, token
embedding, final norm, LM head), then the root.

Across nodes the mesh is 2D (replicate over nodes, shard within a node): hybrid sharding, which
keeps the all-gathers on the fast intra-node links.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from torch import nn

from vlmtrain.errors import UserError
from vlmtrain.models.run_checkpoint import deepspeed_weights_only

log = logging.getLogger("vlmtrain")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, None: None}


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism (no tensor parallelism) with vlmtrain's sharding plan.

    Args:
        block_names: class names of the transformer blocks that become their own units (ViT
            layers and LLM decoder layers of every supported family).
        param_dtype: dtype the gathered parameters compute in (``bfloat16``); sharded master
            weights and optimizer state stay float32.
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: free gathered block parameters after forward (ZeRO-3 like);
            False keeps them until backward (ZeRO-2 like, more memory, fewer all-gathers).
        activation_checkpointing: recompute each block's activations in backward.
        accumulate_unsharded: micro-batches before a step's last neither reduce-scatter their
            gradients nor reshard parameters after backward: one gradient reduction per step and
            fewer all-gathers, for the memory of the whole model's unsharded gradients and
            parameters on every GPU (models that fit). False: every micro-batch reduce-scatters.
        hybrid: None shards within a node and replicates across nodes when num_nodes > 1
            (hybrid shard); False shards over all ranks; True forces the 2D mesh.
        save_distributed_checkpoint: False gathers full weights and optimizer state into one
            ``.ckpt`` on rank 0 (simple, loadable anywhere, fine up to ~8B); True writes one shard
            per rank into a folder (required for the largest models).
    """

    def __init__(
        self,
        block_names: Sequence[str],
        param_dtype: str | None = "bfloat16",
        reduce_dtype: str | None = "float32",
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = True,
        accumulate_unsharded: bool = False,
        hybrid: bool | None = None,
        save_distributed_checkpoint: bool = False,
        cpu_offload: bool = False,
        **kwargs,
    ):
        for name, dt in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if dt not in DTYPES:
                raise UserError(f"hardware.strategy.{name}: {dt!r} is not one of {sorted(k for k in DTYPES if k)}")
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.block_names = set(block_names)
        self.param_dtype, self.reduce_dtype = DTYPES[param_dtype], DTYPES[reduce_dtype]
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing
        self.accumulate_unsharded = accumulate_unsharded
        self.hybrid = hybrid
        self.cpu_offload = cpu_offload

    def hybrid_over(self, num_nodes: int) -> bool:
        """Whether the mesh is 2D (replicate over nodes, shard within a node) on ``num_nodes`` nodes."""
        return num_nodes > 1 if self.hybrid is None else bool(self.hybrid)

    def sharding(self, num_nodes: int, per_node: int) -> Sharding:
        """What this strategy shards on ``num_nodes`` nodes of ``per_node`` ranks: ZeRO-3 like
        (ZeRO-2 like when block weights stay gathered until backward), over the ranks of one node
        when the mesh is hybrid, else over all; ``cpu_offload`` keeps weights and optimizer state in
        CPU memory."""
        ranks = per_node if self.hybrid_over(num_nodes) else per_node * num_nodes
        return Sharding(3 if self.reshard_after_forward else 2, False, ranks,
                        optimizer_offload=self.cpu_offload, param_offload=self.cpu_offload)

    def micro_batch(self, i: int, n: int):
        """Micro-batch ``i`` of a step's ``n``: all but the last skip the gradient reduce-scatter
        when ``accumulate_unsharded`` (``block_backward_sync``)."""
        return self.block_backward_sync() if i < n - 1 else _no_sync_change()

    @contextmanager
    def block_backward_sync(self):
        """With ``accumulate_unsharded``: backward without the gradient reduce-scatter and without
        resharding after it. FSDP2 accumulates this micro-batch's gradients unsharded on the rank,
        keeps the gathered parameters for the next micro-batch, and the step's last micro-batch
        (run outside this context) reduce-scatters them all at once. Otherwise a no-op: a whole
        model's unsharded gradients would not fit the models sharding is for."""
        if not self.accumulate_unsharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
            unit.set_reshard_after_backward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)
                unit.set_reshard_after_backward(True, recurse=False)

    def setup_environment(self) -> None:
        # all ranks are data parallel: the 1D "data_parallel" mesh spans the whole world
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def sharding_mesh(self):
        """1D over all ranks, or (replicate over nodes, shard within a node) for hybrid sharding."""
        from torch.distributed.device_mesh import init_device_mesh

        if not self.hybrid_over(self.num_nodes):
            return self.device_mesh["data_parallel"]
        return init_device_mesh(
            self.root_device.type, (self.num_nodes, self.num_processes), mesh_dim_names=("replicate", "shard")
        )

    def shard_model(self, model: nn.Module) -> nn.Module:
        """Apply activation checkpointing and FSDP2 to ``model`` in place (idempotent)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(model, FSDPModule):
            return model
        blocks = [m for m in model.modules() if type(m).__name__ in self.block_names]
        if not blocks:
            raise UserError(
                f"hardware.strategy.block_names {sorted(self.block_names)} match no module of the model; "
                f"its block classes include {sorted(_block_class_candidates(model))}"
            )
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
        kwargs = dict(
            mesh=self.sharding_mesh(),
            mp_policy=MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype),
        )
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in blocks:
            fully_shard(block, reshard_after_forward=self.reshard_after_forward, **kwargs)
        owners = parameter_owners_outside(model, blocks)
        for owner in owners:
            fully_shard(owner, reshard_after_forward=self.reshard_after_forward, **kwargs)
        fully_shard(model, reshard_after_forward=False, **kwargs)
        log.info("FSDP2: %d block units + %d other units, mesh %s", len(blocks), len(owners), kwargs["mesh"])
        return model


def parameter_owners_outside(model: nn.Module, units: Iterable[nn.Module]) -> list[nn.Module]:
    """Modules that directly hold a parameter that lies in none of ``units`` (deepest first)."""
    inside = {id(p) for u in units for p in u.parameters()}
    owners = []
    for module in model.modules():
        if module is model:
            continue
        if any(id(p) not in inside for p in module.parameters(recurse=False)):
            owners.append(module)
    return owners[::-1]  # children before parents: fully_shard must see nested units first


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers' own per-layer checkpointing (non-reentrant) on the ViT and the LLM: the
    recomputation goes through each block's __call__, so FSDP2 gathers the block again for it."""
    from vlmtrain.models.family import family_of

    for part in family_of(model).towers(model).values():
        part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]


def _block_class_candidates(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, nn.Module) and "Layer" in type(m).__name__}


# -- what a strategy shards (vlmtrain plan asks) --------------------------------------------------------


@dataclass(frozen=True)
class Sharding:
    zero_stage: int
    """0 none, 1 optimizer state, 2 + gradients, 3 + weights (DeepSpeed's ZeRO stages; FSDP's
    equivalents)."""
    deepspeed: bool
    shard_ranks: int
    """Ranks that one copy of the state is cut across."""
    optimizer_offload: bool = False
    """Optimizer state lives in CPU memory."""
    param_offload: bool = False
    """Weights live in CPU memory (ZeRO-3 offload_param, FSDP CPU offload)."""


def deepspeed_sharding(config: dict, world: int) -> Sharding:
    """What a DeepSpeed config (``DeepSpeedStrategy.config``) shards over ``world`` ranks."""
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        zero = {}

    def offloaded(key: str) -> bool:
        spec = zero.get(key)
        return isinstance(spec, dict) and str(spec.get("device", "none")).lower() in ("cpu", "nvme")

    stage = int(zero.get("stage", 0))
    return Sharding(stage, True, world, optimizer_offload=offloaded("offload_optimizer"),
                    param_offload=stage >= 3 and offloaded("offload_param"))


FSDP1_STAGES = {"FULL_SHARD": 3, "SHARD_GRAD_OP": 2, "NO_SHARD": 0, "HYBRID_SHARD": 3, "_HYBRID_SHARD_ZERO2": 2}


def sharding(strategy: Strategy | str | None, num_nodes: int, per_node: int) -> Sharding:
    """What ``strategy`` (an instance, or a Lightning strategy name) shards on ``num_nodes`` nodes of
    ``per_node`` ranks: asked of the strategy itself (``FSDP2Strategy.sharding``, DeepSpeed's
    config, FSDP's sharding_strategy); DDP and one device shard nothing."""
    world = per_node * num_nodes
    if isinstance(strategy, str):
        from lightning.pytorch.strategies import StrategyRegistry

        if strategy not in StrategyRegistry:
            return Sharding(0, False, world)  # auto, ddp_*, single_device: whole copies
        strategy = StrategyRegistry.get(strategy)
    own = getattr(strategy, "sharding", None)
    if callable(own):
        return own(num_nodes, per_node)
    if isinstance(strategy, DeepSpeedStrategy):
        return deepspeed_sharding(strategy.config or {}, world)
    if isinstance(strategy, FSDPStrategy):
        name = getattr(strategy.sharding_strategy, "name", str(strategy.sharding_strategy)).upper()
        offload = bool(getattr(strategy.cpu_offload, "offload_params", False))
        return Sharding(FSDP1_STAGES.get(name, 3), False, per_node if "HYBRID" in name else world,
                        optimizer_offload=offload, param_offload=offload)
    return Sharding(0, False, world)


# -- one optimizer step's micro-batches, as each strategy runs them --------------------------------------


@contextmanager
def _no_sync_change() -> Iterator[None]:
    yield


class StepProtocol:
    """How a strategy runs a step's micro-batches: ``micro_batch(i, n)`` wraps micro-batch i's forward
    and backward, ``step`` clips and steps once they all ran. This default (one device, DDP, FSDP2):
    every backward synchronises as it goes (DDP all-reduces, FSDP2 reduce-scatters; FSDP2's own
    ``micro_batch`` may defer that to the last), torch clips over the whole model, and a step
    without any loss weight on any rank does not move the weights."""

    def __init__(self, strategy: Any):
        self.strategy = strategy

    def micro_batch(self, i: int, n: int):
        own = getattr(self.strategy, "micro_batch", None)
        return own(i, n) if callable(own) else _no_sync_change()

    def step(self, opt, max_norm: float | None, any_weight: bool) -> torch.Tensor:
        """Clip, step if any weight (else keep the weights), return the total gradient norm."""
        params = [p for g in opt.param_groups for p in g["params"]]
        grad_norm = clip_grad_norm(self.strategy, params, max_norm)
        if any_weight:
            opt.step()
        return grad_norm


class DeepSpeedSteps(StepProtocol):
    """DeepSpeed's gradient-accumulation boundary protocol. Lightning's manual optimisation runs the
    whole step (every micro-batch's forward and backward) inside ONE engine forward, so before each
    micro-batch after the first this does the bookkeeping ``DeepSpeedEngine.forward`` does before
    every forward: without it ZeRO-3 (DeepSpeed 0.19, whose micro-step counter advances there)
    treats every micro-batch as the first and copies its gradients over the previous ones instead
    of accumulating them: only the last micro-batch's gradients reached the optimizer
    (tests/test_strategies.py, fp32 on CPU ranks). Gradients are reduced and partitioned only at the
    boundary (the last micro-batch). The engine clips inside ``step()`` (its config's
    ``gradient_clipping``) and always steps; the norm is read after."""

    @contextmanager
    def micro_batch(self, i: int, n: int) -> Iterator[None]:
        engine = self.strategy.model
        if i > 0:
            optimizer = getattr(engine, "optimizer", None)
            if hasattr(optimizer, "clear_backward_seen_flag"):
                optimizer.clear_backward_seen_flag()  # accumulate, not overwrite (ZeRO-3)
        engine.set_gradient_accumulation_boundary(i == n - 1)
        yield

    def step(self, opt, max_norm: float | None, any_weight: bool) -> torch.Tensor:
        opt.step()  # the engine clips (config gradient_clipping) and steps at the boundary
        norm = self.strategy.model.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else float("nan"))


class SafeDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy whose resume runs no pickled code: the engine's checkpoint loads
    (``weights_only=False`` in DeepSpeed) read every shard of the folder with ``weights_only`` and the
    few plain DeepSpeed types allowed, and a shard that needs more is refused (a one-line error)."""

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        with deepspeed_weights_only(Path(checkpoint_path), "resume"):
            return super().load_checkpoint(checkpoint_path, weights_only)


def step_protocol(strategy) -> StepProtocol:
    """The micro-batch synchronisation and optimizer step of ``strategy``."""
    return DeepSpeedSteps(strategy) if isinstance(strategy, DeepSpeedStrategy) else StepProtocol(strategy)


# -- gradient clipping that is right under every strategy -------------------------------------------------
def clip_grad_norm(strategy, params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip the gradients of ``params`` to ``max_norm`` (None or <= 0: only measure) and return
    the total norm before clipping, over the whole model on every rank.

    DDP / one device: gradients are whole and identical on every rank, torch's clip is exact.
    FSDP2: gradients are DTensor shards; torch's clip reduces the norm over the mesh.
    DeepSpeed: the engine owns the gradients (ZeRO partitions them) and clips inside
    ``step()`` from ``gradient_clipping`` in its config, so here we only read its norm after
    the step (``DeepSpeedSteps.step``).
    """
    if isinstance(strategy, DeepSpeedStrategy):
        raise RuntimeError("DeepSpeed clips inside engine.step(); DeepSpeedSteps.step reads its norm after it")
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    limit = max_norm if max_norm and max_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm.detach()
