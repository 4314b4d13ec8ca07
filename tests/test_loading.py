"""Local checkpoints in every layout load into the same model: tiny checkpoints written with the
real key names (HF-native, OpenGVLab with Qwen2 / InternLM2 LLMs, standalone InternViT, causal
LMs), loaded back, logits compared exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import compose_config
from vlmtrain.models.build import build_model, load_tokenizer
from vlmtrain.models.checkpoint import load_trained
from vlmtrain.models.loading import split_wqkv

LLAMA = ["model.llm.config.model_type=llama"]


def tiny(overrides=(), seed=0):
    cfg = compose_config(list(overrides))
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, seed).eval()
    with torch.no_grad():  # layer scales and norms away from their init, so mistakes show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, tok, model


def sample(model, tok, tiles=1):
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    n = model.config.image_seq_length * tiles
    text = tok.encode("a red circle", add_special_tokens=False)
    ids = torch.tensor([text + [tok.convert_tokens_to_ids("<img>")] + [ctx] * n + [tok.convert_tokens_to_ids("</img>")] + text])
    g = torch.Generator().manual_seed(0)
    size = model.config.vision_config.image_size[0]
    return ids, torch.randn(tiles, 3, size, size, generator=g)


def logits(model, ids, px):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=px).logits


# -- writers of the original layouts (inverse of the rename tables, key names as released) -------


def opengvlab_vision(state, prefix="model.vision_tower."):
    out = {}
    v = {k.removeprefix(prefix): t for k, t in state.items() if k.startswith(prefix)}
    out["embeddings.class_embedding"] = v.pop("embeddings.cls_token")
    out["embeddings.position_embedding"] = v.pop("embeddings.position_embeddings")
    for kind in ("weight", "bias"):
        out[f"embeddings.patch_embedding.{kind}"] = v.pop(f"embeddings.patch_embeddings.projection.{kind}")
    layers = {int(k.split(".")[2]) for k in v}
    for i in layers:
        src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            if f"{src}attention.q_proj.{kind}" in v:
                out[f"{dst}attn.qkv.{kind}"] = torch.cat([v.pop(f"{src}attention.{p}_proj.{kind}") for p in "qkv"])
            out[f"{dst}attn.proj.{kind}"] = v.pop(f"{src}attention.projection_layer.{kind}")
            out[f"{dst}norm1.{kind}"] = v.pop(f"{src}layernorm_before.{kind}")
            out[f"{dst}norm2.{kind}"] = v.pop(f"{src}layernorm_after.{kind}")
            for fc in ("fc1", "fc2"):
                out[f"{dst}mlp.{fc}.{kind}"] = v.pop(f"{src}mlp.{fc}.{kind}")
        out[f"{dst}ls1"] = v.pop(f"{src}lambda_1")
        out[f"{dst}ls2"] = v.pop(f"{src}lambda_2")
    assert not v, f"writer missed {sorted(v)[:3]}"
    return out


def internlm2_llm(state, heads, kv, head_dim):
    """Llama keys -> InternLM2 keys, fusing q/k/v the way InternLM2 groups them per kv head."""
    groups = heads // kv
    out = {"model.tok_embeddings.weight": state["model.language_model.embed_tokens.weight"],
           "model.norm.weight": state["model.language_model.norm.weight"],
           "output.weight": state["lm_head.weight"]}
    layers = {int(k.split(".")[3]) for k in state if k.startswith("model.language_model.layers.")}
    for i in layers:
        s = f"model.language_model.layers.{i}."
        q = state[s + "self_attn.q_proj.weight"].reshape(kv, groups, head_dim, -1)
        k = state[s + "self_attn.k_proj.weight"].reshape(kv, 1, head_dim, -1)
        v = state[s + "self_attn.v_proj.weight"].reshape(kv, 1, head_dim, -1)
        d = f"model.layers.{i}."
        out[d + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
        out[d + "attention.wo.weight"] = state[s + "self_attn.o_proj.weight"]
        out[d + "feed_forward.w1.weight"] = state[s + "mlp.gate_proj.weight"]
        out[d + "feed_forward.w3.weight"] = state[s + "mlp.up_proj.weight"]
        out[d + "feed_forward.w2.weight"] = state[s + "mlp.down_proj.weight"]
        out[d + "attention_norm.weight"] = state[s + "input_layernorm.weight"]
        out[d + "ffn_norm.weight"] = state[s + "post_attention_layernorm.weight"]
    return out


def opengvlab_checkpoint(model, internlm2: bool):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"vision_model." + k: v for k, v in opengvlab_vision(state).items()}
    for i, name in ((0, "layer_norm"), (1, "linear_1"), (3, "linear_2")):
        for kind in ("weight", "bias"):
            out[f"mlp1.{i}.{kind}"] = state[f"model.multi_modal_projector.{name}.{kind}"]
    tc = model.config.text_config
    if internlm2:
        llm = internlm2_llm(state, tc.num_attention_heads, tc.num_key_value_heads, tc.hidden_size // tc.num_attention_heads)
    else:
        llm = {("model." + k.removeprefix("model.language_model.")): v for k, v in state.items()
               if k.startswith("model.language_model.")}
        llm["lm_head.weight"] = state["lm_head.weight"]
    out.update({"language_model." + k: v for k, v in llm.items()})
    return out


def opengvlab_config(cfg, internlm2: bool) -> dict:
    v, t = cfg.model.vision, dict(cfg.model.llm.config)
    t.setdefault("rms_norm_eps", 1e-6)  # released configs always name it
    llm = dict(t, model_type="internlm2", architectures=["InternLM2ForCausalLM"], bias=False) if internlm2 else \
        dict(t, architectures=["Qwen2ForCausalLM"])
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
            "template": "internvl2_5", "select_layer": -1, "ps_version": "v2",
            "vision_config": {"architectures": ["InternVisionModel"], "hidden_size": v.hidden_size,
                              "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                              "intermediate_size": v.intermediate_size, "image_size": v.image_size,
                              "patch_size": v.patch_size, "qkv_bias": True, "qk_normalization": False,
                              "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "initializer_factor": 0.1},
            "llm_config": llm}


# -- tests ----------------------------------------------------------------------------------------


def test_split_wqkv_matches_internlm2_grouping():
    """InternLM2 computes qkv = x @ wqkv.T, views it as (kv_heads, groups + 2, head_dim) and takes
    [:groups] as q, [-2] as k, [-1] as v; the split weights must give the same q, k, v."""
    heads, kv, hd, hidden = 8, 2, 4, 16
    w = torch.randn(kv * (heads // kv + 2) * hd, hidden)
    x = torch.randn(3, hidden)
    qkv = (x @ w.T).reshape(3, kv, heads // kv + 2, hd)
    q_ref = qkv[:, :, : heads // kv].reshape(3, heads * hd)
    k_ref, v_ref = qkv[:, :, -2].reshape(3, kv * hd), qkv[:, :, -1].reshape(3, kv * hd)
    q, k, v = split_wqkv(w, heads, kv, hd)
    assert torch.equal(x @ q.T, q_ref) and torch.equal(x @ k.T, k_ref) and torch.equal(x @ v.T, v_ref)


def test_hf_native_dir_loads_with_model_path(tmp_path):
    cfg, tok, model = tiny()
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    ids, px = sample(model, tok)
    cfg2 = compose_config([f"model.path={tmp_path / 'hf'}"])
    loaded = build_model(cfg2.model, load_tokenizer(cfg2.model)).eval()
    assert torch.equal(logits(loaded, ids, px), logits(model, ids, px))
    assert torch.equal(logits(load_trained(tmp_path / "hf").model, ids, px), logits(model, ids, px))


@pytest.mark.parametrize("internlm2", [False, True], ids=["qwen2", "internlm2"])
def test_opengvlab_layout(tmp_path, internlm2):
    cfg, tok, model = tiny(LLAMA if internlm2 else [])
    ckpt = tmp_path / "ogvl"
    ckpt.mkdir()
    state = opengvlab_checkpoint(model, internlm2)
    assert any("wqkv" in k for k in state) == internlm2
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(opengvlab_config(cfg, internlm2)))
    tok.save_pretrained(ckpt)
    ids, px = sample(model, tok)
    ref = logits(model, ids, px)
    cfg2 = compose_config([*(LLAMA if internlm2 else []), f"model.path={ckpt}"])
    assert torch.equal(logits(build_model(cfg2.model, load_tokenizer(cfg2.model)).eval(), ids, px), ref)
    # the directory alone (config.json read, no vlmtrain config) loads the same model
    trained = load_trained(ckpt)
    assert trained.model_cfg.llm.config.model_type == ("llama" if internlm2 else "qwen2")
    assert torch.equal(logits(trained.model, ids, px), ref)


def test_composition_vit_from_vlm_and_llm_from_causal_lm(tmp_path):
    """Progressive scaling as config: the ViT of a trained VLM (OpenGVLab layout) in front of a
    different LLM (an InternLM2 causal-LM checkpoint with a smaller vocabulary), new projector."""
    _, tok, donor = tiny(seed=1)
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    save_file({k: v.contiguous() for k, v in opengvlab_checkpoint(donor, False).items()}, str(vlm / "model.safetensors"))
    _, _, llm_src = tiny(LLAMA + ["model.llm.config.hidden_size=96", "model.llm.config.num_attention_heads=4"], seed=2)
    s = llm_src.state_dict()
    tc = llm_src.config.text_config
    lm = internlm2_llm(s, tc.num_attention_heads, tc.num_key_value_heads, tc.hidden_size // tc.num_attention_heads)
    keep = len(tok) - 9  # the LLM's own vocabulary lacks the 9 InternVL tokens
    lm["model.tok_embeddings.weight"] = lm["model.tok_embeddings.weight"][:keep]
    lm["output.weight"] = lm["output.weight"][:keep]
    save_file({k: v.contiguous() for k, v in lm.items()}, str(tmp_path / "lm.safetensors"))
    cfg = compose_config(LLAMA + ["model.llm.config.hidden_size=96", "model.llm.config.num_attention_heads=4",
                                  f"model.vision.path={vlm}", f"model.llm.path={tmp_path / 'lm.safetensors'}",
                                  f"model.tokenizer={tmp_path / 'tok'}"])
    tok.save_pretrained(tmp_path / "tok")
    model = build_model(cfg.model, load_tokenizer(cfg.model))
    got = model.state_dict()
    for k, v in donor.state_dict().items():
        if k.startswith("model.vision_tower."):
            assert torch.equal(got[k], v), k
    for k, v in s.items():
        if k.startswith("model.language_model.layers."):
            assert torch.equal(got[k], v), k
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        rows = s[key][:keep]
        assert torch.equal(got[key][:keep], rows)
        assert torch.allclose(got[key][keep:], rows.mean(0, keepdim=True).expand(9, -1))
    assert model.model.multi_modal_projector.linear_1.weight.shape == (96, 256)


def test_pickle_refused_unless_allowed(tmp_path):
    _, tok, model = tiny()
    d = tmp_path / "bin"
    d.mkdir()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    tok.save_pretrained(d)
    cfg = compose_config([f"model.path={d}"])
    with pytest.raises(ValueError, match="allow_pickle"):
        build_model(cfg.model, load_tokenizer(cfg.model))
    cfg = compose_config([f"model.path={d}", "model.allow_pickle=true"])
    ids, px = sample(model, tok)
    assert torch.equal(logits(build_model(cfg.model, load_tokenizer(cfg.model)).eval(), ids, px), logits(model, ids, px))


def test_shape_mismatch_names_first_key(tmp_path):
    _, tok, model = tiny()
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    cfg = compose_config([f"model.path={tmp_path / 'hf'}", "model.vision.intermediate_size=128"])
    with pytest.raises(ValueError, match=r"shape mismatch at 'model\.vision_tower\.encoder\.layer\.0\.mlp\.fc1\.weight'"):
        build_model(cfg.model, load_tokenizer(cfg.model))


def test_standalone_internvit_for_vision_path(tmp_path):
    _, tok, donor = tiny(seed=3)
    save_file({k: v.contiguous() for k, v in opengvlab_vision(donor.state_dict()).items()}, str(tmp_path / "vit.safetensors"))
    cfg = compose_config([f"model.vision.path={tmp_path / 'vit.safetensors'}"])
    model = build_model(cfg.model, load_tokenizer(cfg.model))
    got = model.state_dict()
    for k, v in donor.state_dict().items():
        if k.startswith("model.vision_tower."):
            assert torch.equal(got[k], v), k


def test_tokenizer_that_needs_remote_code_is_refused(tmp_path):
    d = tmp_path / "ogvl_tok"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}))
    (d / "tokenizer.model").write_bytes(b"\x00not a real sentencepiece model")
    cfg = compose_config([f"model.tokenizer={d}"])
    with pytest.raises(ValueError, match="InternLM2Tokenizer.*never"):
        load_tokenizer(cfg.model)


def test_vision_path_takes_the_vit_of_a_training_run(tmp_path):
    """Progressive scaling from a run directory: its (stage-1.5) ViT in front of another LLM."""
    from model_fixtures import make_run_dir

    _, trained_model, _ = make_run_dir(tmp_path / "run", ["stage=vit_incremental"])
    cfg = compose_config(LLAMA + [f"model.vision.path={tmp_path / 'run'}"])
    model = build_model(cfg.model, load_tokenizer(cfg.model))
    got = model.state_dict()
    vit = {k: v for k, v in trained_model.state_dict().items() if k.startswith("model.vision_tower.")}
    assert vit and all(torch.equal(got[k], v) for k, v in vit.items())


def test_llm_path_with_padded_vocabulary_is_cut_to_the_config(tmp_path):
    """Qwen2.5 checkpoints pad their vocabulary (151936 rows) beyond InternVL's 151674: the rows
    past the configured vocabulary are dropped, the rest kept as they are."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = compose_config([f"model.llm.path={tmp_path / 'lm'}", f"model.tokenizer={tmp_path / 'tok'}"])
    tok = load_tokenizer(compose_config([]).model)
    tok.save_pretrained(tmp_path / "tok")
    text = dict(cfg.model.llm.config)
    text.pop("model_type")
    text["vocab_size"] = 2048 + 64
    lm = Qwen2ForCausalLM(Qwen2Config(**text))
    lm.save_pretrained(tmp_path / "lm")
    model = build_model(cfg.model, load_tokenizer(cfg.model))
    got, src = model.state_dict(), lm.state_dict()
    assert torch.equal(got["model.language_model.embed_tokens.weight"], src["model.embed_tokens.weight"][:2048])
    assert torch.equal(got["lm_head.weight"], src["lm_head.weight"][:2048])
    assert torch.equal(got["model.language_model.layers.1.mlp.down_proj.weight"], src["model.layers.1.mlp.down_proj.weight"])
