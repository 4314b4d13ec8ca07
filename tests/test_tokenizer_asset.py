"""Tests for the shipped tokenizer (vlmtrain.assets) and its build script."""

import json

import pytest

from vlmtrain.assets import TOKENIZER_DIR, load_tokenizer
from vlmtrain.assets.build_tokenizer import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, VOCAB_SIZE, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_size_and_roles(tok):
    assert len(tok) == VOCAB_SIZE == 2048
    assert tok.eos_token == EOS_TOKEN == "<|im_end|>"
    assert tok.pad_token == PAD_TOKEN == "<|pad|>"
    assert tok.bos_token is None
    assert tok.pad_token_id not in (tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>"))
    assert tok.chat_template is None  # templates live in code


def test_special_tokens_are_single_ids_in_order(tok):
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [expected_id], token
    assert SPECIAL_TOKENS[:4] == ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
    internvl = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
    assert SPECIAL_TOKENS[4:13] == internvl
    assert "<image>" not in tok.get_vocab() and "<video>" not in tok.get_vocab()


def test_no_bos_added(tok):
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)


def test_image_context_run(tok):
    ids = tok.encode("<img>" + "<IMG_CONTEXT>" * 256 + "</img>", add_special_tokens=False)
    assert ids == [4] + [6] * 256 + [5]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How many shapes are there? 3",
        "你是书生·万象，英文名是InternVL。",
        "emoji 🎉🚀👍🏽 and accents: café naïve Ærø",
        "<|im_start|>user\n<image>\nWhat colour is the leftmost shape?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n",
        "  spaces\t\ttabs\r\nwindows\n\n\nnewlines 12345.678",
    ],
)
def test_lossless_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize(
    "pieces",
    [
        ["<|im_start|>user\n<image>\nHow many?<|im_end|>\n<|im_start|>assistant\n", "3", "<|im_end|>", "\n"],
        [
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "Hello there.",
            "<|eot_id|>",
        ],
        ["<s><|user|>\nWhat is 12 plus 30?<|end|>\n<|assistant|>\n", " 42", "<|end|>", "\n"],
    ],
)
def test_piecewise_encoding_equals_whole(tok, pieces):
    """The data encoder tokenizes template blocks and answers separately; no token may span them."""
    piecewise = [i for p in pieces for i in tok.encode(p, add_special_tokens=False)]
    assert piecewise == tok.encode("".join(pieces), add_special_tokens=False)


def test_demo_words_are_cheap(tok):
    # answers and role names start a line; question words follow a space
    words = ["circle", "square", "triangle", "red", "yellow", "yes", "second", "user", "assistant"]
    for word in words + [" leftmost", " shapes"]:
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word


def test_build_is_deterministic_and_matches_shipped(tmp_path):
    a = build_tokenizer(tmp_path / "a")
    b = build_tokenizer(tmp_path / "b")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # the committed asset is exactly what the script builds: rerun it after changing the corpus
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((a / name).read_text()) == json.loads((TOKENIZER_DIR / name).read_text()), name
    text = "<IMG_CONTEXT> red circle"
    assert load_tokenizer(a).encode(text) == load_tokenizer().encode(text)
