"""Exact resume: a run killed mid-epoch and resumed sees each remaining step's data exactly once and,
on the CPU, reproduces the uninterrupted run's loss curve; checkpoints are written atomically."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import REPO, compose_config
from vlmtrain.models.run_checkpoint import find_resume_checkpoint
from vlmtrain.training.checkpointing import PREEMPTED
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

    def with_recorder(cfg, rd, *rest):
        trainer = real(cfg, rd, *rest)
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
        train(compose_config([*overrides, "stage.max_steps=3", "resume=auto", "resume_changes=[stage.max_steps]"],
                             run_dir=run_dir))
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
    """SIGTERM mid-step: the step finishes, last.ckpt is written, the run stops (exit PREEMPTED, 75); the resumed
    run's metrics.csv then holds every step once, with the uninterrupted run's losses (the stopped
    step's row used to be lost: its metrics reach the loggers only after the hook that stops)."""
    short = [*COMMON, "stage.max_epochs=1", "trainer.log_every_n_steps=1"]
    _run(monkeypatch, short, tmp_path / "full", Recorder([]))
    with pytest.raises(SystemExit) as stopped:
        _run(monkeypatch, short, tmp_path / "cut", SignalAt(1))
    assert stopped.value.code == PREEMPTED
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    _run(monkeypatch, [*short, "resume=auto"], tmp_path / "cut", Recorder([]))
    full = _logged_losses(tmp_path / "full")
    assert [s for s, _ in full] == [0, 1, 2, 3]
    assert _logged_losses(tmp_path / "cut") == full


# -- epoch ends, in processes of their own: a real kill -9, a real SIGTERM to the process group ------

DRIVER = Path(__file__).with_name("resume_driver.py")
# 16 samples, 4 steps per epoch, 2 epochs; a loader worker, as in a real run: with workers the loader
# draws its indices when its iterator is created, which is what lost the epoch after an epoch-end
# checkpoint (the resumed trainer reused the iterator it had made for the finished epoch)
EPOCH_RUN = [o for o in COMMON if not o.startswith("data.num_workers")] + ["data.num_workers=1", "trainer.log_every_n_steps=1"]


def _drive(run_dir, *args, expect):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, str(DRIVER), str(run_dir), *args, *EPOCH_RUN], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=300, start_new_session=True)  # its own process group
    assert p.returncode == expect, (p.returncode, p.stdout[-2000:], p.stderr[-4000:])
    return p


def _steps(run_dir):
    return [json.loads(line) for line in open(run_dir / "steps.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    _drive(run_dir, expect=0)
    steps = _steps(run_dir)
    assert [s["step"] for s in steps] == list(range(1, 9)) and [s["epoch"] for s in steps] == [0] * 4 + [1] * 4
    return run_dir, steps


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--kill9", "--group-sigterm"])
@pytest.mark.parametrize("at", [4, 5], ids=["last_step_of_epoch", "first_step_of_next"])
def test_resume_at_epoch_end_equals_uninterrupted(tmp_path, uninterrupted, how, at):
    """Stopped right after the last step of an epoch or the first of the next, by kill -9 (the
    periodic checkpoint) or by SIGTERM to the whole process group (the preemption checkpoint): the
    resumed run trains every remaining step once, on the same data, with bit-equal losses."""
    full_dir, full = uninterrupted
    cut = tmp_path / "cut"
    _drive(cut, how, str(at), expect=-signal.SIGKILL if how == "--kill9" else PREEMPTED)
    assert [s["step"] for s in _steps(cut)] == list(range(1, at + 1))
    assert torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == at
    _drive(cut, "resume=auto", expect=0)
    assert _steps(cut) == full  # step, epoch, data hash, loss: all equal
    a = torch.load(full_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert b["global_step"] == a["global_step"] == 8
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert _logged_losses(cut) == _logged_losses(full_dir)


class _Dispositions(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return [int(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGUSR1)]


def test_loader_workers_ignore_preemption_signals(tmp_path):
    """A scheduler signals the whole process group: the workers must not die of it before the main
    process has saved (the main process alone handles it)."""
    from vlmtrain.training.datamodule import init_loader_worker

    loader = torch.utils.data.DataLoader(_Dispositions(), batch_size=None, num_workers=1, worker_init_fn=init_loader_worker)
    assert next(iter(loader)) == [int(signal.SIG_IGN)] * 2
    # and the training loader is built with it
    from vlmtrain.models.build import load_tokenizer
    from vlmtrain.training.datamodule import VLMDataModule

    cfg = compose_config(["data.datasets.shapes.n_max=1"], run_dir=tmp_path)
    dm = VLMDataModule(cfg.data, load_tokenizer(cfg.model), 64, cfg.stage.global_batch_size, 0)
    dm.setup()
    assert dm.train_dataloader().worker_init_fn.func is init_loader_worker


def test_sigusr1_outside_slurm_exits_preempted(tmp_path, monkeypatch):
    """SIGUSR1 (the time-limit warning) outside Slurm: saved, nothing requeued, so the run is not
    finished and must not exit 0."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)

    class Usr1At(SignalAt):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.at:
                os.kill(os.getpid(), signal.SIGUSR1)

    overrides = ["stage.max_steps=3", "data.num_workers=0", "data.datasets.shapes.n_max=1", "trainer.enable_progress_bar=false"]
    with pytest.raises(SystemExit) as stopped:
        _run(monkeypatch, overrides, tmp_path / "run", Usr1At(0))
    assert stopped.value.code == PREEMPTED == 75
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 1


def test_periodic_checkpoints_are_on_by_default(tmp_path):
    """Without checkpoint_every_n_steps, last.ckpt is still written every 30 minutes of training, so
    a kill -9 never loses the whole run."""
    from datetime import timedelta

    from vlmtrain.training.checkpointing import AtomicModelCheckpoint

    def trigger(overrides):
        trainer = build_trainer(compose_config(overrides, run_dir=tmp_path), tmp_path)
        (ckpt,) = [c for c in trainer.callbacks if isinstance(c, AtomicModelCheckpoint)]
        return ckpt._every_n_train_steps, ckpt._train_time_interval

    assert trigger([]) == (0, timedelta(minutes=30))
    assert trigger(["trainer.checkpoint_every_n_steps=5"]) == (5, None)
    assert trigger(["trainer.checkpoint_every_minutes=0"]) == (0, None)


def test_resume_auto_continues_with_the_runs_own_config(tmp_path):
    """`resume=auto` without the original overrides used to rewrite config.yaml (max_steps 30 -> -1)
    and train another run; now the run's own values come back, and an override that would change
    the run is refused, naming it, unless resume_changes lists it."""
    from vlmtrain.errors import UserError
    from vlmtrain.training.resume_config import restore_run_config
    from vlmtrain.training.tracking import save_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(compose_config(["stage.max_steps=30", "stage.lr=1e-3"], run_dir=run_dir), run_dir / "config.yaml")
    again = compose_config(["resume=auto", "data.num_workers=0"], run_dir=run_dir)  # as typed on the command line
    restored = restore_run_config(again, run_dir, named=["resume", "data.num_workers"])
    assert restored.stage.max_steps == 30 and restored.stage.lr == 1e-3 and restored.data.num_workers == 0
    changing = compose_config(["resume=auto", "stage.max_steps=50"], run_dir=run_dir)
    with pytest.raises(UserError, match=r"would change the run: stage.max_steps \(30 -> 50\).*resume_changes"):
        restore_run_config(changing, run_dir, named=["resume", "stage.max_steps"])
    on_purpose = compose_config(["resume=auto", "stage.max_steps=50", "resume_changes=[stage.max_steps]"], run_dir=run_dir)
    restored = restore_run_config(on_purpose, run_dir, named=["resume", "stage.max_steps", "resume_changes"])
    assert restored.stage.max_steps == 50 and restored.stage.lr == 1e-3
