"""The LLaVA (1.5 and NeXT's anyres) and MiniGPT-4 families under FSDP2 on two CPU ranks, packed: the same losses and
the same whole checkpoint as one process (the InternVL cases are tests/test_strategies.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_strategies import REPO, SMALL, _losses, deepspeed_two_ranks_match_one_process

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
    deepspeed_two_ranks_match_one_process(tmp_path, [*CASES["llava_next"], *SMALL, "stage.max_steps=3",
                                                     "data/collate=packed", "data.collate.max_tokens=2048",
                                                     "trainer.checkpoint=false"])
