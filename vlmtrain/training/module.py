"""The LightningModule: one optimizer step per loader item, loss normalised over the whole step.

Manual optimisation, because the recipe's loss is sum(w * CE) / sum(w) over every supervised token
of the step on every rank: the step's total weight is all-reduced first, then each micro-batch's
backward is scaled by it, so gradient accumulation and data parallelism give exactly the gradient
of the one big batch.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import nullcontext

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate

from vlmtrain.data.collate import Batch, Step
from vlmtrain.models.internvl import multimodal_embeddings
from vlmtrain.training.loss import IGNORE_INDEX, weighted_cross_entropy
from vlmtrain.training.rng import gather_rng_states, set_rng_state
from vlmtrain.training.strategies import clip_grad_norm, deepspeed_grad_norm, is_deepspeed


class VLMTrainingModule(pl.LightningModule):
    def __init__(self, model, weighting, optim_cfg, stage_cfg):
        super().__init__()
        self.model = model
        self.weighting = weighting
        self.optim_cfg = optim_cfg
        self.stage_cfg = stage_cfg
        self.automatic_optimization = False
        self.skipped = Counter()
        self._t_last = None

    # -- frozen parts stay in eval mode (no dropout / drop path), whatever Lightning asks ----------
    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.model.modules():
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
        return self

    # -- loss ---------------------------------------------------------------------------------------
    def loss_terms(self, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of w * CE, sum of w) over this micro-batch's supervised tokens."""
        model = self.model
        embeds = multimodal_embeddings(model, mb.input_ids, mb.pixel_values, mb.dummy_vision)
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=mb.attention_mask, position_ids=mb.position_ids
        ).last_hidden_state
        targets = mb.labels[:, 1:]
        sel = targets != IGNORE_INDEX
        w = self.weighting(mb.num_supervised)[mb.sample_index[:, 1:][sel]]
        num = weighted_cross_entropy(hidden[:, :-1][sel], model.lm_head, targets[sel], w)
        return num, w.sum()

    def step_weight(self, step: Step) -> torch.Tensor:
        """This rank's total loss weight for the step (known from the data before any forward)."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for mb in step.micro_batches:
            counts = mb.num_supervised
            total += (self.weighting(counts) * counts.clamp(min=0)).sum().to(self.device)
        return total

    def training_step(self, step: Step, batch_idx: int):
        opt = self.optimizers()
        sched = self.lr_schedulers()
        strategy = self.trainer.strategy
        deepspeed = is_deepspeed(strategy)
        w_total = strategy.reduce(self.step_weight(step), reduce_op="sum")
        world = self.trainer.world_size
        num_total = torch.zeros((), device=self.device)
        n = len(step.micro_batches)
        for i, mb in enumerate(step.micro_batches):
            last = i == n - 1
            if deepspeed:
                # DeepSpeed's protocol: reduce/partition gradients only at the boundary micro-batch
                strategy.model.set_gradient_accumulation_boundary(last)
            sync = last or deepspeed or not hasattr(strategy, "block_backward_sync")
            with nullcontext() if sync else strategy.block_backward_sync():
                num, _ = self.loss_terms(mb.to(self.device))
                # DDP/FSDP/ZeRO average gradients over ranks, hence x world
                self.manual_backward(num * (world / w_total.clamp(min=1e-12)))
            num_total += num.detach()
        if deepspeed:
            opt.step()  # the engine clips (config gradient_clipping) and steps at the boundary
            grad_norm = deepspeed_grad_norm(strategy)
        else:
            grad_norm = self._clip(opt)
            if w_total > 0:
                opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        self._log_step(step, strategy.reduce(num_total, reduce_op="sum") / w_total.clamp(min=1e-12), grad_norm)

    def _clip(self, opt) -> torch.Tensor:
        params = [p for g in opt.param_groups for p in g["params"]]
        return clip_grad_norm(self.trainer.strategy, params, self.optim_cfg.grad_clip)

    def _log_step(self, step: Step, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        now = time.perf_counter()
        tokens = sum(int(mb.attention_mask.sum()) for mb in step.micro_batches)
        samples = sum(len(mb.datasets) for mb in step.micro_batches)
        metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/tokens": float(tokens),
                   "train/samples": float(samples)}
        for i, g in enumerate(self.optimizers().param_groups):
            metrics[f"train/lr_group{i}"] = g["lr"]
        if self._t_last is not None:
            dt = now - self._t_last
            metrics["train/tokens_per_s"] = tokens / dt
            # over all ranks, per GPU: the scaling figure (benchmarks/scaleout.py)
            metrics["train/tokens_per_s_per_gpu"] = float(self._tokens_all_ranks(tokens)) / dt / self.trainer.world_size
            metrics["train/samples_per_s"] = samples / dt
        self._t_last = now
        for s in step.skipped:
            self.skipped[s.reason] += 1
        for reason, count in self.skipped.items():
            metrics[f"data/skipped_{reason}"] = float(count)
        self.log_dict(metrics, on_step=True, prog_bar=False, batch_size=samples)
        self.log("loss", loss, prog_bar=True, on_step=True, logger=False, batch_size=samples)

    def _tokens_all_ranks(self, tokens: int) -> torch.Tensor:
        return self.trainer.strategy.reduce(torch.tensor(float(tokens), device=self.device), reduce_op="sum")

    def on_train_epoch_end(self) -> None:
        if self.skipped:
            report = ", ".join(f"{r}: {c}" for r, c in sorted(self.skipped.items()))
            print(f"[vlmtrain] epoch {self.current_epoch}: skipped samples so far by reason: {report}")

    # -- sharding and checkpoint state ---------------------------------------------------------------
    def configure_model(self) -> None:
        """Sharded strategies (FSDP2) shard the model here, after the process group exists."""
        shard = getattr(self.trainer.strategy, "shard_model", None)
        if shard is not None:
            shard(self.model)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # every rank's RNG (drop path masks differ per rank), so a resumed run draws what the
        # uninterrupted run would have drawn
        checkpoint["rng_states"] = gather_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states:
            set_rng_state(states[self.global_rank % len(states)])

    # -- optimizer ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue  # frozen parameters never reach the optimizer
            (no_decay if p.ndim < 2 or any(k in name for k in self.optim_cfg.no_decay) else decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = instantiate(self.optim_cfg.optimizer)([g for g in groups if g["params"]])
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.stage_cfg.warmup_steps or int(round(self.stage_cfg.warmup_ratio * total))
        scheduler = instantiate(self.optim_cfg.scheduler)(optimizer, total_steps=total, warmup_steps=warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
