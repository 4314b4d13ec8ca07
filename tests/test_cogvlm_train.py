"""CogVLM end to end on the CPU: the tiny model through its two stages on the demo data with no
other overrides (`python -m vlmtrain model=cogvlm_tiny stage=cogvlm_pretrain`, then
`stage=cogvlm_sft init_from=<pretrain run>`), the loss falls, the recipe's freezing holds, and an
export reloads (vlmtrain's own loader) with the same logits."""

import csv

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from vlmtrain.models.checkpoint import load_trained
from vlmtrain.models.export import export
from vlmtrain.training.run import train


def _losses(run_dir):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_cogvlm_tiny_trains_through_its_stages_and_exports(tmp_path):
    s1 = train(compose_config(["model=cogvlm_tiny", "stage=cogvlm_pretrain"], run_dir=tmp_path / "s1"))
    s2 = train(compose_config(["model=cogvlm_tiny", "stage=cogvlm_sft", f"init_from={s1}"], run_dir=tmp_path / "s2"))
    for run in (s1, s2):
        losses = _losses(run)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    w1, w2 = _weights(s1), _weights(s2)
    vit = "model.model.vision.transformer.layers.0.mlp.fc1.weight"
    adapter = "model.model.vision.linear_proj.gate_proj.weight"
    lang = "model.model.layers.0.self_attn.language_expert_query_key_value.weight"
    expert = "model.model.layers.0.self_attn.vision_expert_query_key_value.weight"
    expert_mlp = "model.model.layers.1.mlp.vision_mlp.down_proj.weight"
    # pretraining trained the expert away from its copy of the language weights; the LLM stayed frozen
    assert not torch.equal(w1[expert], w1[lang])
    # SFT: the ViT (frozen in pretraining), adapter and expert move; the LLM never does
    assert not torch.equal(w2[vit], w1[vit])
    for k in (adapter, expert, expert_mlp):
        assert not torch.equal(w2[k], w1[k]), k
    assert torch.equal(w2[lang], w1[lang])
    # SFT's ViT trains at a tenth of the lr (the paper's recipe), in its own parameter groups
    ckpt = torch.load(s2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    groups = {g["name"]: g["initial_lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert groups["vision_tower/decay"] == pytest.approx(0.1 * groups["decay"]) and groups["decay"] == 1e-5

    # export -> vlmtrain's loader -> the same logits as the run's own model
    out = tmp_path / "exported"
    export(OmegaConf.create({"ckpt": str(s2), "out": str(out), "dtype": None, "max_tiles": 1}))
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    run, exported = load_trained(s2), load_trained(out)
    ids = torch.tensor([[run.model.config.image_token_id] * 66 + [40, 41, 42, 43]])
    pixels = torch.randint(0, 256, (1, 3, 112, 112), dtype=torch.uint8)
    with torch.no_grad():
        a = run.model(input_ids=ids, pixel_values=pixels).logits
        b = exported.model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


SMALL = ["model=cogvlm_tiny", "stage=cogvlm_sft", "stage.max_steps=2", "data.num_workers=0", "stage.warmup_steps=1",
         "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_cogvlm_fsdp_two_cpu_ranks_match_one_process(tmp_path):
    """FSDP2 over 2 CPU ranks (CogVLM's layers as units; boi/eoi and the position embedding gathered
    through their modules' forwards): the single process's losses and final weights."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    single = train(compose_config(SMALL, run_dir=tmp_path / "single"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLMTRAIN_CACHE": os.environ["VLMTRAIN_CACHE"]}
    cmd = [sys.executable, "-m", "vlmtrain", *SMALL, "hardware=fsdp", "hardware.accelerator=cpu", "hardware.devices=2",
           "hardware.precision=32-true", "hardware.strategy.param_dtype=float32", f"hydra.run.dir={tmp_path / 'fsdp'}"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _losses(single), _losses(tmp_path / "fsdp")
    assert len(a) == len(b) == 2
    assert b[0] == pytest.approx(a[0], rel=1e-5) and b[1] == pytest.approx(a[1], rel=1e-3)
    s, f = _weights(single), _weights(tmp_path / "fsdp")
    f = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in f.items()}
    assert set(f) == set(s)
    for k, v in s.items():
        torch.testing.assert_close(f[k], v, rtol=2e-3, atol=2e-5, msg=k)


@pytest.mark.slow
def test_cogvlm_deepspeed_zero3_two_cpu_ranks_match_one_process(tmp_path):
    """ZeRO-3 over 2 CPU ranks (tests/cpu_deepspeed.py), packed buffers with token types and uneven
    micro-batch counts per rank: the single process's losses and grad norms, step by step."""
    from test_strategies import deepspeed_two_ranks_match_one_process

    packed = [*SMALL, "stage.max_steps=3", "data/collate=packed", "data.collate.max_tokens=550", "trainer.checkpoint=false"]
    deepspeed_two_ranks_match_one_process(tmp_path, packed)


@pytest.mark.slow
def test_cogvlm_killed_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    """tests/test_resume.py's protocol on CogVLM (SFT: ViT, adapter and expert train, the ViT in its
    own lr groups): killed at step 2, resumed with resume=auto, the same data and losses bit for bit."""
    from test_resume import Killed, Recorder, _run

    common = ["model=cogvlm_tiny", "stage=cogvlm_sft", "stage.max_epochs=2", "data.num_workers=0",
              "stage.warmup_steps=3", "data.datasets.shapes.repeat=0.17", "stage.global_batch_size=4",
              "data.micro_batch_size=2", "trainer.checkpoint_every_n_steps=1", "trainer.enable_progress_bar=false"]
    full, first, second = [], [], []
    _run(monkeypatch, common, tmp_path / "full", Recorder(full))
    with pytest.raises(Killed):
        _run(monkeypatch, common, tmp_path / "cut", Recorder(first, kill_at=2))
    _run(monkeypatch, [*common, "resume=auto"], tmp_path / "cut", Recorder(second))
    resumed = first + second
    assert [(s, h) for s, h, _ in resumed] == [(s, h) for s, h, _ in full]
    assert [loss for _, _, loss in resumed] == [loss for _, _, loss in full]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
