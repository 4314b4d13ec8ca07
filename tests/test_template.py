"""The internvl2_5 template renders exactly, and only answers + <|im_end|> carry loss."""

import json

import torch

from conftest import compose_config
from vlmtrain.data.conversation import Conversation
from vlmtrain.data.encode import ConversationEncoder
from vlmtrain.data.mixture import MixtureDataset
from vlmtrain.data.templates import INTERNVL_SYSTEM, get_template
from vlmtrain.models.build import load_tokenizer
from vlmtrain.training.loss import IGNORE_INDEX


def _tok():
    return load_tokenizer(compose_config(["data.datasets={}"]).model)


def test_internvl2_5_rendering_and_labels():
    tok = _tok()
    enc = ConversationEncoder(tok, tokens_per_tile=4, max_seq_len=10_000)
    conv = Conversation(turns=[("<image>\nWhat colour?", "red"), ("And shape?", "circle")], images=["x.png"])
    ids, labels = enc.encode(conv, get_template("internvl2_5"), num_tiles=[2], system=None)
    text = tok.decode(ids)
    image = "<img>" + "<IMG_CONTEXT>" * 8 + "</img>"
    assert text == (
        f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{image}\nWhat colour?<|im_end|>\n<|im_start|>assistant\n"
        "red<|im_end|>\n"
        "<|im_start|>user\nAnd shape?<|im_end|>\n<|im_start|>assistant\n"
        "circle<|im_end|>\n"
    )
    supervised = tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX])
    assert supervised == "red<|im_end|>circle<|im_end|>"
    # the loss never covers image tokens, the system prompt or the trailing newline
    assert (labels[ids == tok.convert_tokens_to_ids("<IMG_CONTEXT>")] == IGNORE_INDEX).all()
    assert labels[-1] == IGNORE_INDEX and tok.decode(ids[-1:]) == "\n"


def test_demo_sample_through_the_mixture():
    cfg = compose_config([])
    tok = _tok()
    ds = MixtureDataset(cfg.data, tok, tokens_per_tile=64, seed=0)
    path = cfg.data.datasets.shapes.path
    lines = [json.loads(l) for l in open(path)]
    i = next(k for k, l in enumerate(lines) if isinstance(l.get("image"), str))
    s = ds[(i, 0)]
    n_ctx = int((s.input_ids == tok.convert_tokens_to_ids("<IMG_CONTEXT>")).sum())
    assert n_ctx == 64 * sum(s.num_tiles) and s.pixel_values.shape[0] == sum(s.num_tiles)
    assert s.pixel_values.shape[1:] == (3, 224, 224)
    answers = [m["value"] for m in lines[i]["conversations"] if m["from"] == "gpt"]
    sup = tok.decode([t for t in s.labels.tolist() if t != IGNORE_INDEX])
    assert sup == "".join(a + "<|im_end|>" for a in answers)
    assert s.num_supervised == int((s.labels != IGNORE_INDEX).sum())


def test_jpeg_augmentation_is_reproducible_and_epoch_dependent():
    cfg = compose_config([])
    tok = _tok()
    ds = MixtureDataset(cfg.data, tok, tokens_per_tile=64, seed=0)
    lines = [json.loads(l) for l in open(cfg.data.datasets.shapes.path)]
    i = next(k for k, l in enumerate(lines) if isinstance(l.get("image"), str))
    a, b, c = ds[(i, 0)], ds[(i, 0)], ds[(i, 1)]
    assert torch.equal(a.pixel_values, b.pixel_values)
    assert not torch.equal(a.pixel_values, c.pixel_values)
