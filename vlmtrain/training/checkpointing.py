"""Checkpoints that survive crashes and preemption (finding the one to resume from is
``vlmtrain.models.run_checkpoint.find_resume_checkpoint``).

A checkpoint (``last.ckpt``: a file, or a folder under DeepSpeed / sharded FSDP) is first written
whole to ``<name>.tmp`` and only then renamed over the previous one, so a crash mid-save leaves the
previous checkpoint usable. It holds the model, optimizer, scheduler, every rank's RNG state and
the data position (the data module's sampler state: epoch and optimizer steps taken).

Preemption: Slurm sends SIGUSR1 before the time limit (``#SBATCH --signal=USR1@120``) and
SIGTERM on ``scontrol requeue``, ``scancel`` or a node drain. The handler only records the signal;
at the end of the current optimizer step all ranks agree on it (one tiny all-reduce per step),
write ``last.ckpt`` and stop with exit code ``PREEMPTED`` (75). On SIGUSR1 under Slurm, rank 0 also
requeues the job (and the run exits 0); a requeued job runs with ``resume=auto`` and continues from
``last.ckpt``. Only the main process of each rank handles the signals: loader workers ignore them
(``vlmtrain.training.datamodule.init_loader_worker``), so a signal to the whole process group, as
schedulers send it, cannot kill a worker before the save.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from vlmtrain.models.run_checkpoint import LAST

log = logging.getLogger("vlmtrain")

PREEMPTED = 75
"""Exit code of a run stopped by a signal before it finished (EX_TEMPFAIL: "try again"): its
``last.ckpt`` is written and ``resume=auto`` continues it. 0 is kept for a finished run and for a
Slurm job that requeued itself (Slurm runs the rest)."""


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is written; the exit code says
    whether the job was requeued (0) or stopped unfinished (``PREEMPTED``, 75)."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def publish(tmp: Path, final: Path) -> None:
    """Make the fully written ``tmp`` the checkpoint at ``final``.

    A file is renamed over the old one (atomic on POSIX). A folder cannot be, so the old folder
    is first moved to ``<final>.old``, the new one moved in, then the old one deleted;
    ``vlmtrain.models.run_checkpoint.find_resume_checkpoint`` falls back to ``.old`` if a crash hits between the two renames.
    """
    if tmp.is_file():
        _fsync_file(tmp)
        if final.is_dir():
            _remove(final)
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + ".old")
    _remove(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


def save_atomically(trainer: pl.Trainer, filepath: str | os.PathLike, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` to ``<filepath>.tmp``, then rename into place (all ranks call)."""
    final = Path(filepath)
    tmp = final.with_name(final.name + ".tmp")
    if trainer.is_global_zero:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)  # a stale half-written one from a crash
    trainer.strategy.barrier("vlmtrain.save_atomically.start")
    trainer.save_checkpoint(tmp, weights_only)
    if trainer.is_global_zero:
        publish(tmp, final)
    trainer.strategy.barrier("vlmtrain.save_atomically.end")


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, writing through ``save_atomically``."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        save_atomically(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def save_last_now(self, trainer: pl.Trainer) -> Path:
        path = Path(self.dirpath) / LAST
        self._save_checkpoint(trainer, str(path))
        self.last_model_path = str(path)
        return path


class Preemption(Callback):
    """Save ``last.ckpt`` and stop at the next step boundary after SIGUSR1 / SIGTERM; requeue
    the Slurm job on SIGUSR1 (the time-limit warning)."""

    def __init__(self, checkpoint: AtomicModelCheckpoint, requeue_signal: int = signal.SIGUSR1,
                 stop_signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.checkpoint = checkpoint
        self.requeue_signal = requeue_signal
        self.stop_signals = stop_signals
        self.received: set[int] = set()

    def _handler(self, signum, frame) -> None:
        self.received.add(signum)  # only record: the work happens at the step boundary

    def _install(self) -> None:
        for sig in (self.requeue_signal, *self.stop_signals):
            signal.signal(sig, self._handler)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._install()

    def on_train_start(self, trainer, pl_module) -> None:
        self._install()  # again: Lightning installs its own handlers between setup and here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requeue, stop = self.requeue_signal in self.received, bool(self.received & set(self.stop_signals))
        if trainer.world_size > 1:  # every rank stops at the same step, whichever got the signal
            flags = torch.tensor([float(requeue), float(stop)], device=pl_module.device)
            requeue, stop = (bool(x > 0) for x in trainer.strategy.reduce(flags, reduce_op="sum"))
        # (one process: the host's flags alone, no device round trip that would stall every step)
        if not (requeue or stop):
            return
        path = self.checkpoint.save_last_now(trainer)
        # this step's metrics reach the loggers only after this hook, and the resumed run starts
        # after this step: send them now, or the curves would have a gap at every preemption
        trainer._logger_connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.save()
        requeued = False
        if requeue and trainer.is_global_zero:
            requeued = requeue_slurm_job()
        if trainer.world_size > 1:
            requeued = trainer.strategy.broadcast(requeued, src=0)  # every rank exits with one code
        message = (f"preempted at step {trainer.global_step}: saved {path}"
                   + (", job requeued" if requeued else f"; not finished (exit {PREEMPTED}): resume with resume=auto"))
        if trainer.is_global_zero:
            print(f"[vlmtrain] {message}", flush=True)
        raise Preempted(0 if requeued else PREEMPTED)


def requeue_slurm_job() -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        log.warning("SIGUSR1 outside Slurm: checkpoint saved, nothing to requeue")
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
        return False
    return True
