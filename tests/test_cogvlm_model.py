"""CogVLM's module (vlmtrain.models.cogvlm) and its checkpoint layouts (vlmtrain.models.cogvlm_layout)."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from vlmtrain.config import ModelConfig
from vlmtrain.data.token_types import build_position_ids, sample_position_ids
from vlmtrain.models import cogvlm_layout as layout
from vlmtrain.models.cogvlm import (
    CogVLMForCausalLM,
    build_cogvlm,
    expert_mask,
    part_of,
    vision_token_types,
)

IMG = 6  # the image token id of these tests


def tiny_cfg(**llm):
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load("conf/model/cogvlm_tiny.yaml"))
    cfg.vision.image_size = 28  # 2 x 2 patches: 6 VISION positions per image
    cfg.llm.config.update(llm)
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_cogvlm(tiny_cfg(), image_token_id=IMG, seed=3)
    with torch.no_grad():  # an expert that differs from the language weights, so routing shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def sample(n_text_before=2, n_text_after=5, nv=6):
    ids = [100 + i for i in range(n_text_before)] + [IMG] * nv + [200 + i for i in range(n_text_after)]
    return torch.tensor([ids])


def test_position_ids_follow_the_release_rule():
    # BOS, boi, 4 patches, eoi, 3 text tokens: boi 1, the patches share 2, eoi 3, text 4..
    tt = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    assert build_position_ids(tt).tolist() == [[0, 1, 2, 2, 2, 2, 3, 4, 5, 6]]
    # the visual expert: VISION followed by VISION (boi and the patches); eoi is the language's
    assert expert_mask(tt).int().tolist() == [[0, 1, 1, 1, 1, 1, 0, 0, 0, 0]]
    # an image first (no BOS): the first position is boi
    assert build_position_ids(torch.tensor([[1, 1, 1, 0, 0]])).tolist() == [[0, 1, 2, 3, 4]]


def test_packed_positions_restart_and_experts_stay_in_their_sample():
    tt = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 0]])
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    assert sample_position_ids(tt, cu).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    # the first sample's last position (text) never routes on the next sample's boi
    tt2 = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0]])
    cu2 = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert expert_mask(tt2, cu2).int().tolist() == [[0, 1, 0, 1, 1, 0, 0, 0]]


def test_left_padding_and_packing_give_the_unpadded_logits(model):
    ids, pix = sample(), torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pix).logits
        pad = torch.cat([torch.tensor([[1, 1, 1]]), ids], 1)
        am = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
        padded = model(input_ids=pad, attention_mask=am, pixel_values=pix).logits[:, 3:]
        other = sample(4, 3)
        packed_ids = torch.cat([other, ids], 1)
        cu = torch.tensor([0, other.shape[1], packed_ids.shape[1]], dtype=torch.int32)
        packed = model(input_ids=packed_ids, pixel_values=torch.cat([pix.flip(-1), pix]), cu_seq_lens=cu,
                       max_length=ids.shape[1]).logits[:, other.shape[1]:]
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, ref, atol=1e-5, rtol=1e-5)


def test_the_visual_expert_serves_image_positions_only(model):
    ids, pix = sample(), torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pix).logits
        text = model(input_ids=torch.tensor([[100, 101]])).logits
        saved = model.model.layers[0].mlp.vision_mlp.down_proj.weight.clone()
        model.model.layers[0].mlp.vision_mlp.down_proj.weight.mul_(3.0)
        changed = model(input_ids=ids, pixel_values=pix).logits
        model.model.layers[0].mlp.vision_mlp.down_proj.weight.copy_(saved)
    torch.testing.assert_close(ref[:, :2], text)  # text before the image: causal, language weights only
    assert (changed[:, 3:] - ref[:, 3:]).abs().max() > 1e-4  # image and later positions see the expert
    torch.testing.assert_close(changed[:, :2], ref[:, :2])


def test_cached_generation_equals_greedy_recomputation(model):
    ids, pix = sample(), torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8)
    pad = torch.cat([torch.tensor([[1, 1]]), ids], 1)
    am = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        out = model.generate(input_ids=pad, attention_mask=am, pixel_values=pix, max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=1)[:, pad.shape[1]:]
        cur = ids
        for _ in range(6):
            nxt = model(input_ids=cur, pixel_values=pix).logits[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], 1)
    assert out.tolist() == cur[:, ids.shape[1]:].tolist()


def release_keys(n_layers: int, n_vit_layers: int) -> set[str]:
    """The parameter names of THUDM/cogvlm-chat-hf (modeling_cogvlm.py + visual.py), written out."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.vision.boi",
            "model.vision.eoi", "model.vision.patch_embedding.cls_embedding",
            "model.vision.patch_embedding.proj.weight", "model.vision.patch_embedding.proj.bias",
            "model.vision.patch_embedding.position_embedding.weight", "model.vision.linear_proj.linear_proj.weight",
            "model.vision.linear_proj.norm1.weight", "model.vision.linear_proj.norm1.bias",
            "model.vision.linear_proj.dense_h_to_4h.weight", "model.vision.linear_proj.gate_proj.weight",
            "model.vision.linear_proj.dense_4h_to_h.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for e in ("vision", "language"):
            keys |= {p + f"self_attn.{e}_expert_query_key_value.weight", p + f"self_attn.{e}_expert_dense.weight"}
            keys |= {p + f"mlp.{e}_mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    for i in range(n_vit_layers):
        p = f"model.vision.transformer.layers.{i}."
        for n in ("input_layernorm", "attention.query_key_value", "attention.dense", "mlp.fc1", "mlp.fc2",
                  "post_attention_layernorm"):
            keys |= {p + n + ".weight", p + n + ".bias"}
    return keys


def test_save_writes_the_release_layout_and_loads_back(model, tmp_path):
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert set(state) == release_keys(2, 2)
    # a release copy with rotary buffers loads too
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    loaded = build_cogvlm(tiny_cfg(), image_token_id=IMG, init_weights=False)
    kept = layout.release_state(state)
    layout.check_loadable(loaded, kept, "test")
    loaded.load_state_dict(kept, strict=True)
    ids, pix = sample(), torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids, pixel_values=pix).logits,
                                   model(input_ids=ids, pixel_values=pix).logits, rtol=0, atol=0)
    cfg = layout.release_config_dict(model)
    assert cfg["architectures"] == ["CogVLMForCausalLM"]
    assert set(cfg["vision_config"]) == layout.RELEASE_VISION_KEYS - {"dropout_prob"} | {"dropout_prob"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    fields = layout.model_fields_from_release(tmp_path)
    assert fields["vision"]["num_hidden_layers"] == 2 and fields["llm"]["config"]["hidden_size"] == 128


def test_a_llama_lm_becomes_the_language_weights_both_ways(tmp_path):
    c = tiny_cfg().llm.config
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                         num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
                                         rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                                         tie_word_embeddings=False)).eval()
    state = layout.llama_to_cogvlm(llama.state_dict(), "llama")
    m = build_cogvlm(tiny_cfg(), image_token_id=IMG)
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("model.vision.") for k in missing)
    back = layout.cogvlm_to_llama(m.state_dict())
    assert set(back) == set(llama.state_dict()) - {k for k in llama.state_dict() if "rotary" in k}
    for k, v in back.items():
        assert torch.equal(v, llama.state_dict()[k]), k
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():  # text only: CogVLM is its LLM exactly
        torch.testing.assert_close(m.eval()(input_ids=ids).logits, llama(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    a = m.model.layers[1]
    assert torch.equal(a.self_attn.vision_expert_query_key_value.weight, a.self_attn.language_expert_query_key_value.weight)
    assert torch.equal(a.mlp.vision_mlp.up_proj.weight, a.mlp.language_mlp.up_proj.weight)


def test_grouped_query_llms_are_refused():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(Exception, match="grouped-query"):
        layout.llama_to_cogvlm(llama.state_dict(), "gqa")


def test_parts_and_the_released_size():
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load("conf/model/cogvlm_17b.yaml"))
    m = build_cogvlm(cfg, device="meta")
    assert isinstance(m, CogVLMForCausalLM)
    totals = {}
    for name, p in m.named_parameters():
        totals[part_of(name)] = totals.get(part_of(name), 0) + p.numel()
    total = sum(totals.values())
    # the release: 8 bf16 safetensors shards of 35.28 GB (4.94+4.95+4.95+4.99+4.99+4.97+4.96+0.533) -> 17.64B
    assert abs(total - 35.283e9 / 2) / total < 0.01
    assert totals["vision_tower"] == pytest.approx(4.28e9, rel=0.01)  # EVA2-CLIP-E, 63 layers
    assert totals["visual_expert"] == pytest.approx(6.48e9, rel=0.01)
    assert part_of("base_model.model.model.layers.3.mlp.vision_mlp.up_proj.lora_A.default.weight") == "visual_expert"
    assert vision_token_types(torch.tensor([[1, IMG, 2]]), IMG).tolist() == [[0, 1, 0]]


def test_packed_and_padded_steps_give_the_same_loss_with_token_types():
    """The demo data through CogVLM's layout: token types and the samples' own position ids survive
    padding and packing, and both give the loss of the same samples (and the same gradients)."""
    from conftest import compose_config
    from vlmtrain.data.collate import StepCollator
    from vlmtrain.data.mixture import MixtureDataset
    from vlmtrain.data.packing import PackedStepCollator
    from vlmtrain.models.build import apply_stage, build_model, load_tokenizer
    from vlmtrain.models.family import image_layout
    from vlmtrain.training.loss import PowerWeighting
    from vlmtrain.training.objective import CrossEntropyObjective

    cfg = compose_config(["model=cogvlm_tiny", "stage=cogvlm_pretrain"])
    tok = load_tokenizer(cfg.model)
    layout = image_layout(cfg.model)
    assert layout.token_types and layout.tokens_per_tile == 66 and not layout.start
    ds = MixtureDataset(cfg.data, tok, layout, seed=0)
    samples = [ds[(i, 0)] for i in range(6)]
    samples = [s for s in samples if hasattr(s, "input_ids")]
    with_image = [s for s in samples if s.pixel_values is not None]
    assert with_image and all(s.pixel_values.shape[0] == len(s.num_tiles) for s in with_image)  # one tile each
    s = with_image[0]
    assert int(s.token_type_ids.sum()) == 66 * len(s.num_tiles)
    assert s.position_ids.max() < len(s) - 64 * len(s.num_tiles) + 1  # an image's patches share one id
    model = build_model(cfg.model, tok)
    apply_stage(model, cfg.stage)
    obj = CrossEntropyObjective(PowerWeighting(0.5))
    padded = StepCollator(2, tok.pad_token_id, 112, token_types=True)(samples)
    packed = PackedStepCollator(tok.pad_token_id, 112, max_tokens=4096, max_tiles=8, token_types=True)(samples)
    assert all(mb.token_type_ids is not None for mb in padded.micro_batches + packed.micro_batches)

    def loss_and_grad(step):
        model.zero_grad()
        num = sum(obj(model, mb).total for mb in step.micro_batches)
        w = obj.step_weight(step)
        (num / w).backward()
        g = model.model.layers[0].self_attn.vision_expert_query_key_value.weight.grad.clone()
        return float((num / w).detach()), g

    (a, ga), (b, gb) = loss_and_grad(padded), loss_and_grad(packed)
    assert abs(a - b) < 1e-4 * abs(a)
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("targets,adapted_part", [("[llm_attention,llm_mlp]", "language_model"),
                                                  ("[expert_attention,expert_mlp]", "visual_expert")])
def test_lora_on_cogvlm_adapts_the_named_expert_and_merges(tmp_path, targets, adapted_part):
    """stage=lora on CogVLM: adapters on the language (or the visual) expert's linears, the adapter
    trains fully beside them; peft's saved adapter on a fresh base gives the adapted logits, and
    merging (what export and init_from use) gives them too."""
    from peft import PeftModel

    from conftest import compose_config
    from vlmtrain.models.build import apply_stage, build_model, load_tokenizer
    from vlmtrain.models.family import family_of
    from vlmtrain.models.lora import merge_lora, save_adapter

    cfg = compose_config(["model=cogvlm_tiny", "stage=lora", f"stage.lora.targets={targets}"])
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok)
    trainable = apply_stage(model, cfg.stage)
    fam = family_of(model)
    adapted = {fam.part_of(n) for n in trainable if ".lora_" in n}
    assert adapted == {adapted_part}
    assert {fam.part_of(n) for n in trainable if ".lora_" not in n} == {"multi_modal_projector"}
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor([[model.config.image_token_id] * 66 + [40, 41, 42, 43]])
    px = torch.randint(0, 256, (1, 3, 112, 112), dtype=torch.uint8)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
    out = save_adapter(model, tmp_path / "adapter", cfg.stage.lora, list(cfg.stage.trainable))
    base = build_model(cfg.model, tok).eval()
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids, pixel_values=px).logits
        merged = merge_lora(model)(input_ids=ids, pixel_values=px).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=0)


def test_vision_and_llm_paths_load_into_cogvlm(tmp_path):
    """model.vision.path (a CogVLM checkpoint in the release's layout: its ViT) and model.llm.path
    (a Llama causal LM: the language weights, the visual expert a copy) through build_model."""
    from vlmtrain.models.build import build_model, load_tokenizer

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load("conf/model/cogvlm_tiny.yaml"))
    tok = load_tokenizer(cfg)
    donor = build_model(cfg, tok, seed=11)
    donor.save_pretrained(tmp_path / "cog")
    c = cfg.llm.config
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                         num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
                                         tie_word_embeddings=False))
    llama.save_pretrained(tmp_path / "llama")
    cfg.vision.path, cfg.llm.path, cfg.tokenizer = str(tmp_path / "cog"), str(tmp_path / "llama"), None
    model = build_model(cfg, tok, seed=0)
    vit = "model.vision.transformer.layers.1.mlp.fc2.weight"
    assert torch.equal(model.state_dict()[vit], donor.state_dict()[vit])
    adapter = "model.vision.linear_proj.gate_proj.weight"
    assert not torch.equal(model.state_dict()[adapter], donor.state_dict()[adapter])  # not named: random init
    q = llama.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    qkv = model.model.layers[0].self_attn
    assert torch.equal(qkv.language_expert_query_key_value.weight[: q.shape[0]], q)
    assert torch.equal(qkv.vision_expert_query_key_value.weight, qkv.language_expert_query_key_value.weight)
    assert torch.equal(model.lm_head.weight, llama.lm_head.weight)


def test_model_attention_names_the_packed_backend():
    from vlmtrain.models.attention import use_packed_attention

    m = build_cogvlm(tiny_cfg(), image_token_id=IMG)
    use_packed_attention(m, "sdpa")
    assert {layer.self_attn.packed_backend for layer in m.model.layers} == {"sdpa"}
