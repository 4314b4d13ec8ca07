"""The LLaVA family: released sizes on the meta device, the plain / vicuna_v1 templates against
goldens from LLaVA's own code (llava/conversation.py, llava/train/train.py: preprocess_plain,
preprocess_v1, preprocess_multimodal; llava/mm_utils.py: tokenizer_image_token), pad-to-square
with the mean colour, the rename tables both ways, and the tiny model trained through both stages
on the demo data, exported, and reloaded by transformers' native class with the same logits."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image
from test_reference_goldens import tokenizer

from conftest import compose_config
from vlmtrain.data.conversation import Conversation
from vlmtrain.data.placeholders import CLIP_MEAN, ImageLayout
from vlmtrain.data.render import Renderer
from vlmtrain.data.templates import VICUNA_SYSTEM, get_template
from vlmtrain.data.tiling import expand_to_square, single_tile
from vlmtrain.models.family import family_of
from vlmtrain.models.internvl import build_from_config
from vlmtrain.training.loss import IGNORE_INDEX

RELEASED = {  # parameters of the -hf releases, as their model cards give them
    "llava_1_5_7b": 7.06e9,     # llava-hf/llava-1.5-7b-hf
    "llava_1_5_13b": 13.35e9,   # llava-hf/llava-1.5-13b-hf
    "llava_next_7b": 7.06e9,    # llava-hf/llava-v1.6-vicuna-7b-hf
}
TPT = 3
LAYOUT = ImageLayout(context="<image>", start="", end="", special_tokens=("<image>",), tokens_per_tile=TPT)


def llava_tokenizer():
    tok = tokenizer(True)  # a BOS-adding tokenizer, as Vicuna's
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def spans(tok, ids, labels) -> list[str]:
    """The supervised runs of a rendered sample, decoded."""
    out, run = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            run.append(i)
        elif run:
            out.append(tok.decode(run))
            run = []
    if run:
        out.append(tok.decode(run))
    return out


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_sizes_on_meta(name):
    cfg = compose_config([f"model={name}"])
    model = build_from_config(cfg.model, device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - RELEASED[name]) / RELEASED[name] < 0.01, total
    assert type(model).__name__ == ("LlavaNextForConditionalGeneration" if "next" in name
                                    else "LlavaForConditionalGeneration")
    assert model.config.vision_feature_layer == -2 and model.config.image_seq_length == 576
    assert cfg.model.template == "vicuna_v1" and model.config.image_token_id == 32000


def test_vicuna_v1_golden():
    """conv_vicuna_v1.get_prompt(): system + ' ' + 'USER: ' + q + ' ' + 'ASSISTANT: ' + a + '</s>' per
    round; preprocess_v1 masks every round through 'ASSISTANT:' (instruction_len = len - 2: the BOS
    and the header's trailing space, which the answer's first token carries), so the answer and its
    '</s>' train. The image goes first: preprocess_multimodal writes '<image>\\n' + the rest, stripped."""
    tok = llava_tokenizer()
    conv = Conversation(turns=[("What is <image> this?", "A cat."), ("Color?", "Black.")], images=[None])
    r = Renderer(tok, LAYOUT).render(conv, get_template("vicuna_v1"), [1])
    prompt = (f"{VICUNA_SYSTEM} USER: <image>\nWhat is  this? ASSISTANT: A cat.</s>"
              "USER: Color? ASSISTANT: Black.</s>")  # LLaVA's string, <image> before expansion
    assert r.text == "<s>" + prompt.replace("<image>", "<image>" * TPT)
    # tokenizer_image_token: the chunks around <image> tokenised apart, one BOS, the image index between
    before, after = prompt.split("<image>")
    img = tok.convert_tokens_to_ids("<image>")
    assert r.input_ids == tok(before)["input_ids"] + [img] * TPT + tok(after, add_special_tokens=False)["input_ids"]
    assert spans(tok, r.input_ids, r.labels) == [" A cat.</s>", " Black.</s>"]
    # the generation prompt ends at 'ASSISTANT:' (get_prompt with an open last message)
    open_conv = Conversation(turns=[("<image>\nWhat is this?", None)], images=[None])
    assert Renderer(tok, LAYOUT).render(open_conv, get_template("vicuna_v1"), [1]).text.endswith(
        "USER: " + "<image>" * TPT + "\nWhat is this? ASSISTANT:")


def test_plain_golden():
    """preprocess_plain: the first message becomes '<image>' alone, then the caption and sep '\\n';
    the tokens of tokenizer_image_token('<image>') (BOS and the image) are masked."""
    tok = llava_tokenizer()
    conv = Conversation(turns=[("<image>\nGive a short description.", "A red circle.")], images=[None])
    r = Renderer(tok, LAYOUT).render(conv, get_template("plain"), [1])
    assert r.text == "<s>" + "<image>" * TPT + "A red circle.\n"
    img = tok.convert_tokens_to_ids("<image>")
    assert r.input_ids == [tok.bos_token_id] + [img] * TPT + tok("A red circle.\n", add_special_tokens=False)["input_ids"]
    assert r.labels[:1 + TPT] == [IGNORE_INDEX] * (1 + TPT) and r.labels[1 + TPT:] == r.input_ids[1 + TPT:]


def test_pad_to_square_with_the_mean_colour():
    """train.py's expand2square with tuple(int(x * 255) for x in image_mean): CLIP's mean is
    (122, 116, 104), the colour LLaVA's conversation.py pads with; the image sits centred."""
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    sq = expand_to_square(img, tuple(int(m * 255) for m in CLIP_MEAN))
    assert sq.size == (60, 60) and sq.getpixel((0, 0)) == (122, 116, 104)
    assert sq.getpixel((30, 20)) == (255, 0, 0) and sq.getpixel((30, 19)) == (122, 116, 104)
    assert sq.getpixel((30, 39)) == (255, 0, 0) and sq.getpixel((30, 40)) == (122, 116, 104)
    tile = single_tile(img, "pad", 30, CLIP_MEAN)
    assert tile.size == (30, 30) and tile.getpixel((15, 2)) == (122, 116, 104)
    crop = single_tile(Image.new("RGB", (60, 20), (0, 255, 0)), "crop", 30)
    assert crop.size == (30, 30) and crop.getpixel((0, 0)) == (0, 255, 0)  # shortest side to 30, centre crop


def native_and_original(name: str, seed: int):
    """(cfg, tokenizer, model, its state, the state in the original LLaVA layout) of a seeded tiny build."""
    from vlmtrain.models.build import build_model, load_tokenizer

    cfg = compose_config([f"model={name}"])
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, seed=seed)
    native = {k: v.clone() for k, v in model.state_dict().items()}
    return cfg, tok, model, native, family_of(model).from_native(native)


def test_rename_tables_both_ways(tmp_path):
    """Native <-> the original LLaVA layout (model.mm_projector.{0,2}, model.vision_tower.vision_tower.
    vision_model.*, model.layers.*), and a checkpoint in each layout loads by path to the same weights."""
    from safetensors.torch import save_file

    from vlmtrain.models.build import build_model

    cfg, tok, model, native, original = native_and_original("llava_tiny", seed=3)
    fam = family_of(model)
    assert "model.mm_projector.0.weight" in original and "model.mm_projector.2.bias" in original
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in original
    assert "model.layers.0.self_attn.q_proj.weight" in original and "lm_head.weight" in original
    back = fam.to_native(original, model.config.text_config)
    assert back.keys() == native.keys() and all(torch.equal(back[k], native[k]) for k in native)
    hub = {k.replace("model.vision_tower.", "vision_tower.vision_model.")
            .replace("model.multi_modal_projector.", "multi_modal_projector.")
            .replace("model.language_model.", "language_model.model.")
            .replace("lm_head.", "language_model.lm_head."): v for k, v in native.items()}
    for layout, state in (("original", original), ("hub", hub)):
        (tmp_path / layout).mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / layout / "model.safetensors"))
        cfg.model.path = str(tmp_path / layout)
        loaded = build_model(cfg.model, tok, seed=9).state_dict()
        assert all(torch.equal(loaded[k], native[k]) for k in native), layout
    # the ViT alone from a CLIP checkpoint (vision_model.*; the text half is not the VLM's)
    clip = {"vision_model." + k.removeprefix("model.vision_tower."): v for k, v in native.items()
            if k.startswith("model.vision_tower.")}
    clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)
    (tmp_path / "clip").mkdir()
    save_file(clip, str(tmp_path / "clip" / "model.safetensors"))
    cfg.model.path, cfg.model.vision.path = None, str(tmp_path / "clip")
    loaded = build_model(cfg.model, tok, seed=9).state_dict()
    assert all(torch.equal(loaded[k], native[k]) for k in native if k.startswith("model.vision_tower."))


def test_a_pretrain_stage_projector_file_loads_by_path(tmp_path):
    """LLaVA's pretrain stage writes mm_projector.bin (model.mm_projector.{0,2}.*, torch.save of a
    plain dict); finetune starts from it: model.projector_path loads it over CLIP + Vicuna."""
    from vlmtrain.models.build import build_model, load_tokenizer

    cfg = compose_config(["model=llava_tiny"])
    tok = load_tokenizer(cfg.model)
    trained = build_model(cfg.model, tok, seed=3)
    original = family_of(trained).from_native(trained.state_dict())
    torch.save({k: v.clone() for k, v in original.items() if k.startswith("model.mm_projector.")},
               tmp_path / "mm_projector.bin")
    cfg.model.projector_path, cfg.model.allow_pickle = str(tmp_path / "mm_projector.bin"), True
    loaded = build_model(cfg.model, tok, seed=9).state_dict()
    fresh = build_model(compose_config(["model=llava_tiny"]).model, tok, seed=9).state_dict()
    native = trained.state_dict()
    assert any(k.startswith("model.multi_modal_projector.") for k in loaded)
    for k, v in loaded.items():
        assert torch.equal(v, native[k] if k.startswith("model.multi_modal_projector.") else fresh[k]), k


def _losses(run_dir):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.slow
def test_tiny_llava_trains_both_stages_and_exports_to_the_native_class(tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlmtrain.data.images import normalize_pixels
    from vlmtrain.models.checkpoint import load_trained
    from vlmtrain.models.export import export
    from vlmtrain.training.run import train

    common = ["model=llava_tiny", "data.num_workers=0", "stage.max_epochs=-1"]
    pre_cfg = compose_config(["stage=llava_pretrain", "stage.max_steps=10", *common], run_dir=tmp_path / "pre")
    assert pre_cfg.data.template == "plain" and pre_cfg.data.image_mode == "crop"
    pre = train(pre_cfg)
    ft_cfg = compose_config(["stage=llava_finetune", f"init_from={pre}", "stage.max_steps=8", "optim.lr=1e-3",
                             *common], run_dir=tmp_path / "ft")
    assert ft_cfg.data.template == "vicuna_v1" and ft_cfg.data.image_mode == "pad"
    ft = train(ft_cfg)
    for run in (pre, ft):
        losses = _losses(run)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    w_pre = torch.load(pre / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    w_ft = torch.load(ft / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    vit = "model.model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    llm = "model.model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(w_pre[vit], w_ft[vit]) and not torch.equal(w_pre[llm], w_ft[llm])

    out = export(compose_config(["ckpt=" + str(ft), "out=" + str(tmp_path / "hf")], config_name="export"))
    trained, native = load_trained(ft), AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    assert type(native).__name__ == "LlavaForConditionalGeneration"
    fam, reloaded = family_of(trained.model), load_trained(out)
    layout = fam.layout(trained.model_cfg)
    tok = trained.tokenizer
    ids = torch.tensor([tok("USER: ")["input_ids"] + [tok.convert_tokens_to_ids("<image>")] * layout.tokens_per_tile
                        + tok("\nWhat is it? ASSISTANT:")["input_ids"]])
    px = torch.randint(0, 256, (1, 3, 112, 112), dtype=torch.uint8)
    with torch.no_grad():
        def logits(m):
            h = fam.decoder(m)(inputs_embeds=fam.multimodal_embeddings(m, ids, px)).last_hidden_state
            return fam.lm_head(m)(h)
        ours = logits(trained.model)
        theirs = native(input_ids=ids, pixel_values=normalize_pixels(px, layout.mean, layout.std)).logits
    torch.testing.assert_close(theirs, ours)
    torch.testing.assert_close(logits(reloaded.model), ours)
