"""A training run: build the model, data, module and trainer from a composed config, then fit.

``vlmtrain train`` (``vlmtrain.cli.train``) composes the config and calls ``train``; this module
only wires the parts together, the parts own the work. ``train`` converts the composed config to
the dataclasses of ``vlmtrain.config`` once (``typed``) and every build function below gets typed
parts (``ModelConfig``, ``DataConfig``, ``StageConfig``, ...); the ``_target_`` components stay
DictConfig nodes for ``instantiate``. The composed DictConfig itself is only recorded (the run's
config.yaml and the logger's config)."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from vlmtrain.config import TrainConfig, plain, typed
from vlmtrain.errors import UserError
from vlmtrain.models.build import apply_stage, build_model, load_tokenizer
from vlmtrain.models.family import family_of
from vlmtrain.models.lora import save_adapter
from vlmtrain.models.run_checkpoint import find_checkpoint, find_resume_checkpoint, load_strict, read_weights
from vlmtrain.training.checkpointing import AtomicModelCheckpoint, Preemption
from vlmtrain.training.datamodule import VLMDataModule
from vlmtrain.training.flops import tile_cost_in_tokens
from vlmtrain.training.module import VLMTrainingModule
from vlmtrain.training.objective import build_objective
from vlmtrain.training.resume_config import restore_run_config
from vlmtrain.training.tracking import RunTracking, save_config, scrub_hydra_records

log = logging.getLogger("vlmtrain")


PART_PREFIXES = {"vision_tower": ("model.vision_tower.",), "multi_modal_projector": ("model.multi_modal_projector.",),
                 "language_model": ("model.language_model.", "lm_head.")}


def init_weights_from(model: torch.nn.Module, path: str, parts=None) -> None:
    """Start from another run's weights (``init_from``; a LoRA run's come merged); ``parts``
    (``init_parts``): only those parts' weights, the rest as initialised."""
    ckpt = find_checkpoint(path, "init_from")
    state = read_weights(ckpt, "init_from")
    if parts is None:
        load_strict(model, state, str(ckpt))
    else:
        bad = [p for p in parts if p not in PART_PREFIXES]
        if bad or not parts:
            raise UserError(f"init_parts: {bad or parts}: must be a non-empty list of {list(PART_PREFIXES)}")
        prefixes = tuple(x for p in parts for x in PART_PREFIXES[p])
        load_strict(model, {k: v for k, v in state.items() if k.startswith(prefixes)}, str(ckpt), list(prefixes))
    log.info("initialised %s from %s", "weights" if parts is None else "+".join(parts), ckpt)


def check_accelerator(hw) -> None:
    """``hardware=gpu`` on a machine without a visible GPU: one line, not Lightning's 20."""
    if str(plain(hw.accelerator)) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"hardware.accelerator={plain(hw.accelerator)} but no CUDA GPU is visible to this process: "
                        "run on a GPU node, or use hardware=cpu")


def build_trainer(cfg: TrainConfig, run_dir: Path, record: DictConfig | None = None,
                  callbacks: list | None = None) -> pl.Trainer:
    """The Lightning Trainer of a run; ``record`` is the config the logger records (default: ``cfg``);
    ``callbacks`` are added after vlmtrain's own (the bench's clock)."""
    hw = cfg.hardware
    check_accelerator(hw)
    strategy = instantiate(hw.strategy) if isinstance(hw.strategy, DictConfig) else hw.strategy
    checkpoint = AtomicModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps or None,
        # Lightning takes one trigger: steps when given, else wall time (on by default)
        train_time_interval=(timedelta(minutes=cfg.trainer.checkpoint_every_minutes)
                             if not cfg.trainer.checkpoint_every_n_steps and cfg.trainer.checkpoint_every_minutes > 0
                             else None),
        enable_version_counter=False,  # always (over)write last.ckpt, also in a resumed run
    )
    plugins = []
    if SLURMEnvironment.detect():
        # our Preemption callback saves at a step boundary and requeues; Lightning's own
        # auto-requeue would save from inside the signal handler, mid-step
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(
        accelerator=plain(hw.accelerator),
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        strategy=strategy,
        precision=plain(hw.precision),
        max_epochs=cfg.stage.max_epochs,
        max_steps=cfg.stage.max_steps,
        max_time=cfg.trainer.max_time,
        logger=instantiate(cfg.logger) if cfg.logger else False,
        callbacks=([checkpoint, Preemption(checkpoint)] if cfg.trainer.checkpoint else [])
        + [RunTracking(record if record is not None else cfg, run_dir)] + list(callbacks or []),
        enable_checkpointing=cfg.trainer.checkpoint,
        plugins=plugins,
        default_root_dir=str(run_dir),
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        use_distributed_sampler=False,  # the StepSampler shards by rank itself
        num_sanity_val_steps=0,
    )


def _is_launching_process() -> bool:
    """The process a user (or Slurm's first task) started: global rank 0 before Lightning's ranks exist."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK"))


@contextmanager
def run_dir_lock(run_dir: Path):
    """One run per directory: a second run in it would interleave every metrics row and overwrite
    its checkpoints. An ``flock`` on ``<run_dir>/.lock``, held while the run lives (the kernel drops
    it when the process dies, kill -9 included, so a stale lock file never blocks a resume)."""
    if not _is_launching_process():
        yield
        return
    path = run_dir / ".lock"
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"run directory {run_dir} is in use by a running training ({holder}): wait for it, "
                            "or give this run its own hydra.run.dir=...") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()


def build_parts(cfg: TrainConfig, resume: Path | None = None):
    """The tokenizer, model (stage applied), data module and LightningModule of a run, as
    ``vlmtrain train`` builds them (the bench builds them here too)."""
    tokenizer = load_tokenizer(cfg.model)
    fam = family_of(cfg.model)
    # the data first: a wrong path or a bad data setting fails before the model is built
    data = VLMDataModule(cfg.data, tokenizer, fam.layout(cfg.model), cfg.stage.global_batch_size, cfg.seed)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    data.tile_cost = tile_cost_in_tokens(fam.flops_dims(model.config))  # for data.balance_ranks
    if resume is not None:
        log.info("resuming from %s (model, optimizer, scheduler, RNG, data position)", resume)
    elif cfg.init_from:
        init_weights_from(model, cfg.init_from, list(cfg.init_parts) if cfg.init_parts is not None else None)
    trainable = apply_stage(model, cfg.stage)
    log.info("stage %s: %d trainable tensors", cfg.stage.name, len(trainable))

    module = VLMTrainingModule(model, build_objective(cfg.stage, cfg.loss), cfg.optim, cfg.stage,
                               peak_tflops=cfg.trainer.peak_tflops)
    return tokenizer, model, data, module


def train(composed: DictConfig | TrainConfig, callbacks: list | None = None) -> Path:
    cfg = typed(composed)  # once: resolved, choices as Enums, ranges checked
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(run_dir):
        if (isinstance(composed, DictConfig) and cfg.resume
                and find_resume_checkpoint(cfg.resume, run_dir) is not None):
            composed = restore_run_config(composed, run_dir)  # the run continues with its own config
            cfg = typed(composed)
        return _train(cfg, composed, run_dir, callbacks)


def _train(cfg: TrainConfig, composed, run_dir: Path, callbacks: list | None = None) -> Path:
    record = composed if isinstance(composed, DictConfig) else None
    save_config(record if record is not None else cfg, run_dir / "config.yaml")  # resolved, credentials redacted
    scrub_hydra_records(run_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if _is_launching_process():
        print(f"[vlmtrain] run directory: {run_dir}", flush=True)

    check_accelerator(cfg.hardware)
    resume = find_resume_checkpoint(cfg.resume, run_dir)
    tokenizer, model, data, module = build_parts(cfg, resume)
    trainer = build_trainer(cfg, run_dir, record, callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume is not None else None)
    if module.meter is not None and module.meter.steps == 0:
        raise UserError(f"the run trained no step: no step had a supervised token (skipped samples by reason: "
                        f"{module.skip_report()}); fix the data (data.on_error=raise names the first bad line)")
    tokenizer.save_pretrained(run_dir / "tokenizer")
    if cfg.stage.lora is not None:
        # every rank: FSDP2 / ZeRO-3 gather the adapter tensors collectively; rank 0 writes
        save_adapter(model, run_dir / "adapter", cfg.stage.lora, list(cfg.stage.trainable),
                     write=trainer.is_global_zero)
    if trainer.is_global_zero and module.meter is not None:
        tail = module.meter.losses[-10:]
        final = f", final loss {sum(x[1] for x in tail) / len(tail):.4f} (mean of the last {len(tail)} logged steps)" if tail else ""
        print(f"[vlmtrain] finished: {trainer.global_step} steps{final}; {run_dir / 'summary.json'}", flush=True)
    _close_process_group()
    return run_dir


def _close_process_group() -> None:
    """Every rank waits for the others, then the process group is torn down before the interpreter exits:
    a gloo/NCCL group left alive at exit can abort a rank in its C++ destructors ('terminate called without
    an active exception', exit -6) after a run that finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
