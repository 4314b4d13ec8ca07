"""Exact resume: a run killed mid-epoch and resumed sees each remaining step's data exactly once and,
on the CPU, reproduces the uninterrupted run's loss curve; checkpoints are written atomically."""

import csv
import hashlib

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import compose_config
from vlmtrain.models.run_checkpoint import find_resume_checkpoint
from vlmtrain.training.run import build_trainer, train


class Killed(Exception):
    pass


class Recorder(Callback):
    """Records (global step, data hash, loss) of every step this process trains; optionally dies
    at the start of step `kill_at` (after the checkpoint of the step before it was written)."""

    def __init__(self, log, kill_at=None):
        self.rows, self.kill_at = log, kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            raise Killed()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        h = hashlib.sha1()
        for mb in batch.micro_batches:
            h.update(mb.input_ids.numpy().tobytes())
            h.update(mb.pixel_values.numpy().tobytes())
        loss = float(trainer.callback_metrics["train/loss"])
        self.rows.append((trainer.global_step, h.hexdigest(), loss))


def _run(monkeypatch, overrides, run_dir, recorder):
    real = build_trainer

    def with_recorder(cfg, rd, *args, **kwargs):  # train passes the logged config and extra callbacks too
        trainer = real(cfg, rd, *args, **kwargs)
        trainer.callbacks.insert(0, recorder)
        return trainer

    monkeypatch.setattr("vlmtrain.training.run.build_trainer", with_recorder)
    return train(compose_config(overrides, run_dir=run_dir))


def _logged_losses(run_dir):
    rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("train/loss")]
    return [(int(float(r["step"])), round(float(r["train/loss"]), 6)) for r in rows]


# vit_incremental: drop path draws random masks every step, so the RNG state must be restored too
COMMON = ["stage=vit_incremental", "stage.max_epochs=2", "data.num_workers=0", "stage.warmup_steps=3",
          "data.datasets.shapes.repeat=0.17", "data.datasets.shapes.n_max=1",  # 16 samples, 4 steps/epoch
          "stage.global_batch_size=4", "data.micro_batch_size=2", "trainer.checkpoint_every_n_steps=1", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    full = []
    _run(monkeypatch, COMMON, tmp_path / "full", Recorder(full))
    steps = [s for s, _, _ in full]
    assert steps == list(range(1, 9)), steps
    # the second epoch is a new order: its data differs from the first epoch's
    assert {h for _, h, _ in full[:4]}.isdisjoint({h for _, h, _ in full[4:]})
    kill_at = 2  # mid-way through the first epoch; the resumed run crosses the epoch boundary

    first = []
    with pytest.raises(Killed):
        _run(monkeypatch, COMMON, tmp_path / "cut", Recorder(first, kill_at=kill_at))
    assert [s for s, _, _ in first] == list(range(1, kill_at + 1))
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == kill_at
    assert ckpt["rng_states"] and "optimizer_states" in ckpt and "lr_schedulers" in ckpt

    second = []
    _run(monkeypatch, [*COMMON, "resume=auto"], tmp_path / "cut", Recorder(second))
    resumed = first + second
    # every step's data exactly once, in the same order: no replay, no gap
    assert [(s, h) for s, h, _ in resumed] == [(s, h) for s, h, _ in full]
    # and the same loss curve, bit for bit on the CPU
    assert [l for _, _, l in resumed] == [l for _, _, l in full]
    # metrics.csv continues across the restart: the same logged steps and losses as the full run's
    assert _logged_losses(tmp_path / "cut") == _logged_losses(tmp_path / "full")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    overrides = ["stage.max_steps=2", "data.num_workers=0", "data.datasets.shapes.n_max=1", "trainer.checkpoint_every_n_steps=1",
                 "trainer.enable_progress_bar=false"]
    train(compose_config(overrides, run_dir=run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    def torn_write(self, checkpoint, path, storage_options=None):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io.TorchCheckpointIO.save_checkpoint", torn_write)
    with pytest.raises(OSError, match="disk full"):
        train(compose_config([*overrides, "stage.max_steps=3", "resume=auto"], run_dir=run_dir))
    assert last.read_bytes() == before  # the torn write went to last.ckpt.tmp
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    assert find_resume_checkpoint("auto", run_dir) == last


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    assert find_resume_checkpoint("auto", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="resume: no checkpoint"):
        find_resume_checkpoint(str(tmp_path / "nope.ckpt"), tmp_path)


class SignalAt(Callback):
    """Sends this process SIGTERM (what ``scontrol requeue`` sends) while step ``at`` runs."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_preempted_run_resumes_with_every_step_logged(tmp_path, monkeypatch):
    """SIGTERM mid-step: the step finishes, last.ckpt is written, the run stops (exit 143); the resumed
    run's metrics.csv then holds every step once, with the uninterrupted run's losses (the stopped
    step's row used to be lost: its metrics reach the loggers only after the hook that stops)."""
    short = [*COMMON, "stage.max_epochs=1", "trainer.log_every_n_steps=1"]
    _run(monkeypatch, short, tmp_path / "full", Recorder([]))
    with pytest.raises(SystemExit) as stopped:
        _run(monkeypatch, short, tmp_path / "cut", SignalAt(1))
    assert stopped.value.code == 143
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    _run(monkeypatch, [*short, "resume=auto"], tmp_path / "cut", Recorder([]))
    full = _logged_losses(tmp_path / "full")
    assert [s for s, _ in full] == [0, 1, 2, 3]
    assert _logged_losses(tmp_path / "cut") == full
