"""Every YAML composes; typos and bad values fail at compose time naming the key."""

import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config
from vlmtrain.cli import CONFIG_DIR, command, use_schema
from vlmtrain.config import register_schemas

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
OPTIONS = [
    (group, f.stem)
    for group in GROUPS
    for f in sorted((CONFIG_DIR / group).glob("*.yaml"))
]


def test_groups_exist():
    assert {"model", "data", "stage", "optim", "hardware", "logger", "experiment"} <= set(GROUPS)


# groups that only another verb's root config names in its defaults (conf/<verb>.yaml)
VERB_OF_GROUP = {"filter": "filter"}


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_targets_bind(group, option, tmp_path):
    if group in VERB_OF_GROUP:
        cmd = command(VERB_OF_GROUP[group])
        use_schema(cmd)  # the verb's extended root schema, as its start-up stores it
        try:
            cfg = compose_config([f"{group}={option}", "out=x"], config_name=cmd.config_name)
        finally:
            register_schemas()
    else:
        cfg = compose_config([f"{group}={option}"], run_dir=tmp_path)
    from hydra._internal.utils import _locate

    def visit(node):
        if isinstance(node, dict):
            if "_target_" in node:
                _locate(node["_target_"])  # raises if the target does not import
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(OmegaConf.to_container(cfg, resolve=False))


def test_every_yaml_starts_with_a_comment_saying_what_it_is():
    for f in CONFIG_DIR.rglob("*.yaml"):
        first = f.read_text().splitlines()[0]
        if first.startswith("# @package"):
            first = f.read_text().splitlines()[1]
        assert first.startswith("#"), f"{f} does not start with a comment"


def test_loss_options_build_weightings(tmp_path):
    for name, power in [("token", 0.0), ("sample", 1.0), ("square", 0.5)]:
        w = instantiate(compose_config([f"loss={name}"], run_dir=tmp_path).loss)
        assert w.power == power


def test_defaults_are_the_recipe():
    cfg = compose_config(["data.datasets={}"])
    assert cfg.stage.name == "mlp_warmup" and cfg.loss.power == 0.5
    s1 = compose_config(["stage=mlp_warmup", "data.datasets={}"]).stage
    assert s1.lr == 2e-4 and s1.trainable == ["multi_modal_projector"]


def test_typo_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["stage.lrr=1"])
    assert "lrr" in str(e.value.__cause__) or "lrr" in str(e.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["stage.lr=fast"])
    assert "stage.lr" in str(e.value.__cause__)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "vlmtrain", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_bad_override_is_one_clear_line(tmp_path):
    r = _cli("stage.lrr=1", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode != 0
    assert "Key 'lrr' not in 'StageConfig'" in r.stderr and "full_key: stage.lrr" in r.stderr


def test_cli_missing_data_path_names_the_key_and_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    r = _cli(f"data.datasets.shapes.path={missing}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode != 0
    assert f"data.datasets.shapes.path: {missing} does not exist" in r.stderr


def test_cli_prints_composed_config(tmp_path):
    r = _cli("--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "name: mlp_warmup" in r.stdout and "multi_modal_projector" in r.stdout


def test_dataset_added_from_the_command_line(tmp_path):
    """`(+)data.datasets.NAME.path=...` adds a dataset; its other settings get DatasetConfig's defaults."""
    from vlmtrain.config import DatasetConfig
    from vlmtrain.data.mixture import dataset_configs

    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nhi"}, '
                     '{"from": "gpt", "value": "hello"}]}\n')
    cfg = compose_config([f"+data.datasets.extra.path={extra}", "+data.datasets.extra.repeat=2",
                          f"data.datasets.other.path={extra}", "data.datasets.shapes.min_tiles=2"])  # + optional
    configs = dataset_configs(cfg.data.datasets)
    assert set(configs) == {"shapes", "extra", "other"}
    assert configs["extra"] == DatasetConfig(path=str(extra), repeat=2.0)
    assert configs["other"] == DatasetConfig(path=str(extra)) and configs["shapes"].min_tiles == 2
    assert configs["shapes"].n_max == cfg.data.datasets.shapes.n_max


@pytest.mark.parametrize("override, key", [("+data.datasets.extra.nmax=3", "data.datasets.extra.nmax"),
                                           ("+data.datasets.extra.n_max=many", "data.datasets.extra.n_max"),
                                           ("+data.datasets.extra.repeat=2", "data.datasets.extra.path")])
def test_bad_dataset_entry_names_the_key(override, key):
    from vlmtrain.data.mixture import dataset_configs

    cfg = compose_config([override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        dataset_configs(cfg.data.datasets)


@pytest.mark.parametrize("stage", ["mlp_warmup", "vit_incremental", "instruction_tuning"])
def test_learning_proof_experiment_composes(stage, tmp_path, monkeypatch):
    """experiments/learning_proof/run.py composes these; the loader keys reach the collator and loader."""
    from vlmtrain.data.packing import PackedStepCollator

    monkeypatch.setenv("LEARNING_PROOF_DATA", str(tmp_path))
    cfg = compose_config(["experiment=learning_proof", f"stage={stage}", "stage.max_epochs=-1", "stage.max_steps=60",
                          "trainer.max_time=00:00:05:00"], run_dir=tmp_path / "run")
    assert cfg.data.persistent_workers is True and cfg.data.prefetch_factor == 4
    assert cfg.stage.global_batch_size == 256 and cfg.stage.drop_path == 0.0 and cfg.stage.name == stage
    assert cfg.data.datasets.shapes.path == f"{tmp_path}/annotations.jsonl"
    collate = instantiate(cfg.data.collate, pad_id=0, tile_size=cfg.data.tile_size)
    assert isinstance(collate, PackedStepCollator) and (collate.max_tokens, collate.max_tiles) == (65536, 640)
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_keeps_workers_and_prefetch_when_asked(workers, tmp_path):
    from vlmtrain.models.build import load_tokenizer
    from vlmtrain.training.datamodule import VLMDataModule

    cfg = compose_config([f"data.num_workers={workers}", "data.persistent_workers=true", "data.prefetch_factor=3"])
    dm = VLMDataModule(cfg.data, load_tokenizer(cfg.model), 64, cfg.stage.global_batch_size, cfg.seed)
    dm.setup()
    loader = dm.train_dataloader()
    # with no workers the two keys mean nothing (and DataLoader rejects them): they are left out
    assert loader.persistent_workers is bool(workers) and loader.prefetch_factor == (3 if workers else None)
