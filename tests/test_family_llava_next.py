"""LLaVA-NeXT's anyres path against transformers, which rendered what the released
``llava-hf/llava-v1.6-*`` checkpoints were shown: tiles pixel for pixel against
``LlavaNextImageProcessor`` (its PIL backend), token counts against ``LlavaNextProcessor``, the
packed features against ``LlavaNextForConditionalGeneration``'s own forward; pairs and packing
carry the image sizes; the tiny model trains through its two stages, exports to the native class
(same logits, the exported processor config gives the same pixels) and chats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_family_llava import _losses, native_and_original
from transformers import LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from conftest import compose_config
from vlmtrain.data.anyres import AnyRes
from vlmtrain.data.collate import pad_batch
from vlmtrain.data.conversation import Conversation
from vlmtrain.data.encode import EncodedSample, PairSample
from vlmtrain.data.images import normalize_pixels, to_pixel_bytes
from vlmtrain.data.packing import pack_pairs, pack_samples
from vlmtrain.data.placeholders import CLIP_MEAN, CLIP_STD
from vlmtrain.data.render import Renderer
from vlmtrain.data.templates import get_template
from vlmtrain.errors import UserError
from vlmtrain.models.build import build_model, load_tokenizer
from vlmtrain.models.family import family_of

RELEASE_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINPOINTS = [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]]
SIZES = [(100, 100), (336, 336), (640, 480), (480, 640), (1000, 300), (300, 1000), (1200, 900), (50, 800),
         (333, 671), (2000, 20), (97, 301)]
"""(width, height): square, both orientations, extreme aspects, sizes that round at the unpad edge."""


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_processor(pinpoints, side: int) -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints, size={"shortest_edge": side},
                                      crop_size={"height": side, "width": side}, image_mean=CLIP_MEAN,
                                      image_std=CLIP_STD)


@pytest.mark.parametrize("pinpoints,side", [(RELEASE_PINPOINTS, 336), (TINY_PINPOINTS, 112)])
def test_anyres_tiles_match_transformers_image_processor(pinpoints, side):
    proc, grids = hf_processor(pinpoints, side), AnyRes(tuple(map(tuple, pinpoints)), side, side // 14)
    for width, height in SIZES:
        image = noise(width, height)
        ref = proc(images=image, return_tensors="pt")
        tiles = grids.tiles(image)
        assert len(tiles) == grids.num_tiles(height, width)
        assert ref["image_sizes"][0].tolist() == [height, width]
        ours = normalize_pixels(to_pixel_bytes(tiles), CLIP_MEAN, CLIP_STD)
        # the same PIL resizes and black padding: equal up to the normalisation's float rounding
        torch.testing.assert_close(ours, ref["pixel_values"][0, :len(tiles)], atol=1e-5, rtol=0)
        assert not ref["pixel_values"][0, len(tiles):].any(), "transformers pads a batch's patch count with zeros"


def test_anyres_token_counts_match_transformers_processor():
    tok = load_tokenizer(compose_config(["model=llava_next_tiny"]).model)
    for pinpoints, side in [(RELEASE_PINPOINTS, 336), (TINY_PINPOINTS, 112)]:
        proc = LlavaNextProcessor(image_processor=hf_processor(pinpoints, side), tokenizer=tok, patch_size=14,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
        grids = AnyRes(tuple(map(tuple, pinpoints)), side, side // 14)
        image_id = tok.convert_tokens_to_ids("<image>")
        for width, height in SIZES:
            ids = list(proc(images=noise(width, height), text="USER: <image>\nWhat is it? ASSISTANT:")["input_ids"][0])
            assert ids.count(image_id) == grids.tokens(height, width), (width, height, side)


def test_rendered_sample_has_the_processor_count_and_text():
    cfg = compose_config(["model=llava_next_tiny"])
    tok = load_tokenizer(cfg.model)
    layout = family_of(cfg.model).layout(cfg.model)
    conv = Conversation(turns=[("<image>\nWhat is it?", "A cat.")], images=["a.jpg"])
    r = Renderer(tok, layout).render(conv, get_template("vicuna_v1"), [5], image_sizes=[(480, 640)])
    n = layout.anyres.tokens(480, 640)
    assert n != 5 * layout.tokens_per_tile
    assert r.input_ids.count(tok.convert_tokens_to_ids("<image>")) == n
    assert "<image>" * n + "\nWhat is it?" in r.text
    with pytest.raises(ValueError, match="2 image sizes for 1 images"):
        Renderer(tok, layout).render(conv, get_template("vicuna_v1"), [5], image_sizes=[(1, 1), (2, 2)])


@pytest.fixture(scope="module")
def tiny():
    cfg = compose_config(["model=llava_next_tiny"])
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, seed=0).eval()
    with torch.no_grad():  # a visible newline: the random init leaves it at zero
        model.model.image_newline.normal_()
    fam = family_of(model)
    return cfg, tok, model, fam, fam.layout(cfg.model)


def sample(tok, layout, images: list[Image.Image], answer: str = "A cat.") -> EncodedSample:
    """One rendered sample with its anyres tiles, as the data side builds it."""
    conv = Conversation(turns=[("".join("<image>\n" for _ in images) + "What is it?", answer)],
                        images=["x"] * len(images))
    tiles = [t for im in images for t in layout.anyres.tiles(im)]
    sizes = [(im.height, im.width) for im in images]
    r = Renderer(tok, layout).render(conv, get_template("vicuna_v1"), [layout.anyres.num_tiles(*s) for s in sizes],
                                     image_sizes=sizes)
    return EncodedSample(input_ids=torch.tensor(r.input_ids), labels=torch.tensor(r.labels),
                         pixel_values=to_pixel_bytes(tiles), num_tiles=[layout.anyres.num_tiles(*s) for s in sizes],
                         image_sizes=sizes)


def logits(fam, model, batch) -> torch.Tensor:
    """Through training's own forward (``objective.hidden_states``: packed attention for packed rows)."""
    from vlmtrain.training.objective import hidden_states

    return fam.lm_head(model)(hidden_states(model, batch))


def test_anyres_features_match_the_native_forward(tiny):
    cfg, tok, model, fam, layout = tiny
    # three images in one text: two grids, and one so wide that unpadding leaves no grid row
    s = sample(tok, layout, [noise(200, 90, 1), noise(60, 230, 2), noise(900, 5, 3)])
    assert layout.anyres.tokens(5, 900) == layout.tokens_per_tile
    batch = pad_batch([s], tok.pad_token_id, 112, pad_multiple=1)
    assert batch.image_sizes == [(90, 200), (230, 60), (5, 900)]
    with torch.no_grad():
        ours = logits(fam, model, batch)
        theirs = model(input_ids=batch.input_ids, pixel_values=normalize_pixels(batch.pixel_values, CLIP_MEAN, CLIP_STD),
                       image_sizes=torch.tensor(batch.image_sizes)).logits
    torch.testing.assert_close(ours, theirs)


def test_packed_pairs_carry_each_answer_its_image_sizes(tiny):
    cfg, tok, model, fam, layout = tiny
    a, b = noise(200, 90, 3), noise(150, 150, 4)
    pairs = [PairSample(sample(tok, layout, [a]), _rejected(sample(tok, layout, [a], "A dog."))),
             PairSample(sample(tok, layout, [b]), _rejected(sample(tok, layout, [b], "A dog.")))]
    packed = pack_pairs(pairs, 112)
    assert packed.image_sizes == [(90, 200), (90, 200), (150, 150), (150, 150)]
    assert packed.pixel_values.shape[0] == layout.anyres.num_tiles(90, 200) + layout.anyres.num_tiles(150, 150)
    with torch.no_grad():
        packed_logits = logits(fam, model, packed)
        alone = [logits(fam, model, pack_samples([p.chosen], 112)) for p in pairs]
    # each chosen answer sees the features it sees alone (the rejected ones share its tiles)
    n0 = len(pairs[0].chosen)
    torch.testing.assert_close(packed_logits[:, :n0], alone[0])
    start = n0 + len(pairs[0].rejected)
    torch.testing.assert_close(packed_logits[:, start:start + len(pairs[1].chosen)], alone[1], atol=1e-5, rtol=1e-4)


def _rejected(s: EncodedSample) -> EncodedSample:
    s.pixel_values = None  # a pair holds its tiles once, in the chosen sample
    return s


def test_anyres_needs_grids_and_skips_video(tmp_path):
    from vlmtrain.data.mixture import MixtureDataset

    cfg = compose_config(["model=llava_tiny", "data.image_mode=anyres"])
    tok = load_tokenizer(cfg.model)
    with pytest.raises(UserError, match="data.image_mode=anyres needs a model with anyres grids"):
        MixtureDataset(cfg.data, tok, family_of(cfg.model).layout(cfg.model))
    data = tmp_path / "v.jsonl"
    data.write_text(json.dumps({"video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Nothing."}]}) + "\n")
    cfg = compose_config(["model=llava_next_tiny", "data=single", f"data.path={data}"])
    ds = MixtureDataset(cfg.data, tok, family_of(cfg.model).layout(cfg.model))
    skipped = ds[0]
    assert skipped.reason == "bad_media" and "anyres" in skipped.message
    # InternVL tiling's speed-ups would do nothing here: refused, not ignored
    for extra, message in (("data.fast_resize=true", "data.fast_resize applies to data.image_mode=tile, not anyres"),
                           (f"++data.datasets.single.tile_cache={tmp_path}",
                            "data.datasets.single.tile_cache holds InternVL's tiles")):
        cfg = compose_config(["model=llava_next_tiny", "data=single", f"data.path={data}", extra])
        with pytest.raises(UserError, match=message):
            MixtureDataset(cfg.data, tok, family_of(cfg.model).layout(cfg.model))


def test_pinpoints_must_be_tile_multiples():
    with pytest.raises(UserError, match=r"\[100, 224\] is not a multiple of the tile size 112"):
        AnyRes(((100, 224),), 112, 8)
    with pytest.raises(UserError, match="image_grid_pinpoints is empty"):
        AnyRes((), 112, 8)


@pytest.mark.slow
def test_tiny_llava_next_trains_both_stages_exports_and_chats(tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlmtrain.data.prompt import Prompt
    from vlmtrain.inference.engine import GenerationConfig, InferenceEngine
    from vlmtrain.models.checkpoint import load_trained
    from vlmtrain.models.export import export
    from vlmtrain.training.run import train

    common = ["model=llava_next_tiny", "data.num_workers=0", "stage.max_epochs=-1"]
    pre_cfg = compose_config(["stage=llava_pretrain", "stage.max_steps=8", *common], run_dir=tmp_path / "pre")
    assert pre_cfg.data.image_mode == "crop"  # LLaVA-NeXT's stage 1: square images, flat features
    pre = train(pre_cfg)
    ft_cfg = compose_config(["stage=llava_next_finetune", f"init_from={pre}", "stage.max_steps=8", "optim.lr=1e-3",
                             "data/collate=packed", "data.collate.max_tokens=4096", *common], run_dir=tmp_path / "ft")
    assert ft_cfg.data.image_mode == "anyres" and ft_cfg.data.template == "vicuna_v1"
    ft = train(ft_cfg)
    for run in (pre, ft):
        losses = _losses(run)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["tiles"] > summary["samples"], "anyres: several tiles an image"
    w_pre = torch.load(pre / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    w_ft = torch.load(ft / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in ("model.model.vision_tower.encoder.layers.0.mlp.fc1.weight", "model.model.image_newline",
                "model.model.language_model.layers.0.mlp.up_proj.weight"):
        assert not torch.equal(w_pre[key], w_ft[key]), key  # stage 2 trains the ViT, the newline and the LLM

    out = export(compose_config(["ckpt=" + str(ft), "out=" + str(tmp_path / "hf")], config_name="export"))
    native = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    assert type(native).__name__ == "LlavaNextForConditionalGeneration"
    processor_cfg = json.loads((out / "preprocessor_config.json").read_text())
    assert processor_cfg["image_grid_pinpoints"] == TINY_PINPOINTS
    exported = LlavaNextImageProcessorPil(**{k: v for k, v in processor_cfg.items() if k != "image_processor_type"})
    trained = load_trained(ft)
    engine = InferenceEngine(trained, device="cpu")
    image = noise(190, 100, 5)
    prompt = Prompt("<image>\nWhat is it?", images=[image])
    inputs = engine._inputs([prompt])
    ref = exported(images=image, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], ref["pixel_values"][0], atol=1e-5, rtol=0)
    assert inputs["image_sizes"].tolist() == ref["image_sizes"].tolist()
    with torch.no_grad():
        ours = trained.model(**inputs).logits
        theirs = native(**inputs).logits
    torch.testing.assert_close(theirs, ours)
    answer = engine.generate([prompt], GenerationConfig(max_new_tokens=4))[0]
    with torch.no_grad():
        direct = native.generate(**inputs, **engine._generate_kwargs(GenerationConfig(max_new_tokens=4)))
    assert answer == engine.answer(tok_decode(engine, direct[0, inputs["input_ids"].shape[1]:]))


def tok_decode(engine, ids) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_original_llava_next_checkpoint_reads_as_next(tmp_path):
    """The original llava-v1.6 layout: LlavaLlamaForCausalLM's config (model_type llava_llama with
    image_aspect_ratio anyres) and its keys (model.image_newline beside LLaVA's) load by path."""
    from safetensors.torch import save_file

    from vlmtrain.models.loading import model_config_from_checkpoint

    cfg, tok, model, native, original = native_and_original("llava_next_tiny", seed=4)
    fam = family_of(model)
    assert "model.image_newline" in original and "model.mm_projector.0.weight" in original
    assert fam.to_native(original, model.config.text_config).keys() == native.keys()
    text = model.config.text_config.to_dict()
    config = {**{k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                      "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps")},
              "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
              "image_aspect_ratio": "anyres", "image_grid_pinpoints": TINY_PINPOINTS,
              "mm_patch_merge_type": "spatial_unpad", "mm_vision_select_layer": -2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    fields = model_config_from_checkpoint(tmp_path)
    assert fields["family"] == {"_target_": "vlmtrain.models.llava.LlavaNextFamily",
                                "image_grid_pinpoints": TINY_PINPOINTS}
    assert fields["image_mode"] == "anyres"
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "model.safetensors"))
    cfg.model.path = str(tmp_path)
    loaded = build_model(cfg.model, tok, seed=9)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in native.items())


@pytest.mark.slow
def test_llava_next_tiny_trains_lora_and_mpo_on_anyres(tmp_path):
    """The InternVL path's other stages on the anyres path: LoRA on the LLM, then MPO on preference
    pairs (both answers of a pair read its image's tiles, encoded once, packed)."""
    from test_preference import write_pairs

    from vlmtrain.training.run import train

    common = ["model=llava_next_tiny", "data.num_workers=0", "stage.max_epochs=-1", "trainer.enable_progress_bar=false"]
    lora = train(compose_config(["stage=lora", "stage.max_steps=6", "optim.lr=1e-3", *common], run_dir=tmp_path / "lora"))
    losses = _losses(lora)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    pairs = ["data=single", f"data.path={write_pairs(tmp_path / 'p.jsonl', 6)}", "data.media_outside_root=true",
             "stage.global_batch_size=2", "data.micro_batch_size=2", "stage.max_steps=2", "data/collate=packed",
             "data.collate.max_tokens=4096"]
    mpo = train(compose_config(["stage=mpo", *pairs, *common], run_dir=tmp_path / "mpo"))
    rows = list(csv.DictReader(open(mpo / "metrics.csv")))
    assert len([r for r in rows if r.get("train/loss")]) == 2
    assert all(float(r["train/logps/chosen"]) < 0 for r in rows if r.get("train/logps/chosen"))
    summary = json.loads((mpo / "summary.json").read_text())
    assert summary["tiles"] > summary["samples"] and not summary["skipped"], summary

    # vlmtrain.pairs on the anyres model: answers generated from its images, then the reference pass
    from vlmtrain.cli import command

    made = command("pairs").run(compose_config(
        [f"ckpt={lora}", f"out={tmp_path / 'made'}", "pairs.limit=6", "pairs.samples=2", "pairs.max_new_tokens=3",
         "device=cpu"], config_name="pairs"))["datasets"]["shapes"]
    assert made["pairs"] == 6 and Path(made["reference"]).is_file(), made
    single = ["data=single", f"data.path={tmp_path / 'p.jsonl'}", "data.media_outside_root=true"]
    command("pairs").run(compose_config([f"ckpt={lora}", "pairs.mode=reference", "device=cpu", *single],
                                        config_name="pairs"))
    dpo = train(compose_config(["stage=dpo", "stage/reference=precomputed", *pairs, *common], run_dir=tmp_path / "dpo"))
    assert len([r for r in csv.DictReader(open(dpo / "metrics.csv")) if r.get("train/loss")]) == 2
