"""A training run: build the model, data, module and trainer from a composed config, then fit.

``vlmtrain train`` (``vlmtrain.cli.train``) composes the config and calls ``train``; this module
only wires the parts together, the parts own the work."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from vlmtrain.models.build import apply_stage, build_model, load_tokenizer
from vlmtrain.models.family import family_of
from vlmtrain.models.lora import save_adapter
from vlmtrain.models.run_checkpoint import find_checkpoint, find_resume_checkpoint, load_strict, read_weights
from vlmtrain.training.checkpointing import AtomicModelCheckpoint, Preemption
from vlmtrain.training.datamodule import VLMDataModule
from vlmtrain.training.flops import tile_cost_in_tokens
from vlmtrain.training.module import VLMTrainingModule
from vlmtrain.training.objective import build_objective
from vlmtrain.training.tracking import RunTracking, save_config, scrub_hydra_records

log = logging.getLogger("vlmtrain")


def init_weights_from(model: torch.nn.Module, path: str) -> None:
    """Start from another run's weights (``init_from``; a LoRA run's come merged)."""
    ckpt = find_checkpoint(path, "init_from")
    load_strict(model, read_weights(ckpt, "init_from"), str(ckpt))
    log.info("initialised weights from %s", ckpt)


def build_trainer(cfg: DictConfig, run_dir: Path) -> pl.Trainer:
    hw = cfg.hardware
    strategy = instantiate(hw.strategy) if isinstance(hw.strategy, DictConfig) else hw.strategy
    checkpoint = AtomicModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps or None,
        enable_version_counter=False,  # always (over)write last.ckpt, also in a resumed run
    )
    plugins = []
    if SLURMEnvironment.detect():
        # our Preemption callback saves at a step boundary and requeues; Lightning's own
        # auto-requeue would save from inside the signal handler, mid-step
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(
        accelerator=hw.accelerator,
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        strategy=strategy,
        precision=hw.precision,
        max_epochs=cfg.stage.max_epochs,
        max_steps=cfg.stage.max_steps,
        max_time=cfg.trainer.max_time,
        logger=instantiate(cfg.logger) if cfg.logger else False,
        callbacks=([checkpoint, Preemption(checkpoint)] if cfg.trainer.checkpoint else []) + [RunTracking(cfg, run_dir)],
        enable_checkpointing=cfg.trainer.checkpoint,
        plugins=plugins,
        default_root_dir=str(run_dir),
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        use_distributed_sampler=False,  # the StepSampler shards by rank itself
        num_sanity_val_steps=0,
    )


def train(cfg: DictConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")  # resolved, credentials redacted
    scrub_hydra_records(run_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    resume = find_resume_checkpoint(cfg.resume, run_dir)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    if resume is not None:
        log.info("resuming from %s (model, optimizer, scheduler, RNG, data position)", resume)
    elif cfg.init_from:
        init_weights_from(model, cfg.init_from)
    trainable = apply_stage(model, cfg.stage)
    log.info("stage %s: %d trainable tensors", cfg.stage.name, len(trainable))

    fam = family_of(cfg.model)
    data = VLMDataModule(
        cfg.data, tokenizer, fam.layout(cfg.model),
        cfg.stage.global_batch_size, cfg.seed,
        tile_cost=tile_cost_in_tokens(fam.flops_dims(model.config)),
    )
    module = VLMTrainingModule(model, build_objective(cfg.stage, cfg.loss), cfg.optim, cfg.stage,
                               peak_tflops=cfg.trainer.peak_tflops)
    trainer = build_trainer(cfg, run_dir)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume is not None else None)
    tokenizer.save_pretrained(run_dir / "tokenizer")
    if cfg.stage.lora is not None:
        # every rank: FSDP2 / ZeRO-3 gather the adapter tensors collectively; rank 0 writes
        save_adapter(model, run_dir / "adapter", cfg.stage.lora, list(cfg.stage.trainable),
                     write=trainer.is_global_zero)
    return run_dir
