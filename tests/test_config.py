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


# -- choices are Enums, ranges are checked right after compose ------------------------------------------

# (verb's root config, override, the key the error names, the enum of allowed values); every choice field
BAD_CHOICES = [
    ("config", "data.on_error=rais", "data.on_error", "OnError"),
    ("config", "data.too_long=trunc", "data.too_long", "TooLong"),
    ("config", "data.template=chatml", "data.template", "Template"),
    ("config", "model.template=chatml", "model.template", "Template"),
    ("config", "model.attention=flsh", "model.attention", "Attention"),
    ("config", "model.vision.norm_type=rmsnorm", "model.vision.norm_type", "NormType"),
    ("config", "model.init_dtype=bf16", "model.init_dtype", "DType"),
    ("config", "model.compile=[vit]", "model.compile[0]", "Part"),
    ("config", "stage.trainable=[vit]", "stage.trainable[0]", "Part"),
    ("config", "init_parts=[vit]", "init_parts[0]", "Part"),
    ("config", "stage=lora stage.lora.targets=[attention]", "stage.lora.targets[0]", "LoraTarget"),
    ("config", "hardware.precision=bf16-mix", "hardware.precision", "Precision"),
    ("config", "hardware.accelerator=gpus", "hardware.accelerator", "Accelerator"),
    ("config", "data.datasets.shapes.format=jsonl", "data.datasets.shapes.format", "DataFormat"),
    ("config", "data.datasets.shapes.template=chatml", "data.datasets.shapes.template", "Template"),
    ("eval", "ckpt=x dtype=bf16", "dtype", "DType"),
    ("chat", "ckpt=x dtype=half", "dtype", "DType"),
    ("export", "ckpt=x out=y dtype=fp16", "dtype", "DType"),
    ("filter", "out=x filter.merge=sometimes", "filter.merge", "vlmtrain.cli.filter.Merge"),
    ("config", "preview.format=yaml", "preview.format", "vlmtrain.data.preview.PreviewFormat"),
]


def _enum(name: str):
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module or "vlmtrain.config"), attr)


def _compose_checked(root: str, overrides: list[str]):
    """Compose as the verb's start-up does (its schema stored), then the start-up's value check."""
    from vlmtrain.config import check_values

    verb = {"config": "preview" if any(o.startswith("preview.") for o in overrides) else "train"}.get(root, root)
    cmd = command(verb)
    use_schema(cmd)
    try:
        cfg = compose_config(overrides, config_name=cmd.config_name)
        check_values(cfg)
    finally:
        register_schemas()
    return cfg


@pytest.mark.parametrize("root, overrides, key, allowed", BAD_CHOICES, ids=[b[1] for b in BAD_CHOICES])
def test_bad_choice_fails_at_compose_naming_key_and_allowed_values(root, overrides, key, allowed):
    from vlmtrain.errors import UserError

    with pytest.raises((ConfigCompositionException, UserError)) as e:
        _compose_checked(root, overrides.split())
    text = f"{e.value} {e.value.__cause__ or ''}"
    assert key in text, text
    values = [m.value for m in _enum(allowed)]
    assert f"expected one of [{', '.join(values)}]" in text, text


def test_choices_match_the_registries_they_name():
    """The enums that cannot import their registry (a heavy or cycling module) list the same names."""
    from typing import get_args

    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    from vlmtrain.config import Attention, DataFormat, LoraTarget, Precision
    from vlmtrain.data.formats import FORMATS, META
    from vlmtrain.models.attention import BACKENDS
    from vlmtrain.models.lora import TARGETS

    assert {a.value for a in Attention} == {"auto", *BACKENDS}
    assert {f.value for f in DataFormat} == {*FORMATS, META}
    from vlmtrain.models.cogvlm import CogVLMFamily

    assert {t.value for t in LoraTarget} == set(TARGETS) | set(CogVLMFamily.lora_targets)  # CogVLM adds expert_*
    assert {p.value for p in Precision} == {*get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_STR_ALIAS)}


def test_choices_are_strings_below():
    """Code below compares, formats and looks up a choice as the string it was."""
    from vlmtrain.config import OnError, Precision, plain

    cfg = compose_config(["data.on_error=raise", "hardware.precision=32"])
    assert cfg.data.on_error == "raise" and f"{cfg.data.on_error}" == "raise" and str(cfg.data.on_error) == "raise"
    assert {"raise": 1}[cfg.data.on_error] == 1 and cfg.data.on_error is OnError["raise"]
    assert cfg.hardware.precision is Precision["32"] and type(plain(cfg.hardware.precision)) is str
    assert "on_error: raise" in OmegaConf.to_yaml(cfg.data)


BAD_VALUES = [
    ("data.datasets.shapes.n_max=0", "data.datasets.shapes.n_max=0 must be an integer >= 1"),
    ("data.datasets.shapes.min_tiles=0", "data.datasets.shapes.min_tiles=0 must be an integer >= 1"),
    ("data.datasets.shapes.repeat=0", "data.datasets.shapes.repeat=0 must be a finite number > 0"),
    ("data.datasets.shapes.repeat=inf", "data.datasets.shapes.repeat=inf must be a finite number > 0"),
    ("data.datasets.shapes.repeat=-1.5", "data.datasets.shapes.repeat=-1.5 must be a finite number > 0"),
    ("data.max_seq_len=0", "data.max_seq_len=0 must be an integer >= 1"),
    ("data.micro_batch_size=0", "data.micro_batch_size=0 must be an integer >= 1"),
    ("stage.global_batch_size=0", "stage.global_batch_size=0 must be an integer >= 1"),
    ("stage.lr=0", "stage.lr=0.0 must be a finite number > 0"),
    ("stage.lr=-1e-5", "stage.lr=-1e-05 must be a finite number > 0"),
    ("stage=lora stage.lora.r=0", "stage.lora.r=0 must be an integer >= 1"),
    ("hardware.num_nodes=0", "hardware.num_nodes=0 must be an integer >= 1"),
    ("model.vision.hidden_act=gelux", "model.vision.hidden_act='gelux' is not one of transformers' activations ["),
    ("model.projector_hidden_act=relu5", "model.projector_hidden_act='relu5' is not one of transformers' activations ["),
    ("hardware=ddp hardware.devices=3 stage.global_batch_size=8",
     "stage.global_batch_size=8 must be divisible by the 3 ranks"),
    ("hardware=ddp hardware.devices=2 hardware.num_nodes=3 stage.global_batch_size=8",
     "stage.global_batch_size=8 must be divisible by the 6 ranks"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_fails_right_after_compose_in_one_line(overrides, message):
    from vlmtrain.errors import UserError

    with pytest.raises(UserError) as e:
        _compose_checked("config", overrides.split())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_values_pass_the_check():
    from vlmtrain.config import check_values

    for overrides in ([], ["hardware=ddp", "hardware.devices=2"], ["hardware=ddp"],  # devices=auto: checked at run
                      ["stage=lora"], ["data.datasets.shapes.repeat=0.5"]):
        check_values(compose_config(overrides))


def test_cli_bad_choice_and_bad_value_are_one_clear_line(tmp_path):
    r = _cli("data.on_error=rais", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode != 0 and "expected one of [skip, raise]" in r.stderr and "full_key: data.on_error" in r.stderr
    r = _cli("data.max_seq_len=0", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "vlmtrain: error: data.max_seq_len=0 must be an integer >= 1")


def test_typed_config_is_the_dataclasses_with_instantiable_components(tmp_path):
    """What train builds from: the composed config as vlmtrain.config's dataclasses, resolved once;
    the _target_ components stay DictConfig nodes that instantiate; a range error names the key."""
    from omegaconf import DictConfig

    from vlmtrain.config import DataConfig, HardwareConfig, ModelConfig, OnError, StageConfig, TrainConfig, typed
    from vlmtrain.errors import UserError

    cfg = typed(compose_config(["hardware=ddp", "hardware.devices=2"], run_dir=tmp_path))
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.model, ModelConfig) and isinstance(cfg.data, DataConfig)
    assert isinstance(cfg.stage, StageConfig) and isinstance(cfg.hardware, HardwareConfig)
    assert cfg.data.on_error is OnError("skip") and cfg.data.template == cfg.model.template == "internvl2_5"
    assert cfg.data.tile_size == cfg.model.vision.image_size and cfg.run_dir == str(tmp_path)  # resolved
    assert isinstance(cfg.data.datasets["shapes"], dict) and isinstance(cfg.model.llm.config, dict)
    for node in (cfg.optim.optimizer, cfg.loss, cfg.logger, cfg.hardware.strategy, cfg.data.collate):
        assert isinstance(node, DictConfig) and "_target_" in node
    assert instantiate(cfg.loss).power == 0.5 and cfg.optim.grad_clip == 1.0
    assert type(instantiate(cfg.hardware.strategy)).__name__ == "DDPStrategy"
    assert typed(cfg) is cfg
    with pytest.raises(UserError, match=r"stage\.lr=-1\.0 must be a finite number > 0"):
        typed(compose_config(["stage.lr=-1"], run_dir=tmp_path))
