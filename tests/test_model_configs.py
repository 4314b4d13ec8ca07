"""Every released-model config composes and builds its full-size architecture on the meta device;
parameter counts match the released checkpoints; vlmtrain.plan reports memory per strategy."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import compose_config
from vlmtrain.cli import CONFIG_DIR
from vlmtrain.models.internvl import build_from_config
from vlmtrain.training.plan import GiB, plan, report

RELEASED = {
    # name: (total parameters in billions as released, LLM layers, image_token_id, template)
    "internvl_chat_v1_5": (25.51, 48, 92546, "internlm2-chat"),
    "mini_internvl_chat_2b_v1_5": (2.21, 24, 92546, "internlm2-chat"),
    "mini_internvl_chat_4b_v1_5": (4.15, 32, 32013, "phi3-chat"),
    "internvl2_1b": (0.94, 24, 151648, "hermes2"),
    "internvl2_2b": (2.21, 24, 92546, "internlm2-chat"),
    "internvl2_4b": (4.15, 32, 32013, "phi3-chat"),
    "internvl2_8b": (8.08, 32, 92546, "internlm2-chat"),
    "internvl2_26b": (25.51, 48, 92546, "internlm2-chat"),
    "internvl2_40b": (40.07, 60, 64002, "hermes2"),
    "internvl2_76b": (76.26, 80, 128258, "hermes2"),
    "internvl2_5_1b": (0.94, 24, 151667, "internvl2_5"),
    "internvl2_5_2b": (2.21, 24, 92546, "internvl2_5"),
    "internvl2_5_4b": (3.71, 36, 151667, "internvl2_5"),
    "internvl2_5_8b": (8.08, 32, 92546, "internvl2_5"),
    "internvl2_5_26b": (25.51, 48, 92546, "internvl2_5"),
    "internvl2_5_38b": (38.39, 64, 151667, "internvl2_5"),
    "internvl2_5_78b": (78.41, 80, 151667, "internvl2_5"),
}


def test_every_model_file_is_listed():
    # InternVL files (no family node); other families' files are listed by their own tests
    files = {p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml") if "\nfamily:" not in p.read_text()}
    assert files == set(RELEASED) | {"tiny"}
    for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"):
        assert p.read_text().startswith("# "), p


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_full_size_architecture_on_meta(name):
    billions, layers, image_token_id, template = RELEASED[name]
    cfg = compose_config([f"model={name}"])
    model = build_from_config(cfg.model, device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / 1e9 - billions) < 0.01, total
    assert all(p.is_meta for p in model.parameters())
    assert model.config.text_config.num_hidden_layers == layers
    assert model.config.image_token_id == image_token_id == cfg.model.image_token_id
    assert cfg.model.template == template and model.config.image_seq_length == 256
    vit6b = model.config.vision_config.hidden_size == 3200
    assert model.config.vision_config.num_hidden_layers == (45 if vit6b else 24)
    assert model.config.vision_config.use_qk_norm == vit6b


def _plan(overrides):
    with_plan = compose_config  # the training root config holds model/stage/hardware too
    cfg = with_plan(overrides)
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        cfg.plan = OmegaConf.create({"gpu_memory_gb": 80.0, "headroom_gb": 10.0, "zero_stage": None,
                                     "optimizer_offload": False})
    return cfg, plan(cfg)


def test_plan_8b_full_tuning_zero1_vs_zero3():
    cfg, r = _plan(["model=internvl2_5_8b", "stage=instruction_tuning", "hardware=gpu", "hardware.devices=8",
                    "hardware.strategy=deepspeed_stage_1"])
    n = r["total"]
    assert r["trainable"] == n and r["sharding"].zero_stage == 1
    mem = r["memory"]  # bf16 weights and grads everywhere, 12 B/param optimizer state over 8 ranks
    assert mem["weights"] == 2 * n and mem["gradients"] == 2 * n and mem["optimizer"] == 12 * n / 8
    z3 = r["by_stage"][3]
    assert z3["weights"] == 2 * n / 8 and z3["optimizer"] == 12 * n / 8
    text = report(cfg, r)
    assert "ZeRO-1 over 8 ranks" in text and "fits in 80 GiB" in text
    assert "ZeRO-0:" in text and "does not fit" in text  # 16 B/param x 8B does not fit one GPU
    assert (mem["weights"] + mem["gradients"] + mem["optimizer"]) / GiB < 70


def test_plan_lora_78b_counts_only_adapters_and_projector():
    cfg, r = _plan(["model=internvl2_5_78b", "stage=lora", "hardware=gpu", "hardware.devices=8",
                    "hardware.num_nodes=4", "hardware.strategy=deepspeed_stage_3"])
    counts = r["counts"]
    assert counts["vision_tower"].trainable == 0
    assert counts["multi_modal_projector"].trainable == counts["multi_modal_projector"].total
    # r=16 on q/k/v/o of 80 layers: r * (in + out) per projection
    h, kv = 8192, 8 * 128
    per_layer = 16 * ((h + h) + (h + kv) + (h + kv) + (h + h))
    assert counts["language_model"].trainable == 80 * per_layer
    assert r["sharding"].shard_ranks == 32 and r["memory"]["weights"] == 2 * r["total"] / 32


@pytest.mark.parametrize("root, overrides", [
    ("plan", ["model=internvl2_5_26b", "stage=instruction_tuning", "hardware.devices=8",
              "hardware.strategy=deepspeed_stage_3"]),
    ("plan", ["model=internvl2_5_1b", "stage=mlp_warmup", "plan.zero_stage=0"]),
    ("export", ["ckpt=/x", "out=/y"]),
    ("chat", ["ckpt=/x", "chat.query=hi", "chat.images=[a.png]"]),
    ("eval", ["ckpt=/x", "data=demo_val"]),
])
def test_entry_point_root_configs_compose(root, overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=root, overrides=overrides)
    assert cfg.ckpt == "/x" if root != "plan" else cfg.plan.gpu_memory_gb == 80
    if root == "plan":
        text = report(cfg, plan(cfg))
        assert "ZeRO-3:" in text and cfg.model.name in text


def test_typo_in_an_entry_point_config_names_the_key():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="plan.gpu_memroy_gb"):
            compose(config_name="plan", overrides=["plan.gpu_memroy_gb=40"])


def test_sincos_position_init_gives_a_random_vit_patch_positions():
    """Random init: transformers zeroes the ViT's position embeddings, so identical patches give
    identical outputs wherever they are; model.vision.sincos_position_init starts them at 2D sin-cos."""
    import torch

    from vlmtrain.models.internvl import sincos_2d

    codes = sincos_2d(4, 8)
    assert codes.shape == (16, 8) and torch.equal(codes[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    assert torch.equal(codes[:4, 4:], codes[4:8, 4:]) and not torch.equal(codes[:4, :4], codes[4:8, :4])  # row / column halves
    for sincos in (False, True):
        cfg = compose_config([f"model.vision.sincos_position_init={sincos}", "data.datasets={}"])
        model = build_from_config(cfg.model, image_token_id=5).eval()
        pos = model.model.vision_tower.embeddings.position_embeddings[0]
        side = cfg.model.vision.image_size // cfg.model.vision.patch_size
        flat = torch.zeros(1, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)  # every patch alike
        with torch.no_grad():
            out = model.model.vision_tower(pixel_values=flat).last_hidden_state[0, 1:]
        if sincos:
            torch.testing.assert_close(pos[1:], sincos_2d(side, pos.shape[-1]))
            assert (out[0] - out[-1]).abs().max() > 1e-3
        else:
            assert not pos.any() and torch.allclose(out[0], out[-1], atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 6)
