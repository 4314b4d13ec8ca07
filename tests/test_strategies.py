"""Every hardware option composes and builds its strategy; FSDP2 and DeepSpeed ZeRO-2/3 on two CPU
processes (fp32) train stage mlp_warmup (only the projector trains) and instruction_tuning with the
single process's losses, also when packing gives the ranks different numbers of micro-batches."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from conftest import REPO, compose_config
from vlmtrain.training.run import train

HARDWARE = sorted(p.stem for p in (REPO / "conf" / "hardware").glob("*.yaml"))


def test_the_hardware_group_has_every_strategy():
    assert {"cpu", "gpu", "ddp", "fsdp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3",
            "deepspeed_zero1_offload", "deepspeed_zero2_offload", "deepspeed_zero3_offload"} <= set(HARDWARE)


@pytest.mark.parametrize("option", HARDWARE)
def test_hardware_option_builds_its_strategy(option):
    hw = compose_config([f"hardware={option}", "data.datasets={}"]).hardware
    if not isinstance(hw.strategy, DictConfig):
        assert hw.strategy == "auto"
        return
    if "deepspeed" in option:
        pytest.importorskip("deepspeed")
    strategy = instantiate(hw.strategy)
    if "deepspeed" in option:
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == int(option[len("deepspeed_zero")])
        assert strategy.config["gradient_clipping"] == 1.0  # optim.grad_clip, clipped by the engine
        assert ("offload_optimizer" in zero) == option.endswith("_offload")
        assert isinstance(strategy.config, dict)  # plain containers, as DeepSpeed needs


def _losses(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def _assert_same_adapter(expected: Path, run: Path, rtol: float, atol: float) -> None:
    from safetensors.torch import load_file

    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (expected, run))
    assert set(a) == set(b) and any("lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol, msg=k)


SMALL = ["stage.max_steps=2", "stage.drop_path=0",  # drop path draws per rank: off, to compare weights
         "data.num_workers=0", "data.datasets.shapes.n_max=1", "stage.warmup_steps=1",
         "trainer.enable_progress_bar=false"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["mlp_warmup", "vit_incremental", "instruction_tuning", "lora"])
def test_fsdp_two_cpu_ranks_match_one_process(tmp_path, stage):
    # LoRA dropout draws per rank, like drop path: off, to compare weights
    small = [*SMALL, "stage.lora.dropout=0"] if stage == "lora" else SMALL
    single = train(compose_config([f"stage={stage}", *small], run_dir=tmp_path / "single"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLMTRAIN_CACHE": os.environ["VLMTRAIN_CACHE"]}
    cmd = [sys.executable, "-m", "vlmtrain", f"stage={stage}", *small, "hardware=fsdp",
           "hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true",
           "hardware.strategy.param_dtype=float32", f"hydra.run.dir={tmp_path / 'fsdp'}"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _losses(single), _losses(tmp_path / "fsdp")
    assert len(a) == len(b) == 2
    # same data, same init, loss normalised over the whole step on both ranks: the same loss
    assert b[0] == pytest.approx(a[0], rel=1e-5)
    assert b[1] == pytest.approx(a[1], rel=1e-3)
    # the checkpoint is whole: every tensor, at full shape, and frozen parts unchanged
    s = torch.load(single / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    f = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    f = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in f["state_dict"].items()}
    assert set(f) == set(s)
    for k, v in s.items():
        assert f[k].shape == v.shape, k
        torch.testing.assert_close(f[k], v, rtol=2e-3, atol=2e-5, msg=k)
    if stage == "lora":  # the adapter file is gathered from the shards: the single run's tensors
        _assert_same_adapter(single, tmp_path / "fsdp", rtol=2e-3, atol=2e-5)


def test_steps_pad_to_the_same_micro_batch_count():
    from vlmtrain.data.collate import Step, zero_weight_batch

    step = Step(micro_batches=[zero_weight_batch(7, 28, packed=True)])
    step.micro_batches[0].zero_weight = False  # stands in for a real packed micro-batch
    step.pad_to(3)
    assert len(step.micro_batches) == 3
    filler = step.micro_batches[-1]
    assert filler.zero_weight and filler.packed and filler.dummy_vision
    assert filler.pixel_values.shape == (1, 3, 28, 28)
    assert int(filler.num_supervised.sum()) == 0 and filler.datasets == []
    assert (filler.labels != -100).sum() == 1  # one supervised position: the LM head runs in backward


@pytest.mark.slow
def test_fsdp_packed_with_uneven_micro_batch_counts_matches_one_process(tmp_path):
    """A 550-token packing budget packs rank 0's samples of step 1 into 3 buffers and rank 1's into 2
    (steps 2, 3: 2 and 3): before the filler micro-batches this hung in the first step's collectives."""
    packed = ["stage.max_steps=3", "data/collate=packed", "data.collate.max_tokens=550"]
    single = train(compose_config(["stage=instruction_tuning", *SMALL, *packed], run_dir=tmp_path / "single"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLMTRAIN_CACHE": os.environ["VLMTRAIN_CACHE"]}
    cmd = [sys.executable, "-m", "vlmtrain", "stage=instruction_tuning", *SMALL, *packed, "hardware=fsdp",
           "hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true",
           "hardware.strategy.param_dtype=float32", "hardware.strategy.accumulate_unsharded=true",
           "trainer.checkpoint=false", f"hydra.run.dir={tmp_path / 'fsdp'}"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _losses(single), _losses(tmp_path / "fsdp")
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=1e-5)


def deepspeed_two_ranks_match_one_process(tmp_path, overrides: list[str], zero: int = 3, steps: int = 3):
    """Train ``overrides`` in this process (``tmp_path/single``), then under DeepSpeed ZeRO-``zero``
    on two CPU ranks (tests/cpu_deepspeed.py, fp32; ``tmp_path/ds``), and hold the second to the
    first: the same losses and grad norms (the whole step's gradient), step by step. Returns the
    single run's directory."""
    pytest.importorskip("deepspeed")
    single = train(compose_config(overrides, run_dir=tmp_path / "single"))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "DS_ACCELERATOR": "cpu",
           "VLMTRAIN_CACHE": os.environ["VLMTRAIN_CACHE"]}
    cmd = [sys.executable, "-m", "vlmtrain", *overrides, f"hardware=deepspeed_zero{zero}",
           "hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true",
           "hardware.strategy.config.bf16.enabled=false", "hardware.strategy._target_=cpu_deepspeed.CPUDeepSpeedStrategy",
           f"hydra.run.dir={tmp_path / 'ds'}"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _losses(single), _losses(tmp_path / "ds")
    assert len(a) == len(b) == steps
    assert b == pytest.approx(a, rel=1e-5)
    norms = [[float(r["train/grad_norm"]) for r in csv.DictReader(open(d / "metrics.csv")) if r.get("train/loss")]
             for d in (single, tmp_path / "ds")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)
    return single


@pytest.mark.slow
@pytest.mark.parametrize("zero, stage", [(3, "instruction_tuning"), (3, "mlp_warmup"), (2, "instruction_tuning"),
                                         (3, "lora")])
def test_deepspeed_two_cpu_ranks_match_one_process(tmp_path, zero, stage):
    """Lightning's DeepSpeedStrategy (through tests/cpu_deepspeed.py, which lets it run on CPU ranks) with
    ZeRO-2/3 (ZeRO-1 shares ZeRO-2's optimizer class; it passed too, left out for time), fp32, packed buffers with uneven micro-batch counts per rank: the single process's
    losses and grad norms, step by step. With fp32 everywhere, any gap is a strategy bug, not rounding:
    ZeRO-3 once kept only each step's last micro-batch's gradients."""
    packed = ["stage.max_steps=3", "data/collate=packed", "data.collate.max_tokens=550", "trainer.checkpoint=false"]
    if stage == "lora":
        packed.append("stage.lora.dropout=0")  # drawn per rank
    single = deepspeed_two_ranks_match_one_process(tmp_path, [f"stage={stage}", *SMALL, *packed], zero)
    if stage == "lora":  # the adapter file is gathered from ZeRO-3's partitions: the single run's tensors
        _assert_same_adapter(single, tmp_path / "ds", rtol=1e-4, atol=1e-6)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # what a crafted checkpoint does: run code when unpickled
        return (open, (self.marker, "w"))


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_resume_reads_the_folder_with_weights_only(tmp_path, zero):
    """resume=auto of a DeepSpeed run: the engine's checkpoint loads (weights_only=False in DeepSpeed)
    read every shard with weights_only. A real folder resumes (the safe types suffice); one whose model
    states hold a pickled payload is refused with a one-line error and the payload never runs."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "DS_ACCELERATOR": "cpu",
           "VLMTRAIN_CACHE": os.environ["VLMTRAIN_CACHE"]}
    run = tmp_path / "ds"
    cmd = [sys.executable, "-m", "vlmtrain", "stage=instruction_tuning", *SMALL, f"hardware=deepspeed_zero{zero}",
           "hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true",
           "hardware.strategy.config.bf16.enabled=false", "hardware.strategy._target_=cpu_deepspeed.CPUDeepSpeedStrategy",
           f"hydra.run.dir={run}"]

    def vlmtrain(*extra):
        return subprocess.run([*cmd, *extra], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    out = vlmtrain("stage.max_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    states = sorted((run / "checkpoints" / "last.ckpt" / "checkpoint").glob("*model_states.pt"))
    assert len(states) == (2 if zero == 3 else 1)  # ZeRO-3 keeps one per rank
    out = vlmtrain("stage.max_steps=3", "resume=auto", "resume_changes=[stage.max_steps]")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_losses(run)) == 3  # two steps, then one more after the resume

    marker = tmp_path / "pwned"
    for path in states:  # every rank reads its own
        client = torch.load(path, map_location="cpu", weights_only=False)
        client["x"] = _Payload(str(marker))
        torch.save(client, path)
    out = vlmtrain("stage.max_steps=4", "resume=auto", "resume_changes=[stage.max_steps]")
    assert out.returncode != 0
    assert "refused" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


@pytest.mark.parametrize("hardware", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
@pytest.mark.parametrize("stage", ["mlp_warmup", "instruction_tuning"])
def test_scaleout_experiment_composes_and_builds(hardware, stage):
    """What experiments/bench/scaleout.py runs on 2 GPUs: composes, the strategy builds, the stage
    freezes the right parts of the 1B architecture, and one epoch of the packed demo data holds the run."""
    from vlmtrain.data.mixture import MixtureDataset
    from vlmtrain.models.build import apply_stage, load_tokenizer
    from vlmtrain.models.internvl import build_from_config, tokens_per_tile

    if "deepspeed" in hardware:
        pytest.importorskip("deepspeed")
    cfg = compose_config(["experiment=scaleout_internvl2_5_1b", f"hardware={hardware}", f"stage={stage}",
                          "hardware.devices=2"])
    assert cfg.data.collate._target_.endswith("PackedStepCollator") and cfg.data.collate.max_tokens == 16384
    strategy = instantiate(cfg.hardware.strategy)
    if "deepspeed" in hardware:
        assert strategy.config["bf16"]["enabled"] and "optimizer" not in strategy.config  # torch AdamW, no JIT op
    tokenizer = load_tokenizer(cfg.model)
    model = build_from_config(cfg.model, tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), device="meta")
    trainable = apply_stage(model, cfg.stage, on_meta=True)
    parts = {name.split(".")[1] if name.startswith("model.") else name.split(".")[0] for name in trainable}
    assert parts == ({"multi_modal_projector"} if stage == "mlp_warmup"
                     else {"vision_tower", "multi_modal_projector", "language_model", "lm_head"})
    assert 0.9e9 < sum(p.numel() for p in model.parameters()) < 1.0e9
    v = cfg.model.vision
    data = MixtureDataset(cfg.data, tokenizer, tokens_per_tile(v.image_size, v.patch_size, cfg.model.downsample_ratio),
                          cfg.seed)
    assert len(data) // cfg.stage.global_batch_size >= cfg.stage.max_steps  # no epoch restart inside the run
    assert cfg.stage.global_batch_size % 2 == 0 and cfg.stage.warmup_steps >= cfg.stage.max_steps
