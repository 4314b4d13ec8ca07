"""The FLOP formula of vlmtrain.training.flops against torch's FlopCounterMode on the tiny model,
and the pass factors of each stage."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import compose_config
from vlmtrain.models.build import apply_stage, build_model, load_tokenizer
from vlmtrain.models.internvl import encode_images
from vlmtrain.training.flops import (
    InternVLDims,
    llm_flops,
    llm_matmul_flops_per_token,
    pass_factors,
    peak_flops_per_device,
    projector_flops_per_tile,
    trainable_states,
    training_flops,
    vit_flops_per_tile,
)


@pytest.fixture(scope="module")
def tiny():
    cfg = compose_config(["data.datasets={}"])
    model = build_model(cfg.model, load_tokenizer(cfg.model)).eval()
    model.set_attn_implementation("eager")  # attention as plain matmuls, so FlopCounterMode sees it
    return cfg, model, InternVLDims.from_hf_config(model.config)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_dims_from_the_config(tiny):
    cfg, _, d = tiny
    assert (d.vit_hidden, d.vit_layers, d.tile_size, d.patch_size) == (64, 2, 224, 14)
    assert (d.llm_hidden, d.llm_layers, d.llm_heads, d.llm_kv_heads, d.llm_head_dim) == (128, 2, 4, 2, 32)
    assert d.tokens_per_tile == 64 and d.vocab_size == cfg.model.llm.config.vocab_size


def test_vit_and_projector_match_flop_counter(tiny):
    _, model, d = tiny
    tiles = torch.randn(3, 3, 224, 224)
    vit = _counted(lambda: model.model.vision_tower(pixel_values=tiles))
    assert vit == pytest.approx(3 * vit_flops_per_tile(d), rel=1e-6)
    both = _counted(lambda: encode_images(model, tiles))
    assert both - vit == pytest.approx(3 * projector_flops_per_tile(d), rel=1e-6)


def test_llm_matches_flop_counter(tiny):
    """Weight matmuls exactly; eager attention computes all n*n pairs where we count the causal
    n(n+1)/2 that a varlen kernel computes."""
    _, model, d = tiny
    n = 50
    ids = torch.randint(0, 2000, (1, n))
    counted = _counted(lambda: model.model.language_model(input_ids=ids))
    rotary = _counted(lambda: model.model.language_model.rotary_emb(torch.zeros(1, n, 1), torch.arange(n)[None]))
    full_attention = d.llm_layers * 4 * d.llm_heads * d.llm_head_dim * n * n
    assert counted - rotary == pytest.approx(n * llm_matmul_flops_per_token(d) + full_attention, rel=1e-6)
    causal = llm_flops(d, n, n * n, 0) - n * llm_matmul_flops_per_token(d)
    assert causal == pytest.approx(full_attention * (n + 1) / (2 * n))
    head = _counted(lambda: model.lm_head(torch.zeros(7, d.llm_hidden)))
    assert llm_flops(d, n, n * n, 7) - llm_flops(d, n, n * n, 0) == pytest.approx(head)


@pytest.mark.parametrize("stage, factors", [
    ("mlp_warmup", {"vision_tower": 1, "multi_modal_projector": 3, "language_model": 2}),
    ("vit_incremental", {"vision_tower": 3, "multi_modal_projector": 3, "language_model": 2}),
    ("instruction_tuning", {"vision_tower": 3, "multi_modal_projector": 3, "language_model": 3}),
])
def test_pass_factors_follow_the_stage(stage, factors):
    cfg = compose_config([f"stage={stage}", "data.datasets={}"])
    model = build_model(cfg.model, load_tokenizer(cfg.model))
    apply_stage(model, cfg.stage)
    assert pass_factors(trainable_states(model)) == factors


def test_partial_and_training_total(tiny):
    _, _, d = tiny
    assert pass_factors({"language_model": "partial"}) == {"vision_tower": 1, "multi_modal_projector": 1,
                                                           "language_model": 2}
    fwd = 2 * vit_flops_per_tile(d) + 2 * projector_flops_per_tile(d) + llm_flops(d, 300, 300**2, 40)
    assert training_flops(d, 2, 300, 300**2, 40) == pytest.approx(3 * fwd)
    with pytest.raises(ValueError, match="vision_tower"):
        pass_factors({"vision_tower": "lora"})


def test_peak_table():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_device("cpu") is None


def test_internvl2_5_1b_numbers():
    """Known sizes: InternViT-300M at 448 px and Qwen2.5-0.5B (InternVL2.5-1B)."""
    d = InternVLDims(vit_hidden=1024, vit_layers=24, vit_intermediate=4096, tile_size=448, patch_size=14,
                     downsample_ratio=0.5, llm_hidden=896, llm_layers=24, llm_heads=14, llm_kv_heads=2,
                     llm_head_dim=64, llm_intermediate=4864, vocab_size=151674)
    assert d.tokens_per_tile == 256
    # 24 layers x 12.6M weights x 1025 tokens x 2 (0.62 TFLOP) + attention over 1025 tokens (0.10)
    # + patch embedding: about 0.72 TFLOP per 448 px tile, forward
    assert 7.0e11 < vit_flops_per_tile(d) < 7.5e11
    # Qwen2.5-0.5B has ~358M non-embedding weights in its blocks: 2 FLOPs each per token
    assert llm_matmul_flops_per_token(d) == pytest.approx(2 * 24 * (896 * (2 * 896 + 2 * 128) + 3 * 896 * 4864))
