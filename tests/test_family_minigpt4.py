"""The MiniGPT-4 family: released sizes on the meta device, the minigpt4 (stage 2) and plain
(stage 1) layouts against goldens from MiniGPT-4's own code (minigpt4/models/minigpt_base.py:
prompt_wrap, preparing_embedding, forward; train_configs/minigpt4_stage{1,2}*.yaml;
prompts/alignment.txt), the rename table to and from MiniGPT-4's module names, and the tiny model
trained through both stages on the demo data, exported, and reloaded by transformers'
Blip2ForConditionalGeneration with the same logits."""

from __future__ import annotations

import csv

import pytest
import torch
from test_reference_goldens import tokenizer

from conftest import compose_config
from vlmtrain.data.conversation import Conversation
from vlmtrain.data.placeholders import ImageLayout
from vlmtrain.data.render import Renderer
from vlmtrain.data.templates import get_template
from vlmtrain.models.family import family_of
from vlmtrain.models.internvl import build_from_config
from vlmtrain.training.loss import IGNORE_INDEX

# EVA ViT-g (39 layers) + Q-Former without its text half: blip2-opt-2.7b's 3.74B less OPT-2.7B's
# 2.65B (and its 2.6M projection) is 1.09B; + Linear(768, D) + Vicuna (LLaMA 6.74B / 13.02B)
RELEASED = {"minigpt4_7b": 7.83e9, "minigpt4_13b": 14.11e9}
N = 4
LAYOUT = ImageLayout(context="<ImageHere>", start="<Img>", end="</Img>", markers_are_text=True,
                     special_tokens=("<ImageHere>",), tokens_per_tile=N)


def mg_tokenizer():
    tok = tokenizer(True)  # BOS-adding, as LLaMA's
    tok.add_tokens(["<ImageHere>"], special_tokens=True)
    return tok


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_sizes_on_meta(name):
    cfg = compose_config([f"model={name}"])
    model = build_from_config(cfg.model, device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - RELEASED[name]) / RELEASED[name] < 0.01, total
    assert type(model).__name__ == "Blip2ForConditionalGeneration"
    assert model.config.num_query_tokens == 32 and model.config.vision_config.num_hidden_layers == 39
    assert not model.config.qformer_config.use_qformer_text_input  # MiniGPT-4 drops the text FFNs
    assert cfg.model.template == "minigpt4"


def test_minigpt4_stage2_golden():
    """Stage 2: prompt_template '###Human: {} ###Assistant: ' around an alignment.txt prompt
    '<Img><ImageHere></Img> Describe this image in detail.'; prompt_wrap tokenises the text before
    and after <ImageHere> without special tokens, forward puts the BOS first, the target
    answer + end_sym '###' is tokenised on its own and is all that carries loss."""
    tok = mg_tokenizer()
    conv = Conversation(turns=[("<image>\nDescribe this image in detail.", "A red circle.")], images=[None])
    r = Renderer(tok, LAYOUT).render(conv, get_template("minigpt4"), [1])
    prompt = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
    assert r.text == "<s>" + prompt.replace("<ImageHere>", "<ImageHere>" * N) + "A red circle.###"
    seg0, seg1 = prompt.split("<ImageHere>")
    img = tok.convert_tokens_to_ids("<ImageHere>")
    plain = {"add_special_tokens": False}
    answer = tok("A red circle.###", **plain)["input_ids"]
    assert r.input_ids == ([tok.bos_token_id] + tok(seg0, **plain)["input_ids"] + [img] * N
                           + tok(seg1, **plain)["input_ids"] + answer)
    assert r.labels == [IGNORE_INDEX] * (len(r.input_ids) - len(answer)) + answer
    # the generation prompt ends with '###Assistant: ' (MiniGPT-4's chat: roles 'Human', 'Assistant', sep '###')
    open_conv = Conversation(turns=[("<image>\nWhat is it?", None)], images=[None])
    assert Renderer(tok, LAYOUT).render(open_conv, get_template("minigpt4"), [1]).text.endswith(
        "</Img> What is it? ###Assistant: ")


def test_minigpt4_stage1_golden():
    """Stage 1 has no prompt (no prompt_path): prompt_wrap returns the image embeddings alone, so
    the input is BOS, the 32 query embeddings, then caption + end_sym '\\n' (the default), the
    caption alone carrying loss. Template plain renders exactly that (no image markers)."""
    tok = mg_tokenizer()
    conv = Conversation(turns=[("<image>\nA caption, please.", "A red circle.")], images=[None])
    r = Renderer(tok, LAYOUT).render(conv, get_template("plain"), [1])
    img = tok.convert_tokens_to_ids("<ImageHere>")
    answer = tok("A red circle.\n", add_special_tokens=False)["input_ids"]
    assert r.input_ids == [tok.bos_token_id] + [img] * N + answer
    assert r.labels == [IGNORE_INDEX] * (1 + N) + answer


def test_rename_table_both_ways(tmp_path):
    """Native Blip2 <-> MiniGPT-4's names (visual_encoder.blocks.*.attn.q_bias / v_bias, ln_vision,
    Qformer.bert.*, query_tokens, llama_proj, llama_model), and a MiniGPT-4-layout file loads by path."""
    from safetensors.torch import save_file

    from vlmtrain.models.build import build_model, load_tokenizer

    cfg = compose_config(["model=minigpt4_tiny"])
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, seed=3)
    fam = family_of(model)
    native = {k: v.clone() for k, v in model.state_dict().items()}
    original = fam.from_native(native)
    for key in ("visual_encoder.blocks.0.attn.q_bias", "visual_encoder.blocks.0.attn.v_bias",
                "visual_encoder.blocks.0.attn.qkv.weight", "ln_vision.weight", "query_tokens",
                "Qformer.bert.embeddings.LayerNorm.weight", "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
                "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias", "llama_proj.weight",
                "llama_model.model.layers.0.self_attn.q_proj.weight", "llama_model.lm_head.weight"):
        assert key in original, key
    assert not any(k.endswith("attn.qkv.bias") for k in original)  # EVA has no k bias
    back = fam.to_native(original, model.config.text_config)
    assert back.keys() == native.keys() and all(torch.equal(back[k], native[k]) for k in native)
    (tmp_path / "mg").mkdir()
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "mg" / "model.safetensors"))
    cfg.model.path = str(tmp_path / "mg")
    loaded = build_model(cfg.model, tok, seed=9).state_dict()
    assert all(torch.equal(loaded[k], native[k]) for k in native)


def test_the_released_projection_alone_loads_by_path(tmp_path):
    """pretrained_minigpt4*.pth holds {"model": {llama_proj.weight, llama_proj.bias}} (LAVIS's save):
    model.projector_path loads it over the rest (BLIP-2's visual side, Vicuna), pickle only when allowed."""
    from vlmtrain.errors import UserError
    from vlmtrain.models.build import build_model, load_tokenizer

    cfg = compose_config(["model=minigpt4_tiny"])
    tok = load_tokenizer(cfg.model)
    trained = build_model(cfg.model, tok, seed=3).state_dict()
    proj = {"llama_proj.weight": trained["language_projection.weight"].clone(),
            "llama_proj.bias": trained["language_projection.bias"].clone()}
    torch.save({"model": proj, "epoch": 4, "config": {"run": {"lr": 1e-4}}}, tmp_path / "pretrained_minigpt4.pth")
    cfg.model.projector_path = str(tmp_path / "pretrained_minigpt4.pth")
    with pytest.raises(UserError, match="allow_pickle"):
        build_model(cfg.model, tok, seed=9)
    cfg.model.allow_pickle = True
    loaded = build_model(cfg.model, tok, seed=9).state_dict()
    fresh = build_model(compose_config(["model=minigpt4_tiny"]).model, tok, seed=9).state_dict()
    for k, v in loaded.items():  # the projection is the file's, everything else the seed-9 init
        want = trained[k] if k.startswith("language_projection.") else fresh[k]
        assert torch.equal(v, want), k
    torch.save({"model": {"llama_model.lm_head.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    cfg.model.projector_path = str(tmp_path / "other.pth")
    with pytest.raises(UserError, match="holds no multi_modal_projector weights"):
        build_model(cfg.model, tok, seed=9)


def _coordinate_image(width: int, height: int):
    """Red = x, green = y (scaled to 0..255): a crop's corners tell where it came from."""
    import numpy as np
    from PIL import Image

    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))


def test_random_resized_crop_is_blip2_train_transform():
    """torchvision's RandomResizedCrop(224, scale=(0.5, 1), ratio=(3/4, 4/3)) as MiniGPT-4's
    blip2_image_train has it: boxes of 50-100% of the area, aspect within 3/4..4/3, seeded by the
    sample; the fallback centre crop for an image no box fits; eval is the plain resize."""
    import random

    import numpy as np
    from PIL import Image

    from vlmtrain.data.tiling import random_resized_crop, single_tile

    image = _coordinate_image(400, 300)
    tiles = [np.asarray(random_resized_crop(image, 224, random.Random(seed)), dtype=float) for seed in range(40)]
    assert np.array_equal(tiles[0], np.asarray(random_resized_crop(image, 224, random.Random(0)), dtype=float))
    assert len({t.tobytes() for t in tiles}) == len(tiles)
    for t in tiles:
        w = (t[0, -1, 0] - t[0, 0, 0]) / 255 * 399 * 224 / 223  # the box's extent, from its corner colours
        h = (t[-1, 0, 1] - t[0, 0, 1]) / 255 * 299 * 224 / 223
        assert 0.5 * 0.95 <= w * h / (400 * 300) <= 1.0 + 1e-6 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05, (w, h)
    wide = _coordinate_image(1000, 10)  # no 50% box of aspect <= 4/3 fits: the centre 13 x 10
    expected = wide.crop((493, 0, 506, 10)).resize((224, 224), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(random_resized_crop(wide, 224, random.Random(1))), np.asarray(expected))
    assert np.array_equal(np.asarray(single_tile(image, "random_crop", 224)),
                          np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC)))


def test_minigpt4_stages_train_on_random_crops_and_evaluate_on_resize():
    import numpy as np

    from vlmtrain.data.mixture import build_mixture

    for stage in ("minigpt4_stage1", "minigpt4_stage2"):
        cfg = compose_config(["model=minigpt4_tiny", f"stage={stage}", "data.datasets.shapes.jpeg_augment=false"])
        assert cfg.data.image_mode == "random_crop" and cfg.model.image_mode == "resize"
        train_set, _ = build_mixture(cfg, training=True)
        eval_set, _ = build_mixture(cfg, training=False)
        with_images = [i for i in range(12) if train_set[i].pixel_values is not None]
        # a new crop every epoch (a wide image's is the same centre crop: no random box fits it)
        assert any(not torch.equal(train_set[i, 0].pixel_values, train_set[i, 1].pixel_values) for i in with_images)
        for i in with_images:
            a = train_set[i, 0].pixel_values
            assert torch.equal(a, train_set[i, 0].pixel_values), "the same crop for the same sample and epoch"
            resized = eval_set[i].pixel_values
            assert torch.equal(resized, eval_set[i, 1].pixel_values) and not torch.equal(resized, a)
            assert np.asarray(resized).shape == np.asarray(a).shape


def _losses(run_dir):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.slow
def test_tiny_minigpt4_trains_both_stages_and_exports_to_blip2(tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlmtrain.data.images import normalize_pixels
    from vlmtrain.models.checkpoint import load_trained
    from vlmtrain.models.export import export
    from vlmtrain.training.run import train

    common = ["model=minigpt4_tiny", "data.num_workers=0", "stage.max_epochs=-1", "optim.lr=1e-2"]
    s1_cfg = compose_config(["stage=minigpt4_stage1", "stage.max_steps=10", *common], run_dir=tmp_path / "s1")
    assert s1_cfg.data.template == "plain" and s1_cfg.optim.scheduler.min_lr_ratio == 0.8 == s1_cfg.stage.min_lr_ratio
    s1 = train(s1_cfg)
    s2_cfg = compose_config(["stage=minigpt4_stage2", f"init_from={s1}", "stage.max_steps=8", *common],
                            run_dir=tmp_path / "s2")
    assert s2_cfg.data.template == "minigpt4"
    s2 = train(s2_cfg)
    for run in (s1, s2):
        losses = _losses(run)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    w1 = torch.load(s1 / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    w2 = torch.load(s2 / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in ("model.vision_model.encoder.layers.0.mlp.fc1.weight", "model.query_tokens",
                "model.qformer.encoder.layer.0.crossattention.attention.key.weight",
                "model.language_model.model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(w1[key], w2[key]), key  # frozen in both stages
    assert not torch.equal(w1["model.language_projection.weight"], w2["model.language_projection.weight"])

    out = export(compose_config(["ckpt=" + str(s2), "out=" + str(tmp_path / "hf")], config_name="export"))
    trained, native = load_trained(s2), AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    assert type(native).__name__ == "Blip2ForConditionalGeneration"
    fam, reloaded = family_of(trained.model), load_trained(out)
    layout = fam.layout(trained.model_cfg)
    tok = trained.tokenizer
    ids = torch.tensor([tok("###Human: <Img>")["input_ids"]
                        + [tok.convert_tokens_to_ids("<ImageHere>")] * layout.tokens_per_tile
                        + tok("</Img> What is it? ###Assistant: ", add_special_tokens=False)["input_ids"]])
    px = torch.randint(0, 256, (1, 3, 56, 56), dtype=torch.uint8)
    with torch.no_grad():
        def logits(m):
            h = fam.decoder(m)(inputs_embeds=fam.multimodal_embeddings(m, ids, px)).last_hidden_state
            return fam.lm_head(m)(h)
        ours = logits(trained.model)
        theirs = native(input_ids=ids, pixel_values=normalize_pixels(px, layout.mean, layout.std)).logits
    torch.testing.assert_close(theirs, ours)
    torch.testing.assert_close(logits(reloaded.model), ours)
