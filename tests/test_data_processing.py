"""Processing to the InternVL 2.5 spec: multi-image budgets, video frames, JPEG augmentation,
repeat factors, templates, too-long samples and bad input."""

import json
import random

import av
import numpy as np
import pytest
import torch
from PIL import Image
from test_data_formats import IMG, TPT, data_cfg, decoded, image, mixture, supervised, write_jsonl

from conftest import compose_config
from vlmtrain.config import DatasetConfig
from vlmtrain.data.conversation import Conversation
from vlmtrain.data.encode import ConversationEncoder
from vlmtrain.data.mixture import MixtureDataset, Skipped, repeat_indices
from vlmtrain.data.templates import INTERNVL2_SYSTEM, get_template
from vlmtrain.data.video import inference_frame_indices, training_frame_indices
from vlmtrain.models.build import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(compose_config(["data.datasets={}"]).model)


def make_video(path, num_frames=40, size=(32, 24)):
    """Frame i is a flat grey of level 20 + 5 i, so a decoded frame tells its index."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(num_frames):
            arr = np.full((size[1], size[0], 3), 20 + 5 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.name


def frame_index(tile: torch.Tensor) -> int:
    """The frame a uint8 tile shows: frame i is drawn flat grey 20 + 5 i."""
    return round((float(tile[0].float().mean()) - 20) / 5)


# -- multi-image --------------------------------------------------------------------------------------
def test_multi_image_tile_budget_and_mismatch(tmp_path, tok):
    for n in "abc":
        image(tmp_path / f"{n}.png", size=(400, 100))  # 4:1, wants a 4x1 grid
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"image": ["a.png", "b.png", "c.png"], "conversations": [
            {"from": "human", "value": "<image><image><image>Same?"}, {"from": "gpt", "value": "yes"}]},
        {"image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>One placeholder, two images"}, {"from": "gpt", "value": "no"}]},
    ])
    ds = mixture(tok, {"m": DatasetConfig(path=str(path), n_max=12, jpeg_augment=False)})
    s = ds[(0, 0)]
    # n_max 12 over 3 images: 4 tiles each -> 4x1 grid + thumbnail
    assert s.num_tiles == [5, 5, 5] and s.pixel_values.shape[0] == 15
    n_ctx = int((s.input_ids == tok.convert_tokens_to_ids("<IMG_CONTEXT>")).sum())
    assert n_ctx == TPT * 15
    bad = ds[(1, 0)]
    assert isinstance(bad, Skipped) and bad.reason == "placeholder_mismatch"


# -- video ----------------------------------------------------------------------------------------------
def test_video_training_draws_random_frame_per_segment(tmp_path, tok):
    make_video(tmp_path / "v.mp4")
    path = write_jsonl(tmp_path / "v.jsonl", [{"video": "v.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "It brightens."}]}])
    ds = mixture(tok, {"v": DatasetConfig(path=str(path))}, min_frames=8, max_frames=8)
    seen = set()
    for epoch in range(6):
        s = ds[(0, epoch)]
        assert s.num_tiles == [1] * 8 and s.pixel_values.shape[0] == 8
        idx = [frame_index(t) for t in s.pixel_values]
        # one frame in each 5-frame segment, never its last frame (the reference's draw)
        assert all(5 * k <= i <= 5 * k + 3 for k, i in enumerate(idx)), idx
        seen.add(tuple(idx))
    assert len(seen) > 1  # random inside the segment, differently per epoch
    text = decoded(tok, ds[(0, 0)].input_ids)
    frames = "".join(f"Frame-{k + 1}: {IMG}\n" for k in range(8))
    assert f"<|im_start|>user\n{frames}What happens?<|im_end|>" in text  # one newline, as the reference


def test_short_video_is_padded_with_its_last_frame(tmp_path, tok):
    make_video(tmp_path / "v.mp4", num_frames=5)
    path = write_jsonl(tmp_path / "v.jsonl", [{"video": "v.mp4", "conversations": [
        {"from": "human", "value": "What happens?"}, {"from": "gpt", "value": "Little."}]}])
    for training in (True, False):
        ds = MixtureDataset(data_cfg({"v": DatasetConfig(path=str(path))}, min_frames=8, max_frames=8),
                            tok, TPT, seed=0, training=training)
        s = ds[(0, 0)]
        idx = [frame_index(t) for t in s.pixel_values]
        assert s.num_tiles == [1] * 8
        assert idx[:5] == [0, 1, 2, 3, 4] if training else idx == inference_frame_indices(5, 8)
        assert idx[4:] == [4] * 4 if training else True
        assert decoded(tok, s.input_ids).count("Frame-") == 8


def test_video_frame_count_range_eval_rule_and_no_jpeg(tmp_path, tok, monkeypatch):
    make_video(tmp_path / "v.mp4")
    path = write_jsonl(tmp_path / "v.jsonl", [{"video": "v.mp4", "conversations": [
        {"from": "human", "value": "<video>Describe."}, {"from": "gpt", "value": "Grey."}]}])
    cfg = data_cfg({"v": DatasetConfig(path=str(path))}, min_frames=3, max_frames=6)
    train = MixtureDataset(cfg, tok, TPT, seed=0)
    counts = {len(train[(0, e)].num_tiles) for e in range(16)}
    assert counts == set(range(3, 7))  # min and max both drawn
    ev = MixtureDataset(cfg, tok, TPT, seed=0, training=False)
    a, b = ev[(0, 0)], ev[(0, 5)]
    # the model card's get_index: seg = 39 / 6, int(seg / 2 + round(seg * i)), banker's rounding
    assert [frame_index(t) for t in a.pixel_values] == inference_frame_indices(40, 6) == [3, 9, 16, 23, 29, 35]
    assert torch.equal(a.pixel_values, b.pixel_values)
    # JPEG augmentation: off for video by default, never outside training
    assert a.pixel_values.dtype == torch.uint8 and float(a.pixel_values[0, 0].float().std()) == 0
    import vlmtrain.data.mixture as mixture_module

    calls = []
    real = mixture_module.jpeg_reencode
    monkeypatch.setattr(mixture_module, "jpeg_reencode", lambda t, rng: calls.append(1) or real(t, rng))
    train[(0, 0)]
    assert calls == []
    on = data_cfg({"v": DatasetConfig(path=str(path), jpeg_augment=True)}, min_frames=3, max_frames=6)
    MixtureDataset(on, tok, TPT, seed=0, training=False)[(0, 0)]
    assert calls == []
    s = MixtureDataset(on, tok, TPT, seed=0)[(0, 0)]
    assert len(calls) == len(s.num_tiles)  # turned on for this dataset: every frame, in training


def test_frame_indices():
    assert inference_frame_indices(10, 4) == [1, 3, 5, 8]  # seg 2.25: int(1.125 + round(2.25 i)), round(4.5) == 4
    assert inference_frame_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]  # short: frames repeat
    assert inference_frame_indices(41, 4) == [5, 15, 25, 35]  # round(10 * i) exact
    assert inference_frame_indices(6, 2) == [1, 3]  # seg 2.5: round(2.5) == 2 (half to even; half up: 4)
    rng = random.Random(0)
    for _ in range(50):
        idx = training_frame_indices(100, 7, rng)
        bounds = np.linspace(0, 100, 8).astype(int)
        assert all(bounds[k] <= i <= bounds[k + 1] - 2 for k, i in enumerate(idx))
    assert training_frame_indices(3, 5, rng) == [0, 1, 2, 2, 2]


# -- JPEG augmentation ------------------------------------------------------------------------------------
def test_jpeg_quality_range_seeded_and_per_tile(tmp_path, tok, monkeypatch):
    rgb = np.random.default_rng(0).integers(0, 255, (90, 300, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "n.png")
    path = write_jsonl(tmp_path / "j.jsonl", [{"image": "n.png", "conversations": [
        {"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "noise"}]}])
    qualities = []
    orig = Image.Image.save

    def spy(self, fp, format=None, **kw):
        if format == "JPEG":
            qualities.append(kw["quality"])
        return orig(self, fp, format, **kw)

    monkeypatch.setattr(Image.Image, "save", spy)
    ds = mixture(tok, {"j": DatasetConfig(path=str(path), n_max=6)})
    s = ds[(0, 0)]
    assert len(qualities) == sum(s.num_tiles) == 4  # 3x1 grid + thumbnail: one quality per tile
    for e in range(1, 30):
        ds[(0, e)]
    assert set(qualities) <= set(range(75, 101)) and len(set(qualities)) > 10
    qualities.clear()
    ds[(0, 3)]
    first = list(qualities)
    qualities.clear()
    ds[(0, 3)]
    assert qualities == first  # reproducible from (seed, epoch, index)
    off = mixture(tok, {"j": DatasetConfig(path=str(path), n_max=6, jpeg_augment=False)})
    qualities.clear()
    off[(0, 0)]
    assert qualities == []


# -- repeat factors -----------------------------------------------------------------------------------------
def test_repeat_indices():
    sub = repeat_indices(100, 0.25, 1)
    assert len(sub) == 25 and len(set(sub.tolist())) == 25
    assert not np.array_equal(sub, np.arange(25))  # a random subset, not the first lines
    assert np.array_equal(sub, repeat_indices(100, 0.25, 1)) and not np.array_equal(sub, repeat_indices(100, 0.25, 2))
    rep = repeat_indices(10, 2.3, 0)
    counts = np.bincount(rep, minlength=10)
    assert len(rep) == 23 and counts.min() == 2 and (counts == 3).sum() == 3
    with pytest.raises(ValueError):
        repeat_indices(10, 0, 0)


# -- templates ------------------------------------------------------------------------------------------------
LAYOUTS = {
    "internlm2-chat":
        f"<|im_start|>system\n{INTERNVL2_SYSTEM}<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
        "A<|im_end|><|im_start|>user\nMore<|im_end|><|im_start|>assistant\nB<|im_end|>",
    "hermes2":
        f"<|im_start|>system\n{INTERNVL2_SYSTEM}<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
        "A<|im_end|><|im_start|>user\nMore<|im_end|><|im_start|>assistant\nB<|im_end|>",
    "phi3-chat":
        f"<|system|>\n{INTERNVL2_SYSTEM}<|end|><|user|>\nHi<|end|><|assistant|>\nA<|end|>"
        "<|user|>\nMore<|end|><|assistant|>\nB<|end|>",
    "llama3-chat":
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "More<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nB<|eot_id|>",
}


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_template_layouts_and_bos_by_tokenizer(tok, name, bos):
    """No template writes a BOS itself: it is the tokenizer's, when the tokenizer adds one."""
    from test_reference_goldens import GOLDENS
    from transformers import AutoTokenizer

    if bos:
        tok = AutoTokenizer.from_pretrained(str(GOLDENS / "tokenizers" / "bos"), local_files_only=True)
        tok.add_bos_token = True
    enc = ConversationEncoder(tok, TPT, 10_000)
    t = get_template(name)
    ids, labels = enc.encode(Conversation(turns=[("Hi", "A"), (" More ", "B")] if t.strip else
                                          [("Hi", "A"), ("More", "B")]), t, [], None)
    assert tok.decode(ids) == ("<s>" if bos else "") + LAYOUTS[name]
    assert (ids[0] == tok.bos_token_id) == bos and ids.tolist().count(tok.bos_token_id or -1) == int(bos)
    assert tok.decode([x for x in labels.tolist() if x >= 0]) == f"A{t.answer_end}B{t.answer_end}"


def test_system_prompt_per_dataset_and_template_override(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}])
    ds = mixture(tok, {"a": DatasetConfig(path=str(path), system="Sys A."),
                       "b": DatasetConfig(path=str(path), template="llama3-chat")}, system="Global.")
    assert decoded(tok, ds[(0, 0)].input_ids).startswith("<|im_start|>system\nSys A.<|im_end|>")
    assert decoded(tok, ds[(1, 0)].input_ids).startswith(  # the shipped tokenizer adds no BOS
        "<|start_header_id|>system<|end_header_id|>\n\nGlobal.<|eot_id|>")


# -- too long ---------------------------------------------------------------------------------------------------
def test_too_long_skip_or_truncate_text_never_cuts_images(tmp_path, tok):
    image(tmp_path / "a.png", size=(28, 28))
    long_answer = "word " * 200
    path = write_jsonl(tmp_path / "l.jsonl", [
        {"image": "a.png", "conversations": [
            {"from": "human", "value": "<image>Short?"}, {"from": "gpt", "value": "yes"},
            {"from": "human", "value": "Long?"}, {"from": "gpt", "value": long_answer}]},
        {"image": "a.png", "conversations": [
            {"from": "human", "value": "Long first?"}, {"from": "gpt", "value": long_answer},
            {"from": "human", "value": "<image>late image"}, {"from": "gpt", "value": "ok"}]},
    ])
    d = {"l": DatasetConfig(path=str(path), n_max=1)}
    skip = mixture(tok, d, max_seq_len=150, system="")
    assert all(isinstance(skip[(i, 0)], Skipped) and skip[(i, 0)].reason == "too_long" for i in range(2))
    trunc = mixture(tok, d, max_seq_len=150, system="", too_long="truncate_text")
    s = trunc[(0, 0)]
    assert s.truncated and len(s) <= 150 and supervised(tok, s) == "yes<|im_end|>"
    assert int((s.input_ids == tok.convert_tokens_to_ids("<IMG_CONTEXT>")).sum()) == TPT
    # the text to drop comes before the image: dropping it would cut the sample's image, so skip
    assert isinstance(trunc[(1, 0)], Skipped) and trunc[(1, 0)].reason == "too_long"


# -- bad input ----------------------------------------------------------------------------------------------------
def test_bad_input_is_counted_per_reason_or_raises_naming_file_and_line(tmp_path, tok):
    image(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    path = tmp_path / "bad.jsonl"
    good = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}]}
    lines = [
        json.dumps(good),
        '{"conversations": [broken',
        json.dumps({**good, "image": "missing.png"}),
        json.dumps({**good, "image": "corrupt.png"}),
        json.dumps({"image": ["ok.png", "ok.png"], "conversations": good["conversations"]}),
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    ds = mixture(tok, {"bad": DatasetConfig(path=str(path), n_max=1)})
    got = [ds[(i, 0)] for i in range(len(lines))]
    assert not isinstance(got[0], Skipped)
    assert [g.reason for g in got[1:]] == ["malformed_json", "missing_media", "corrupt_media",
                                          "placeholder_mismatch", "empty_answer"]
    assert [g.where for g in got[1:]] == [f"{path}:{i}" for i in range(2, 7)]
    strict = mixture(tok, {"bad": DatasetConfig(path=str(path), n_max=1)}, on_error="raise")
    with pytest.raises(ValueError, match=rf"{path}:3: image not found"):
        strict[(2, 0)]


# -- fast resize ----------------------------------------------------------------------------------------------------
def test_fast_resize_matches_pil_tiles(tmp_path, tok):
    from vlmtrain.data.images import normalize_pixels, to_pixel_bytes, to_pixel_values
    from vlmtrain.data.tiling import choose_grid, tile_image, tile_image_fast

    rgb = np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    img = Image.fromarray(rgb).resize((700, 300), Image.Resampling.BICUBIC)  # smooth, like a photo
    img.save(tmp_path / "p.jpg", quality=95)
    slow = tile_image(img, 1, 6, 56, exact=True)
    fast = tile_image_fast(img, choose_grid(700, 300, 1, 6, 56), 56)
    assert len(fast) == len(slow) == 3  # 2x1 + thumbnail
    diff = (to_pixel_values(fast) - to_pixel_values(slow)).abs() * 255 * 0.229
    assert float(diff.max()) <= 3 and float(diff.mean()) < 0.1

    path = write_jsonl(tmp_path / "p.jsonl", [{"image": "p.jpg", "conversations": [
        {"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}]}])
    d = {"p": DatasetConfig(path=str(path), n_max=6, jpeg_augment=False)}
    exact = mixture(tok, d, tile_size=56, fast_resize=False)[(0, 0)]
    reference = to_pixel_bytes(tile_image(Image.open(tmp_path / "p.jpg"), 1, 6, 56, exact=True))
    assert int((exact.pixel_values.int() - reference.int()).abs().max()) <= 2  # the default: within 2 levels
    quick = mixture(tok, d, tile_size=56)[(0, 0)]
    assert quick.num_tiles == exact.num_tiles
    assert float((normalize_pixels(quick.pixel_values) - normalize_pixels(exact.pixel_values)).abs().mean()) < 0.02


def test_data_level_jpeg_default_and_the_family_stages_turn_it_off(monkeypatch):
    """``data.jpeg_augment`` is the default of datasets that set none: InternVL 2.5's stages leave
    it None (images re-encoded), the other families' stage files set it false (their recipes do
    not re-encode); a dataset's own setting still wins."""
    import vlmtrain.data.mixture as mixture_module
    from conftest import compose_config
    from vlmtrain.data.mixture import build_mixture

    for stage in ("mlp_warmup", "instruction_tuning"):
        assert compose_config([f"stage={stage}"]).data.jpeg_augment is None
    family_stages = {"llava_tiny": ["llava_pretrain", "llava_finetune"], "llava_next_tiny": ["llava_next_finetune"],
                     "minigpt4_tiny": ["minigpt4_stage1", "minigpt4_stage2"],
                     "cogvlm_tiny": ["cogvlm_pretrain", "cogvlm_sft"]}
    for model, stages in family_stages.items():
        for stage in stages:
            assert compose_config([f"model={model}", f"stage={stage}"]).data.jpeg_augment is False, stage
    calls = []
    real = mixture_module.jpeg_reencode
    monkeypatch.setattr(mixture_module, "jpeg_reencode", lambda t, rng: calls.append(1) or real(t, rng))
    for overrides, expect in ((["stage=llava_finetune"], False),
                              (["stage=llava_finetune", "++data.datasets.shapes.jpeg_augment=true"], True),
                              (["stage=instruction_tuning"], True)):
        calls.clear()
        ds, _ = build_mixture(compose_config(["model=llava_tiny", *overrides]), training=True)
        next(ds[i] for i in range(len(ds)) if ds[i].pixel_values is not None)
        assert bool(calls) is expect, overrides
