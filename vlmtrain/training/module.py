"""The LightningModule: one optimizer step per loader item, loss normalised over the whole step.

Manual optimisation, because the recipe's loss is normalised over the whole step on every rank
(SFT: sum(w * CE) / sum(w) over every supervised token): the step's total weight, which the
objective (``vlmtrain.training.objective``) knows from the data, is all-reduced first, then each
micro-batch's backward is scaled by it, so gradient accumulation and data parallelism give
exactly the gradient of the one big batch.
"""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import SingleDeviceStrategy
from omegaconf import DictConfig

from vlmtrain.config import StageConfig
from vlmtrain.data.collate import Step
from vlmtrain.errors import UserError
from vlmtrain.models.family import family_of
from vlmtrain.training.flops import peak_flops_per_device, trainable_states
from vlmtrain.training.master_weights import MasterWeightOptimizer
from vlmtrain.training.metrics import DatasetLoss, StepMeter
from vlmtrain.training.objective import Objective
from vlmtrain.training.rng import gather_rng_states, set_rng_state
from vlmtrain.training.strategies import step_protocol


class VLMTrainingModule(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, objective: Objective, optim_cfg: DictConfig, stage_cfg: StageConfig,
                 peak_tflops: float | None = None):
        """``optim_cfg``: the optim group (a component node: optimizer, scheduler, grad_clip, ...);
        ``stage_cfg``: the stage (its warmup)."""
        super().__init__()
        self.model = model
        self.objective = objective
        """The step's loss (``vlmtrain.training.objective.Objective``)."""
        owned = objective.setup(model)
        if owned is not None:
            self.reference = owned
            """The objective's own frozen module (a preference stage's reference copy): a submodule,
            so it moves to the device and is sharded and checkpointed with the policy; it has no
            trainable parameter, so no optimizer state."""
        self.optim_cfg = optim_cfg
        self.stage_cfg = stage_cfg
        self.automatic_optimization = False
        self.skipped = Counter()
        self.empty_steps = 0
        """Loader steps without a supervised token on any rank (not trained, not counted as steps)."""
        self._epoch_items = self._epoch_trained = 0
        self.truncated = 0  # samples cut to max_seq_len by dropping text turns (data.too_long)
        self.peak_tflops = peak_tflops
        """Peak dense TFLOP/s of one device for the MFU estimate; None: from the GPU's name."""
        self.meter: StepMeter | None = None

    # -- frozen parts stay in eval mode (no dropout / drop path), whatever Lightning asks ----------
    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.model.modules():
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
        return self

    def training_step(self, step: Step, batch_idx: int):
        opt = self.optimizers()
        sched = self.lr_schedulers()
        strategy = self.trainer.strategy
        objective = self.objective
        w_local = objective.step_weight(step)
        w_total = strategy.reduce(w_local.to(self.device), reduce_op="sum")
        world = self.trainer.world_size
        # whether to step: on one process from the host copy, so the host never waits for the device
        # here (a sync per step would stop it queueing the next step while this one runs)
        any_weight = bool(w_local > 0) if world == 1 else bool(w_total > 0)
        self._epoch_items += 1
        if not any_weight:
            # no supervised token on any rank (every sample skipped, or none has an answer token):
            # nothing to learn from, so no update, no scheduler step and no loss (a 0.0 would pull
            # the curves and final_loss down); the global step does not advance, its skips count
            for s in step.skipped:
                self.skipped[s.reason] += 1
            self.empty_steps += 1
            self._not_a_step()
            return None
        self._epoch_trained += 1
        num_total = torch.zeros((), device=self.device)
        if self.meter is not None:
            self.meter.count(step)
        if world > 1:  # the same number of micro-batches on every rank (packing and skips make them differ)
            most = strategy.reduce(torch.tensor(float(len(step.micro_batches)), device=self.device), reduce_op="max")
            step.pad_to(int(most))
        n = len(step.micro_batches)
        # per-dataset loss only on logging steps: it costs a host sync per micro-batch
        dataset_loss = DatasetLoss() if self._should_log() else None
        stats: dict[str, torch.Tensor] = {}
        steps = step_protocol(strategy)  # the strategy's gradient synchronisation, clipping and step
        for i, mb in enumerate(step.micro_batches):
            with steps.micro_batch(i, n):
                terms = objective(self.model, mb.to(self.device),
                                  per_sample=dataset_loss is not None and not mb.zero_weight)
                if terms.per_sample is not None:
                    dataset_loss.add(mb.datasets, terms.per_sample)
                num = terms.total
                if mb.zero_weight:  # a filler: forward and backward run (collectives), nothing counts
                    num = num * 0.0
                # DDP/FSDP/ZeRO average gradients over ranks, hence x world
                self.manual_backward(num * (world / w_total.clamp(min=1e-12)))
            num_total += num.detach()
            for k, v in terms.stats.items():
                stats[k] = stats[k] + v if k in stats else v
        grad_norm = steps.step(opt, self.optim_cfg.grad_clip, any_weight)
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss = strategy.reduce(num_total, reduce_op="sum") / w_total.clamp(min=1e-12)
        extra = {}
        if stats:  # the objective's own sums, over all ranks (one small all-reduce)
            names = sorted(stats)
            summed = strategy.reduce(torch.stack([stats[k].float() for k in names]), reduce_op="sum")
            stats = dict(zip(names, summed.unbind()))
            objective.end_step(stats)
            extra = {f"train/{k}": v for k, v in objective.metrics(stats, w_total).items()}
        self._log_step(step, loss, grad_norm, dataset_loss, extra)

    def _not_a_step(self) -> None:
        """Keep Lightning from counting and logging a step that trained nothing: it would log the
        previous step's values again (they stay in its result collection) at the next log step."""
        results = self.trainer._results
        if results is not None:
            for key in [k for k in results if k.startswith("training_step.")]:
                del results[key]
        # the loggers' step axis (and log_every_n_steps) counts batches that stepped: not this one
        self.trainer.fit_loop.epoch_loop._batches_that_stepped -= 1

    # -- metrics (vlmtrain.training.metrics computes them; loggers are rank zero only) --------------
    def on_train_start(self) -> None:
        peak = self.peak_tflops * 1e12 if self.peak_tflops else None
        if peak is None and self.device.type == "cuda":
            peak = peak_flops_per_device(torch.cuda.get_device_name(self.device))
        self.meter = StepMeter(family_of(self.model).flops_dims(self.model.config), trainable_states(self.model),
                               self.trainer.world_size, peak)
        if getattr(self, "_meter_state", None):
            self.meter.load_state_dict(self._meter_state)  # resumed: the summary covers the whole run

    def _should_log(self) -> bool:
        # the same rule Lightning's own monitors (LearningRateMonitor, ThroughputMonitor) use
        return (self.meter is not None and bool(self.trainer.loggers)
                and self.trainer._logger_connector.should_update_logs)

    def _gather(self, obj) -> list:
        """obj from every rank (a collective: every rank calls it on the same step)."""
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            out = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(out, obj)
            return out
        return [obj]

    def _log_step(self, step: Step, loss: torch.Tensor, grad_norm: torch.Tensor,
                  dataset_loss: DatasetLoss | None = None, extra: dict | None = None) -> None:
        samples = sum(len(mb.datasets) for mb in step.micro_batches)
        for s in step.skipped:
            self.skipped[s.reason] += 1
        metrics = {"train/loss": loss, "train/grad_norm": grad_norm, **(extra or {})}
        for i, g in enumerate(self.optimizers().param_groups):
            metrics[f"train/lr/{g.get('name', f'group{i}')}"] = g["lr"]
        self.truncated += getattr(step, "truncated", 0)
        if self.truncated:
            metrics["data/truncated"] = float(self.truncated)
        if dataset_loss is not None:
            metrics.update(self.meter.collect(self._gather, self.skipped, dataset_loss, float(loss),
                                              self.global_step))
        self.log_dict(metrics, on_step=True, prog_bar=False, batch_size=max(1, samples))
        self.log("loss", loss, prog_bar=True, on_step=True, logger=False, batch_size=max(1, samples))

    def run_summary(self) -> dict:
        """The run's totals (a collective: every rank calls it at the end of training)."""
        if self.meter is None:
            return {}
        self.meter.collect(self._gather, self.skipped)
        return self.meter.summary()

    def on_train_epoch_start(self) -> None:
        self._epoch_items = self._epoch_trained = 0

    def skip_report(self) -> str:
        return ", ".join(f"{r}: {c}" for r, c in sorted(self.skipped.items())) or "none"

    def on_train_epoch_end(self) -> None:
        if self._epoch_items and not self._epoch_trained:
            # the same data comes every epoch: an epoch with nothing to train on means the run
            # would train on nothing (and, under stage.max_steps, never end)
            raise UserError(
                f"epoch {self.current_epoch}: none of its {self._epoch_items} steps had a supervised token, "
                f"nothing was trained (skipped samples by reason: {self.skip_report()}); "
                "fix the data (data.on_error=raise names the first bad line) or data.max_seq_len")
        if self.empty_steps:
            print(f"[vlmtrain] epoch {self.current_epoch}: steps without a supervised token so far (not trained): "
                  f"{self.empty_steps}")
        if self.skipped:
            report = ", ".join(f"{r}: {c}" for r, c in sorted(self.skipped.items()))
            print(f"[vlmtrain] epoch {self.current_epoch}: skipped samples so far by reason: {report}")
        if self.truncated:
            print(f"[vlmtrain] epoch {self.current_epoch}: samples truncated to max_seq_len so far: {self.truncated}")

    # -- sharding and checkpoint state ---------------------------------------------------------------
    def configure_model(self) -> None:
        """Sharded strategies (FSDP2) shard the model here, after the process group exists."""
        shard = getattr(self.trainer.strategy, "shard_model", None)
        if shard is not None:
            shard(self.model)
            if getattr(self, "reference", None) is not None:
                shard(self.reference)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # every rank's RNG (drop path masks differ per rank), so a resumed run draws what the
        # uninterrupted run would have drawn
        checkpoint["rng_states"] = gather_rng_states()
        if self.meter is not None:
            checkpoint["vlmtrain_metrics"] = self.meter.state_dict()
        state = self.objective.state_dict()
        if state:  # e.g. BCO's running reward mean: a resumed run continues it
            checkpoint["vlmtrain_objective"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._meter_state = checkpoint.get("vlmtrain_metrics")  # resumed: the summary covers the whole run
        if "vlmtrain_objective" in checkpoint:
            self.objective.load_state_dict(checkpoint["vlmtrain_objective"])
        states = checkpoint.get("rng_states")
        if states:
            set_rng_state(states[self.global_rank % len(states)])

    # -- optimizer ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        low = sorted({str(p.dtype) for p in self.model.parameters() if p.requires_grad and p.dtype != torch.float32})
        if low and not isinstance(self.trainer.strategy, SingleDeviceStrategy):
            raise UserError(f"model.compute_dtype: {low} weights with fp32 master copies run in one process only; "
                            "unset it for DDP, FSDP and DeepSpeed (they keep their own master weights)")
        optimizer, scheduler = build_optimizer(self.model, self.optim_cfg, self.stage_cfg,
                                               int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_optimizer(model: torch.nn.Module, optim_cfg, stage_cfg, total_steps: int):
    """The configured optimizer over ``param_groups`` and its per-step scheduler for a run of
    ``total_steps`` optimizer steps (warmup from the stage). Trainable weights below fp32
    (``model.compute_dtype``) are stepped through fp32 master copies (``MasterWeightOptimizer``)."""
    groups = param_groups(model, list(optim_cfg.no_decay), optim_cfg.get("lr"), dict(optim_cfg.get("lr_scale") or {}))
    make = instantiate(optim_cfg.optimizer)
    if any(p.dtype != torch.float32 for g in groups for p in g["params"]):
        optimizer = MasterWeightOptimizer(groups, make)
    else:
        optimizer = make(groups)
    warmup = stage_cfg.warmup_steps or int(round(stage_cfg.warmup_ratio * total_steps))
    scheduler = instantiate(optim_cfg.scheduler)(optimizer, total_steps=total_steps, warmup_steps=warmup)
    return optimizer, scheduler


def param_groups(model: torch.nn.Module, no_decay: list[str], lr: float | None,
                 lr_scale: dict[str, float]) -> list[dict]:
    """The optimizer's parameter groups: trainable parameters only, split into weight-decayed and
    not (1-D tensors and names containing a ``no_decay`` key), and, for each part named in
    ``lr_scale`` (``optim.lr_scale``, e.g. ``{vision_tower: 0.1}``), into groups of their own at
    ``lr x scale`` (named ``vision_tower/decay``...). Unscaled parts share ``decay`` / ``no_decay``,
    in that order, so runs without scales keep their group layout (and resume from older checkpoints)."""
    parts = family_of(model).parts
    bad = {k: v for k, v in lr_scale.items() if k not in parts or not float(v) > 0}
    if bad:
        raise UserError(f"optim.lr_scale: {bad}: keys must be parts {list(parts)}, values > 0")
    if lr_scale and lr is None:
        raise UserError("optim.lr_scale needs optim.lr (the lr it scales)")
    split: dict[tuple[str, bool], list] = {}
    part_of = family_of(model).part_of
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen parameters never reach the optimizer
        part = part_of(name.removeprefix("base_model.model."))  # peft wraps the model for LoRA
        decay = not (p.ndim < 2 or any(k in name for k in no_decay))
        split.setdefault((part if part in lr_scale else "", decay), []).append(p)
    groups = []
    for part, decay in sorted(split, key=lambda k: (k[0], not k[1])):
        kind = "decay" if decay else "no_decay"
        group = {"params": split[part, decay], "name": f"{part}/{kind}" if part else kind}
        if not decay:
            group["weight_decay"] = 0.0
        if part:
            group["lr"] = float(lr) * float(lr_scale[part])
        groups.append(group)
    return groups
