"""Every input format on small files the tests make: swift (grounding, inline images, placement),
InternVL jsonl + meta files, LLaVA json, the CogVLM-SFT folder, and format guessing."""

import json

import pytest
from PIL import Image

from conftest import compose_config
from vlmtrain.config import DataConfig, DatasetConfig
from vlmtrain.data.conversation import SampleError
from vlmtrain.data.formats import guess_format, swift
from vlmtrain.data.mixture import MixtureDataset, Skipped, dataset_configs
from vlmtrain.models.build import load_tokenizer
from vlmtrain.training.loss import IGNORE_INDEX

TPT = 4  # tokens per tile, small so samples stay short


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(compose_config(["data.datasets={}"]).model)


def image(path, size=(120, 80), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(l, ensure_ascii=False) + "\n" for l in lines))
    return path


def data_cfg(datasets, **kw):
    kw.setdefault("template", "internvl2_5")
    kw.setdefault("tile_size", 28)
    kw.setdefault("max_seq_len", 4096)
    return DataConfig(datasets=datasets, **kw)


def mixture(tok, datasets, **kw):
    return MixtureDataset(data_cfg(datasets, **kw), tok, TPT, seed=0)


def decoded(tok, ids):
    return tok.decode(ids.tolist() if hasattr(ids, "tolist") else ids)


def supervised(tok, s):
    return tok.decode([t for t in s.labels.tolist() if t != IGNORE_INDEX])


IMG = "<img>" + "<IMG_CONTEXT>" * TPT + "</img>"


# -- swift ------------------------------------------------------------------------------------------
def test_swift2_placeholders_history_system_and_text_only(tmp_path, tok):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"query": "<image>What is it?", "response": "red", "images": ["a.png"], "system": "Be brief."},
        # no placeholder: both images before the first query (ms-swift's _add_default_tags)
        {"query": "Compare.", "response": "same", "history": [["Hi", "Hello"]], "images": ["a.png", "b.png"]},
        {"query": "2+2?", "response": "4"},  # text only
        # ms-swift's inline form, when no images are listed
        {"query": "<img>a.png</img> and <img>b.png</img>?", "response": "two"},
        {"query": "<image> and <img>b.png</img>?", "response": "two", "images": ["a.png"]},  # both: rejected
    ])
    assert guess_format(path) == "swift"
    ds = mixture(tok, {"s": DatasetConfig(path=str(path), n_max=1, jpeg_augment=False)})
    s0, s1, s2, s3, s4 = (ds[(i, 0)] for i in range(5))
    text0 = decoded(tok, s0.input_ids)
    assert text0.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert f"<|im_start|>user\n{IMG}\nWhat is it?<|im_end|>" in text0  # swift: <img>...</img>\n
    assert supervised(tok, s0) == "red<|im_end|>"

    text1 = decoded(tok, s1.input_ids)
    assert f"<|im_start|>user\n{IMG}\n{IMG}\nHi<|im_end|>" in text1
    assert "<|im_start|>user\nCompare.<|im_end|>" in text1
    assert supervised(tok, s1) == "Hello<|im_end|>same<|im_end|>"
    assert s1.num_tiles == [1, 1]

    assert s2.pixel_values is None and s2.num_tiles == [] and supervised(tok, s2) == "4<|im_end|>"
    assert s3.num_tiles == [1, 1] and f"{IMG}\n and {IMG}\n?" in decoded(tok, s3.input_ids)
    assert isinstance(s4, Skipped) and s4.reason == "bad_media"


def test_swift_inline_image_order(tmp_path):
    conv = swift.to_conversation({"query": "<img>b.png</img> vs <img>a.png</img>", "response": "x"}, tmp_path)
    assert conv.images == [str(tmp_path / "b.png"), str(tmp_path / "a.png")]
    assert conv.turns[0][0] == "<image>\n vs <image>\n"


def test_swift4_messages_media_and_guessing(tmp_path, tok):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    import av  # noqa: F401  (videos below)
    from test_data_processing import make_video

    make_video(tmp_path / "v.mp4", num_frames=12)
    lines = [
        {"messages": [{"role": "system", "content": "You see."}, {"role": "user", "content": "What is it?"},
                      {"role": "assistant", "content": "red"}, {"role": "user", "content": "<image>And this?"},
                      {"role": "assistant", "content": "also red"}], "images": ["a.png", "b.png"]},
        {"messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "grey"}],
         "videos": ["v.mp4"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": "red"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": "Hi"}]},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    assert guess_format(path) == "swift"
    ds = mixture(tok, {"m": DatasetConfig(path=str(path), n_max=1, jpeg_augment=False)}, min_frames=3, max_frames=3)
    s0, s1, s2, s3, s4 = (ds[(i, 0)] for i in range(5))
    text0 = decoded(tok, s0.input_ids)
    # 2 images, 1 tag: the missing tag goes first, so the first image opens the first query
    assert text0.startswith("<|im_start|>system\nYou see.<|im_end|>\n")
    assert f"<|im_start|>user\n{IMG}\nWhat is it?<|im_end|>" in text0
    assert f"<|im_start|>user\n{IMG}\nAnd this?<|im_end|>" in text0
    assert supervised(tok, s0) == "red<|im_end|>also red<|im_end|>"
    frames = "".join(f"Frame-{k + 1}: {IMG}\n" for k in range(3))
    assert f"<|im_start|>user\n{frames}What happens?<|im_end|>" in decoded(tok, s1.input_ids)
    assert f"<|im_start|>user\n{IMG}\nColour?<|im_end|>" in decoded(tok, s2.input_ids)
    assert (s3.reason, s4.reason) == ("bad_message", "bad_message")


def test_swift4_grounding_boxes_by_ms_swift_4s_rule(tmp_path):
    """Numbers by ms-swift 4's normalize_bbox: int(round(x / width * 1000)), Python's rounding."""
    image(tmp_path / "a.png", size=(240, 120))
    image(tmp_path / "b.png", size=(2000, 1000))
    line = {"messages": [
        {"role": "user", "content": "<image><image>Find <ref-object> and <ref-object>."},
        {"role": "assistant", "content": "<bbox> and <bbox>, and <bbox>"}],
        "images": ["a.png", "b.png"],
        "objects": {"ref": ["a cat", "a dog"], "bbox": [[23.4, 33.3, 148.2, 60], [3, 0.5, 1, 999.5], [70.2, 0, 240, 119.9]],
                    "image_id": [0, 1]}}
    conv = swift.to_conversation(line, tmp_path)
    assert conv.turns[0][0] == "<image>\n<image>\nFind <ref>a cat</ref> and <ref>a dog</ref>."
    # 23.4 / 240 * 1000 = 97.4999.. -> 97 (x * 1000 / w would give 98); 33.3 / 120 -> 277.5.. -> 277
    # image 1 (2000 x 1000): x1 3 > x2 1 swapped; 1 / 2000 * 1000 = 0.5 -> 0 and 1.5 -> 2 (half to even)
    # the third box has no image_id: image 0
    assert conv.turns[0][1] == ("<box>[[97, 277, 617, 500]]</box> and <box>[[0, 0, 2, 1000]]</box>, and "
                                "<box>[[293, 0, 1000, 999]]</box>")
    norm = {**line, "objects": {"ref": ["a cat", "a dog"], "bbox": [[0.0005, 0.0015, 0.1234, 0.25], [0, 0, 1, 1],
                                                                     [0.5, 0.5, 0.5, 0.5]], "bbox_type": "norm1"}}
    assert swift.to_conversation(norm, tmp_path).turns[0][1] == (
        "<box>[[0, 2, 123, 250]]</box> and <box>[[0, 0, 1000, 1000]]</box>, and <box>[[500, 500, 500, 500]]</box>")
    point = {"messages": [{"role": "user", "content": "<image>Click Chrome"}, {"role": "assistant", "content": "<bbox>"}],
             "images": ["b.png"], "objects": {"ref": [], "bbox": [[615, 226]]}}
    assert swift.to_conversation(point, tmp_path).turns[0][1] == "<box>[[308, 226]]</box>"


@pytest.mark.parametrize("bbox_type,expected", [(None, 50), ("", 50), ("real", 50), ("norm1", 10000),
                                                ("norm_1", 10000), ("norm1000", 10), ("norm_1000", 10)])
def test_swift_bbox_type_spellings(bbox_type, expected):
    if expected > 1000:
        with pytest.raises(SampleError):
            swift.box_thousandths([10, 10, 10, 10], bbox_type, (200, 200))
    else:
        assert swift.box_thousandths([10, 10, 10, 10], bbox_type, (200, 200)) == [expected] * 4
    with pytest.raises(SampleError, match="bbox_type must be one of"):
        swift.box_thousandths([1, 1, 1, 1], "pixels", (200, 200))


def test_swift2_grounding_boxes(tmp_path):
    image(tmp_path / "a.png", size=(200, 100))
    objects = [
        {"caption": "red car", "bbox": [20, 10, 100, 50], "bbox_type": "real", "image": 0},
        {"caption": "tree", "bbox": [100, 200, 300, 400], "bbox_type": "norm_1000", "image": 0},
        {"caption": "sky", "bbox": [0.0, 0.0, 0.5, 0.25], "bbox_type": "norm_1", "image": 0},
    ]
    line = {"query": "<image>Find <ref-object>, <ref-object> and <ref-object>.",
            "response": "<bbox> <bbox> <bbox>", "images": ["a.png"], "objects": json.dumps(objects)}
    conv = swift.to_conversation(line, tmp_path)
    assert conv.turns[0][0] == "<image>\nFind <ref>red car</ref>, <ref>tree</ref> and <ref>sky</ref>."
    assert conv.turns[0][1] == (
        "<box>[[100, 100, 500, 500]]</box> <box>[[100, 200, 300, 400]]</box> <box>[[0, 0, 500, 250]]</box>"
    )


@pytest.mark.parametrize("bbox,bbox_type", [([20, 10, 250, 50], "real"), ([0, 0, 1200, 10], "norm_1000"),
                                           ([0.5, 0.2, 1.1, 0.3], "norm_1"), ([1, 2, 3], "real")])
def test_swift_bad_box_is_an_error_for_that_line(tmp_path, tok, bbox, bbox_type):
    image(tmp_path / "a.png", size=(200, 100))
    objs = [{"caption": "c", "bbox": bbox, "bbox_type": bbox_type, "image": 0}]
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"query": "<image><ref-object>", "response": "<bbox>", "images": ["a.png"], "objects": json.dumps(objs)},
        {"query": "ok?", "response": "yes"},
    ])
    ds = mixture(tok, {"g": DatasetConfig(path=str(path))})
    bad = ds[(0, 0)]
    assert isinstance(bad, Skipped) and bad.reason == "bad_bbox" and bad.where == f"{path}:1"
    assert not isinstance(ds[(1, 0)], Skipped)


def test_swift_placeholder_count_mismatch_rejected(tmp_path):
    image(tmp_path / "a.png")
    with pytest.raises(SampleError) as e:
        swift.to_conversation({"query": "<image><image>?", "response": "x", "images": ["a.png"]}, tmp_path)
    assert e.value.reason == "placeholder_mismatch"


# -- InternVL meta file -----------------------------------------------------------------------------
def test_meta_file_maps_onto_dataset_configs(tmp_path, tok):
    for i in range(4):
        image(tmp_path / "coco" / f"{i}.png", size=(300, 100))
    lines = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": f"a{i}"}]} for i in range(4)]
    write_jsonl(tmp_path / "coco.jsonl", lines)
    write_jsonl(tmp_path / "text.jsonl", [{"conversations": [{"from": "human", "value": f"q{i}"},
                                                             {"from": "gpt", "value": f"a{i}"}]} for i in range(10)])
    meta = {
        "coco": {"root": "coco/", "annotation": "coco.jsonl", "data_augment": False, "repeat_time": 2.5,
                 "max_dynamic_patch": 3, "length": 4},
        "text": {"root": "", "annotation": "text.jsonl", "data_augment": True, "repeat_time": 0.3,
                 "max_dynamic_patch": 12, "length": 10},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert guess_format(tmp_path / "meta.json") == "meta"

    cfgs = dataset_configs({"mix": DatasetConfig(path=str(tmp_path / "meta.json"))})
    assert list(cfgs) == ["mix/coco", "mix/text"]
    coco, text = cfgs["mix/coco"], cfgs["mix/text"]
    assert (coco.n_max, coco.repeat, coco.jpeg_augment) == (3, 2.5, False)
    assert (text.n_max, text.repeat, text.jpeg_augment) == (12, 0.3, True)

    # through the Hydra config, as a user would: data=single data.path=meta.json
    cfg = compose_config(["data=single", f"data.path={tmp_path / 'meta.json'}"])
    ds = MixtureDataset(cfg.data, tok, TPT, seed=0)
    assert [len(s.indices) for s in ds.sources] == [10, 3]  # 4 * 2.5, round(10 * 0.3)
    s = ds[(0, 0)]
    assert s.dataset == "single/coco"
    assert s.num_tiles == [4]  # 3:1 image, n_max 3 -> 3x1 grid + thumbnail


def test_meta_length_is_checked_against_the_annotation(tmp_path, caplog):
    write_jsonl(tmp_path / "t.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                          {"from": "gpt", "value": "a"}]}] * 3)
    for length, stale in ((3, False), (5, True)):
        (tmp_path / "meta.json").write_text(json.dumps({"t": {"annotation": "t.jsonl", "length": length}}))
        caplog.clear()
        with caplog.at_level("WARNING", logger="vlmtrain.data.meta"):
            dataset_configs({"m": DatasetConfig(path=str(tmp_path / "meta.json"))})
        assert ("'length' is 5 but" in caplog.text and "has 3 lines" in caplog.text) == stale
    (tmp_path / "meta.json").write_text(json.dumps({"t": {"annotation": "t.jsonl", "length": "many"}}))
    with pytest.raises(ValueError, match="entry 't': 'length' must be a non-negative integer"):
        dataset_configs({"m": DatasetConfig(path=str(tmp_path / "meta.json"))})


# -- LLaVA json and CogVLM folder -------------------------------------------------------------------
def test_llava_json(tmp_path, tok):
    image(tmp_path / "img" / "x.jpg")
    items = [{"id": "1", "image": "img/x.jpg", "conversations": [
        {"from": "human", "value": "What colour?\n<image>"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(items))
    assert guess_format(tmp_path / "llava.json") == "llava"
    ds = mixture(tok, {"l": DatasetConfig(path=str(tmp_path / "llava.json"), n_max=1)})
    s = ds[(0, 0)]
    assert f"What colour?\n{IMG}" in decoded(tok, s.input_ids)
    assert supervised(tok, s) == "Red.<|im_end|>Yes.<|im_end|>"


def test_cogvlm_folder(tmp_path, tok):
    root = tmp_path / "cog"
    image(root / "images" / "000.jpg")
    image(root / "images" / "001.jpg")
    (root / "labels").mkdir()
    (root / "labels" / "000.json").write_text(json.dumps({"captions": [{"role": "caption", "content": "A red box."}]}))
    (root / "labels" / "001.json").write_text(json.dumps({"conversations": [
        {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}]}))
    (root / "labels" / "002.json").write_text(json.dumps({"captions": [{"role": "caption", "content": "x"}]}))
    assert guess_format(root) == "cogvlm"
    ds = mixture(tok, {"c": DatasetConfig(path=str(root), n_max=1)})
    s0, s1, s2 = ds[(0, 0)], ds[(1, 0)], ds[(2, 0)]
    assert f"{IMG}\nDescribe this image in detail." in decoded(tok, s0.input_ids)
    assert supervised(tok, s0) == "A red box.<|im_end|>"
    assert supervised(tok, s1) == "Red.<|im_end|>"
    assert isinstance(s2, Skipped) and s2.reason == "missing_media"


def test_unknown_format_and_unguessable_path(tmp_path, tok):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot guess the format"):
        mixture(tok, {"x": DatasetConfig(path=str(tmp_path / "x.txt"))})
    with pytest.raises(ValueError, match="unknown data format 'nope'"):
        mixture(tok, {"x": DatasetConfig(path=str(tmp_path / "x.txt"), format="nope")})


def test_cogvlm_release_label_folders(tmp_path, tok):
    """The released archive's subsets hold labels_en/ and labels_zh/ (the card draws labels/)."""
    from vlmtrain.errors import UserError

    root = tmp_path / "llava_instruction_single_conversation_formate"
    image(root / "images" / "00000001.jpg")
    for lang, answer in (("en", "Red."), ("zh", "红色。")):
        (root / f"labels_{lang}").mkdir(parents=True)
        (root / f"labels_{lang}" / "00000001.json").write_text(json.dumps({"conversations": [
            {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": answer}]}, ensure_ascii=False))
    assert guess_format(root) == "cogvlm"
    with pytest.raises(UserError, match="labels_en/ and labels_zh/"):
        mixture(tok, {"c": DatasetConfig(path=str(root), n_max=1)})
    for lang, answer in (("en", "Red."), ("zh", "红色。")):
        folder = root / f"labels_{lang}"
        assert guess_format(folder) == "cogvlm"
        s = mixture(tok, {"c": DatasetConfig(path=str(folder), n_max=1)})[(0, 0)]
        assert supervised(tok, s) == f"{answer}<|im_end|>"
    # one language only: the subset folder is enough
    import shutil

    shutil.rmtree(root / "labels_zh")
    s = mixture(tok, {"c": DatasetConfig(path=str(root), n_max=1)})[(0, 0)]
    assert supervised(tok, s) == "Red.<|im_end|>"
