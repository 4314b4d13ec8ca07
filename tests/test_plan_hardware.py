"""`vlmtrain plan` asks the strategy for its sharding: for every file in conf/hardware/ (FSDP on one
and two nodes) the plan's ZeRO stage, shard group and offload are what the file names, equal what the
built strategy does (DeepSpeed's config, the mesh FSDP2 builds), and its memory numbers follow."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig

from conftest import REPO, compose_config
from vlmtrain.cli import command, use_schema
from vlmtrain.config import register_schemas
from vlmtrain.training.plan import BYTES, plan, report
from vlmtrain.training.strategies import FSDP2Strategy, Sharding

PER_NODE = 8

# file (and nodes) -> (ZeRO stage, shard group, optimizer offload, weight offload, DeepSpeed)
EXPECTED = {
    ("cpu", 1): (0, 8, False, False, False),
    ("gpu", 1): (0, 8, False, False, False),
    ("ddp", 1): (0, 8, False, False, False),
    ("ddp", 2): (0, 16, False, False, False),
    ("deepspeed_zero1", 1): (1, 8, False, False, True),
    ("deepspeed_zero1_offload", 1): (1, 8, True, False, True),
    ("deepspeed_zero2", 1): (2, 8, False, False, True),
    ("deepspeed_zero2_offload", 1): (2, 8, True, False, True),
    ("deepspeed_zero3", 1): (3, 8, False, False, True),
    ("deepspeed_zero3", 2): (3, 16, False, False, True),
    ("deepspeed_zero3_offload", 1): (3, 8, True, True, True),
    ("fsdp", 1): (3, 8, False, False, False),
    ("fsdp", 2): (3, 8, False, False, False),  # hybrid: shards within a node, replicates across nodes
}


def test_every_hardware_file_is_planned():
    assert {f for f, _ in EXPECTED} == {p.stem for p in (REPO / "conf" / "hardware").glob("*.yaml")}


def _plan_config(overrides):
    cmd = command("plan")
    use_schema(cmd)
    try:
        return compose_config(overrides, config_name=cmd.config_name)
    finally:
        register_schemas()


def _fsdp_mesh_shard_size(strategy: FSDP2Strategy, num_nodes: int, monkeypatch) -> int:
    """The shard dimension of the mesh FSDP2Strategy.sharding_mesh builds on num_nodes x PER_NODE ranks."""
    import torch.distributed.device_mesh as dm

    shapes = []
    monkeypatch.setattr(dm, "init_device_mesh", lambda device, shape, mesh_dim_names: shapes.append(shape) or shape)
    strategy.num_nodes = num_nodes
    strategy.parallel_devices = [None] * PER_NODE

    class World:  # the 1D "data_parallel" mesh over all ranks
        def __getitem__(self, name):
            assert name == "data_parallel"
            return (strategy.num_nodes * strategy.num_processes,)

    strategy._device_mesh = World()
    monkeypatch.setattr(type(strategy), "root_device", property(lambda self: __import__("torch").device("cpu")))
    mesh = strategy.sharding_mesh()
    return mesh[-1]


@pytest.mark.parametrize("option, nodes", sorted(EXPECTED), ids=[f"{o}-{n}node" for o, n in sorted(EXPECTED)])
def test_plan_matches_the_strategy(option, nodes, monkeypatch):
    cfg = _plan_config([f"hardware={option}", f"hardware.devices={PER_NODE}", f"hardware.num_nodes={nodes}"])
    result = plan(cfg)
    sh: Sharding = result["sharding"]
    stage, ranks, opt_offload, param_offload, deepspeed = EXPECTED[option, nodes]
    assert (sh.zero_stage, sh.shard_ranks, sh.optimizer_offload, sh.param_offload, sh.deepspeed) == (
        stage, ranks, opt_offload, param_offload, deepspeed)

    # what the built strategy does
    spec = cfg.hardware.strategy
    if isinstance(spec, DictConfig):
        if deepspeed:
            pytest.importorskip("deepspeed")
        strategy = instantiate(spec)
        if deepspeed:
            zero = strategy.config["zero_optimization"]
            assert zero["stage"] == sh.zero_stage
            assert ("offload_optimizer" in zero) == sh.optimizer_offload
            assert ("offload_param" in zero) == sh.param_offload
        elif isinstance(strategy, FSDP2Strategy):
            assert _fsdp_mesh_shard_size(strategy, nodes, monkeypatch) == sh.shard_ranks
            assert strategy.reshard_after_forward == (sh.zero_stage == 3)
        else:
            assert sh.zero_stage == 0  # DDP: a whole copy per rank
    else:
        assert spec == "auto" and sh.zero_stage == 0

    # the memory per GPU follows from it
    b = BYTES["deepspeed"] if deepspeed else BYTES["mixed" if str(cfg.hardware.precision).endswith("mixed") else "fp32"]
    assert result["bytes"] == b
    total, trainable, mem = result["total"], result["trainable"], result["memory"]
    weights = total * b.weight / (ranks if stage >= 3 else 1)
    assert mem["weights"] == pytest.approx(0.0 if param_offload else weights)
    assert mem["cpu_weights"] == pytest.approx(weights if param_offload else 0.0)
    assert mem["gradients"] == pytest.approx(trainable * b.grad / (ranks if stage >= 2 else 1))
    optim = trainable * b.optim / (ranks if stage >= 1 else 1)
    assert mem["optimizer"] == pytest.approx(0.0 if opt_offload else optim)
    assert mem["cpu_optimizer"] == pytest.approx(optim if opt_offload else 0.0)
    assert f"ZeRO-{stage} over {ranks} ranks" in report(cfg, result)


@pytest.mark.parametrize("name, expected", [("deepspeed_stage_1", (1, False)), ("deepspeed_stage_3_offload", (3, True)),
                                            ("fsdp", (3, False)), ("ddp", (0, False)), ("auto", (0, False))])
def test_plan_asks_lightning_strategy_names_too(name, expected):
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    cfg = _plan_config(["hardware=gpu", "hardware.devices=8", f"hardware.strategy={name}"])
    sh = plan(cfg)["sharding"]
    assert (sh.zero_stage, sh.optimizer_offload) == expected and sh.shard_ranks == 8


def test_fsdp_options_change_the_plan():
    cfg = _plan_config(["hardware=fsdp", "hardware.devices=4", "hardware.num_nodes=2",
                        "hardware.strategy.hybrid=false", "hardware.strategy.reshard_after_forward=false",
                        "hardware.strategy.cpu_offload=true"])
    sh = plan(cfg)["sharding"]
    assert (sh.zero_stage, sh.shard_ranks, sh.optimizer_offload, sh.param_offload) == (2, 8, True, True)
