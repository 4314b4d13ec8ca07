"""The LLaVA (1.5 and NeXT's anyres) and MiniGPT-4 families under FSDP2 on two CPU ranks, packed: the same losses and
the same whole checkpoint as one process (the InternVL cases are tests/test_strategies.py)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from test_strategies import REPO, SMALL, _losses

from conftest import compose_config
from vlmtrain.training.run import train

CASES = {"llava": ["model=llava_tiny", "stage=llava_finetune"],
         "llava_next": ["model=llava_next_tiny", "stage=llava_next_finetune", "optim.lr=1e-3"],
         "minigpt4": ["model=minigpt4_tiny", "stage=minigpt4_stage2", "optim.lr=1e-3"]}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CASES))
def test_family_fsdp_two_cpu_ranks_packed_match_one_process(tmp_path, family):
    overrides = [*CASES[family], *SMALL, "data/collate=packed", "data.collate.max_tokens=1024"]
    single = train(compose_config(overrides, run_dir=tmp_path / "single"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLMTRAIN_CACHE": os.environ["VLMTRAIN_CACHE"]}
    cmd = [sys.executable, "-m", "vlmtrain", *overrides, "hardware=fsdp", "hardware.accelerator=cpu",
           "hardware.devices=2", "hardware.precision=32-true", "hardware.strategy.param_dtype=float32",
           f"hydra.run.dir={tmp_path / 'fsdp'}"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _losses(single), _losses(tmp_path / "fsdp")
    assert len(a) == len(b) == 2
    assert b[0] == pytest.approx(a[0], rel=1e-5)
    assert b[1] == pytest.approx(a[1], rel=1e-3)
    s = torch.load(single / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    f = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    f = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in f["state_dict"].items()}
    assert set(f) == set(s)
    for k, v in s.items():
        torch.testing.assert_close(f[k], v, rtol=2e-3, atol=2e-5, msg=k)


@pytest.mark.slow
def test_llava_next_deepspeed_zero3_two_cpu_ranks_match_one_process(tmp_path):
    """ZeRO-3 partitions image_newline, a parameter of no submodule's forward: its gather and its
    gradient still match one process (the anyres path, packed)."""
    pytest.importorskip("deepspeed")
    overrides = [*CASES["llava_next"], *SMALL, "stage.max_steps=3", "data/collate=packed",
                 "data.collate.max_tokens=2048", "trainer.checkpoint=false"]
    single = train(compose_config(overrides, run_dir=tmp_path / "single"))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "DS_ACCELERATOR": "cpu",
           "VLMTRAIN_CACHE": os.environ["VLMTRAIN_CACHE"]}
    cmd = [sys.executable, "-m", "vlmtrain", *overrides, "hardware=deepspeed_zero3", "hardware.accelerator=cpu",
           "hardware.devices=2", "hardware.precision=32-true", "hardware.strategy.config.bf16.enabled=false",
           "hardware.strategy._target_=cpu_deepspeed.CPUDeepSpeedStrategy", f"hydra.run.dir={tmp_path / 'ds'}"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _losses(tmp_path / "ds") == pytest.approx(_losses(single), rel=1e-5)
    norms = [[float(r["train/grad_norm"]) for r in csv.DictReader(open(d / "metrics.csv")) if r.get("train/loss")]
             for d in (single, tmp_path / "ds")]
    assert len(norms[0]) == 3 and norms[1] == pytest.approx(norms[0], rel=1e-4)
