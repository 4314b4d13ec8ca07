"""Hydra multirun: `python -m vlmtrain -m optim.lr=1e-4,2e-4` runs both jobs on the tiny model,
each in its own directory with its own config, metrics, summary and checkpoint."""

import csv
import subprocess
import sys

import pytest
from omegaconf import OmegaConf


@pytest.mark.slow
def test_multirun_sweeps_lr_each_job_in_its_own_directory(tmp_path):
    sweep_dir = tmp_path / "multirun"
    r = subprocess.run(
        [sys.executable, "-m", "vlmtrain", "-m", "optim.lr=1e-4,2e-4", "stage.max_steps=2", "stage.global_batch_size=4",
         "data.num_workers=0",
         "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (sweep_dir / "multirun.yaml").is_file()
    peak_lr = {}
    for job, lr in (("0", 1e-4), ("1", 2e-4)):
        run = sweep_dir / job
        cfg = OmegaConf.load(run / "config.yaml")
        assert cfg.run_dir == str(run)  # ${hydra:runtime.output_dir} resolved per job
        assert cfg.optim.lr == lr and cfg.optim.optimizer.lr == lr
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "summary.json").is_file()
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        assert [int(row["step"]) for row in rows] == [0, 1]
        peak_lr[job] = max(float(row["train/lr/decay"]) for row in rows)
    # the optimizer really used each job's lr (same schedule, so the same ratio)
    assert peak_lr["1"] == pytest.approx(2 * peak_lr["0"], rel=1e-4)
