"""Each stage trains exactly its parts; frozen parts build no autograd graph."""

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import compose_config
from vlmtrain.models.build import apply_stage, build_model, load_tokenizer
from vlmtrain.models.internvl import encode_images, part_of


@pytest.fixture(scope="module")
def tiny():
    cfg = compose_config(["data.datasets={}"])
    tok = load_tokenizer(cfg.model)
    return cfg, tok


def _build(tiny, stage):
    cfg, tok = tiny
    scfg = compose_config([f"stage={stage}", "data.datasets={}"]).stage
    model = build_model(cfg.model, tok)
    trainable = set(apply_stage(model, scfg))
    return model, trainable


def _names(model, parts):
    return {n for n, _ in model.named_parameters() if part_of(n) in parts}


@pytest.mark.parametrize(
    "stage, parts",
    [
        ("mlp_warmup", {"multi_modal_projector"}),
        ("vit_incremental", {"vision_tower", "multi_modal_projector"}),
        ("instruction_tuning", {"vision_tower", "multi_modal_projector", "language_model"}),
    ],
)
def test_trainable_sets_are_exact(tiny, stage, parts):
    model, trainable = _build(tiny, stage)
    assert trainable == _names(model, parts)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_mlp_warmup_trains_exactly_the_projector_tensors(tiny):
    model, trainable = _build(tiny, "mlp_warmup")
    assert trainable == {
        "model.multi_modal_projector.layer_norm.weight",
        "model.multi_modal_projector.layer_norm.bias",
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_1.bias",
        "model.multi_modal_projector.linear_2.weight",
        "model.multi_modal_projector.linear_2.bias",
    }


def test_frozen_vit_builds_no_graph(tiny):
    model, _ = _build(tiny, "mlp_warmup")
    size = model.config.vision_config.image_size[0]
    seen = []
    model.model.vision_tower.encoder.layer[-1].register_forward_hook(lambda m, a, o: seen.append(o))
    feats = encode_images(model, torch.randn(2, 3, size, size))
    assert feats.requires_grad  # the projector trains
    assert not seen[0].requires_grad and seen[0].grad_fn is None  # the ViT kept no graph


def test_uint8_tiles_are_normalised_on_the_model_side(tiny):
    """The loader ships uint8 tiles; encode_images normalises them as the host-side float path does."""
    from vlmtrain.data.images import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels, to_pixel_bytes, to_pixel_values

    model, _ = _build(tiny, "instruction_tuning")
    size = model.config.vision_config.image_size[0]
    tiles = [torch.randint(0, 256, (size, size, 3), dtype=torch.uint8) for _ in range(2)]
    raw = to_pixel_bytes(tiles)
    assert raw.dtype == torch.uint8 and raw.shape == (2, 3, size, size)
    by_hand = (torch.stack(tiles).permute(0, 3, 1, 2) / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normalize_pixels(raw), by_hand, rtol=0, atol=1e-5)
    assert normalize_pixels(by_hand) is by_hand  # float tiles are already normalised
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(encode_images(model, raw), encode_images(model, to_pixel_values(tiles)))


def test_drop_path_follows_the_stage(tiny):
    model, _ = _build(tiny, "vit_incremental")
    tower = model.model.vision_tower
    size = model.config.vision_config.image_size[0]
    x = torch.randn(8, 3, size, size)
    tower.eval()
    a, b = tower(pixel_values=x).last_hidden_state, tower(pixel_values=x).last_hidden_state
    assert torch.equal(a, b)  # no drop path in eval
    tower.train()
    torch.manual_seed(0)
    c = tower(pixel_values=x).last_hidden_state
    assert not torch.allclose(a, c)  # drop path 0.1 on the last layer changes some samples


def test_init_dtype_rounds_the_random_weights_to_bf16():
    """model.init_dtype=bfloat16: every weight is exactly a bf16 value (still fp32 tensors), the same
    draws as without it; a dtype that is not a float dtype fails at compose naming the key."""
    tok = load_tokenizer(compose_config(["data.datasets={}"]).model)
    plain = build_model(compose_config(["data.datasets={}"]).model, tok)
    rounded = build_model(compose_config(["data.datasets={}", "model.init_dtype=bfloat16"]).model, tok)
    for (name, a), b in zip(plain.named_parameters(), rounded.parameters()):
        assert b.dtype == torch.float32, name
        assert torch.equal(b, a.bfloat16().float()), name
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), rounded.parameters()))
    with pytest.raises(ConfigCompositionException) as e:  # a choice (config.DType): fails at compose
        compose_config(["data.datasets={}", "model.init_dtype=int8"])
    assert "model.init_dtype" in str(e.value.__cause__) and "expected one of [bfloat16, float16, float32]" in str(e.value.__cause__)


def test_param_groups_scale_a_parts_lr(tiny):
    """optim.lr_scale puts a part in groups of its own at lr x scale; without it the two groups stay."""
    from vlmtrain.training.module import param_groups

    model, trainable = _build(tiny, "instruction_tuning")
    no_decay = list(tiny[0].optim.no_decay)
    plain = param_groups(model, no_decay, 1e-3, {})
    assert [g["name"] for g in plain] == ["decay", "no_decay"] and "lr" not in plain[0]
    scaled = param_groups(model, no_decay, 1e-3, {"vision_tower": 0.1})
    assert [g["name"] for g in scaled] == ["decay", "no_decay", "vision_tower/decay", "vision_tower/no_decay"]
    assert scaled[2]["lr"] == scaled[3]["lr"] == pytest.approx(1e-4) and scaled[3]["weight_decay"] == 0.0
    ids = {name: id(p) for name, p in model.named_parameters()}
    in_group = {id(p): g["name"] for g in scaled for p in g["params"]}
    assert len(in_group) == sum(len(g["params"]) for g in scaled) == len(trainable)  # each once
    for name in trainable:
        assert in_group[ids[name]].startswith("vision_tower/") == (part_of(name) == "vision_tower")
    with pytest.raises(ValueError, match="optim.lr_scale"):
        param_groups(model, no_decay, 1e-3, {"vision": 0.1})
    with pytest.raises(ValueError, match="optim.lr_scale"):
        param_groups(model, no_decay, 1e-3, {"vision_tower": 0})
