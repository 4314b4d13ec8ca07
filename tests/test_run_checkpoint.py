"""vlmtrain.models.run_checkpoint: which paths are checkpoints, reading them, the LoRA merge on a
state dict (equal to peft's merge), the strict loader and its one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from model_fixtures import make_run_dir

from vlmtrain.errors import MissingPathError, UserError
from vlmtrain.models.lora import merge_lora
from vlmtrain.models.run_checkpoint import (
    find_checkpoint,
    find_resume_checkpoint,
    find_run,
    is_lora_key,
    load_strict,
    merge_lora_state,
    read_model_state,
    read_weights,
)


def test_lora_keys():
    assert is_lora_key("model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert is_lora_key("x.lora_B.default.weight") and is_lora_key("x.lora_magnitude_vector.default")
    assert not is_lora_key("model.language_model.layers.0.self_attn.q_proj.base_layer.weight")
    assert not is_lora_key("model.flora_proj.weight")  # a substring test would call this an adapter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_on_the_state_dict_equals_peft_merge(tmp_path, dtype):
    cfg, model, _ = make_run_dir(tmp_path / "run", ["stage=lora", "stage.lora.r=4", "stage.lora.alpha=12"])
    model = model.to(dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(is_lora_key(k) for k in state)
    b = next(v for k, v in state.items() if ".lora_B." in k)
    assert b.abs().sum() > 0  # perturbed: the adapters change the weights

    merged = merge_lora_state(state, 12 / 4)
    reference = merge_lora(copy.deepcopy(model)).state_dict()  # peft's own merge
    assert set(merged) == set(reference)
    for k, v in reference.items():
        assert merged[k].dtype == v.dtype and torch.equal(merged[k], v), k


def test_read_weights_merges_a_lora_run_without_building_a_model(tmp_path):
    _, model, _ = make_run_dir(tmp_path / "run", ["stage=lora"])
    ckpt = find_checkpoint(tmp_path / "run", "init_from")
    assert ckpt == tmp_path / "run" / "checkpoints" / "last.ckpt"
    raw = read_model_state(ckpt, "init_from")
    assert raw.keys() == model.state_dict().keys()
    merged = read_weights(ckpt, "init_from")
    assert not any(is_lora_key(k) for k in merged) and not any(".base_layer." in k for k in merged)

    (tmp_path / "run" / "config.yaml").unlink()  # r and alpha are gone with it
    with pytest.raises(UserError, match="holds LoRA adapters"):
        read_weights(ckpt, "init_from")


def test_finding_checkpoints(tmp_path):
    make_run_dir(tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert find_checkpoint(tmp_path / "run", "init_from") == last
    assert find_checkpoint(last, "init_from") == last
    run = find_run(last)
    assert run.run_dir == tmp_path / "run" and run.ckpt == last
    assert find_run(tmp_path) is None  # neither a run nor a checkpoint (e.g. an HF directory)
    with pytest.raises(MissingPathError, match="init_from: no checkpoint at"):
        find_checkpoint(tmp_path / "nope", "init_from")

    folder = tmp_path / "ds"  # what Lightning's DeepSpeed strategy writes
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    with pytest.raises(MissingPathError, match="no config.yaml in its run directory"):
        find_run(folder)
    not_ds = tmp_path / "plain_folder"
    not_ds.mkdir()
    with pytest.raises(UserError, match="not a DeepSpeed checkpoint"):
        read_model_state(not_ds, "init_from")
    with pytest.raises(UserError, match="not a Lightning checkpoint"):
        torch.save({"weights": 1}, tmp_path / "other.ckpt")
        read_model_state(tmp_path / "other.ckpt", "init_from")


def test_resume_falls_back_to_the_old_folder(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    assert find_resume_checkpoint("auto", tmp_path) is None
    assert find_resume_checkpoint(None, tmp_path) is None
    (ckpt_dir / "last.ckpt.old").mkdir()  # a crash between the two renames of a folder checkpoint
    assert find_resume_checkpoint("auto", tmp_path) == ckpt_dir / "last.ckpt.old"
    with pytest.raises(MissingPathError, match="resume: no checkpoint"):
        find_resume_checkpoint(str(tmp_path / "nope.ckpt"), tmp_path)


def test_strict_loader_names_the_first_bad_key():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    good = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    load_strict(model, good, "x.ckpt")
    assert all(torch.equal(v, torch.zeros_like(v)) for v in model.state_dict().values())
    with pytest.raises(UserError, match=r"x.ckpt: unexpected key 'extra'"):
        load_strict(model, {**good, "extra": torch.zeros(1)}, "x.ckpt")
    with pytest.raises(UserError, match=r"shape mismatch at '0.weight'"):
        load_strict(model, {**good, "0.weight": torch.zeros(3, 3)}, "x.ckpt")
    with pytest.raises(UserError, match=r"missing key '1.bias' \(and 0 more\)"):
        load_strict(model, {k: v for k, v in good.items() if k != "1.bias"}, "x.ckpt")
    load_strict(model, {"1.weight": good["1.weight"], "1.bias": torch.ones(1)}, "x.ckpt", prefixes=["1."])  # one part
    assert model.state_dict()["1.bias"].item() == 1.0


def test_init_parts_moves_the_vit_onto_another_llm(tmp_path):
    """init_parts=[vision_tower]: the ViT comes from a run whose LLM has another size; the rest of
    the new model keeps its initialisation (the recipe's progressive scaling)."""
    from conftest import compose_config
    from vlmtrain.models.build import build_model, load_tokenizer
    from vlmtrain.training.run import init_weights_from

    _, small, _ = make_run_dir(tmp_path / "small")
    cfg = compose_config(["model.llm.config.hidden_size=96", "model.llm.config.intermediate_size=192"])
    tok = load_tokenizer(cfg.model)
    big = build_model(cfg.model, tok, 5)
    fresh = {k: v.clone() for k, v in big.state_dict().items()}
    with pytest.raises(UserError, match="shape mismatch"):
        init_weights_from(big, str(tmp_path / "small"))
    init_weights_from(big, str(tmp_path / "small"), ["vision_tower"])
    own, src = big.state_dict(), small.state_dict()
    vit = [k for k in own if k.startswith("model.vision_tower.")]
    assert vit and all(torch.equal(own[k], src[k]) for k in vit)
    assert all(torch.equal(own[k], fresh[k]) for k in own if k not in vit)
    with pytest.raises(UserError, match="init_parts"):
        init_weights_from(big, str(tmp_path / "small"), ["vit"])
