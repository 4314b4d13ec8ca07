"""The one renderer: the exported Jinja chat template renders what it renders, for every template,
with and without a BOS-adding tokenizer, on text, images, video, multi-turn and system cases; and
vlmtrain's own rules where it extends the reference (README "What a released checkpoint sees")."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_reference_goldens import tokenizer
from vlmtrain.data.chat_template import chat_template_jinja
from vlmtrain.data.conversation import Conversation, SampleError
from vlmtrain.data.formats import internvl
from vlmtrain.data.render import IMG_CONTEXT, Renderer, tokenizer_adds_bos
from vlmtrain.data.templates import TEMPLATES, get_template

TPT = 4

CASES = {
    "text": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"},
             {"role": "user", "content": "More?"}, {"role": "assistant", "content": "B"}],
    "one_image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": "A cat."}],
    "several_images": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                    {"type": "text", "text": "Same?"}]},
                       {"role": "assistant", "content": "No."}],
    "video": [{"role": "user", "content": [{"type": "video", "num_frames": 3}, {"type": "text", "text": "What happens?"}]},
              {"role": "assistant", "content": "It rains."}],
    "multiturn_system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                         {"role": "assistant", "content": "Hi."},
                         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
                         {"role": "assistant", "content": " A dog. "}],
    "empty_system": [{"role": "system", "content": ""}, {"role": "user", "content": " padded \n"},
                     {"role": "assistant", "content": "ok"}],
}
TILES = {"one_image": [3], "several_images": [2, 1], "video": [1, 1, 1], "multiturn_system": [5]}


def as_conversation(messages) -> tuple[Conversation, list[int]]:
    """The same conversation as vlmtrain data: an image part is a leading ``<image>\\n``."""
    def text(content):
        if isinstance(content, str):
            return content
        out = ""
        for part in content:
            if part["type"] == "image":
                out += "<image>\n"
            elif part["type"] == "video":
                out += "<video>\n"
                frames.append(part["num_frames"])
            else:
                out += part["text"]
        return out

    frames: list[int] = []
    system = text(messages[0]["content"]) if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    turns = [(text(u["content"]), text(a["content"]) if a else None)
             for u, a in zip(rest[::2], list(rest[1::2]) + [None])]
    n_images = sum((u + (a or "")).count("<image>") for u, a in turns)
    return Conversation(turns=turns, system=system, images=[None] * n_images, videos=[None] * len(frames)), frames


def expand(text: str, renderer: Renderer, tiles: list[int]) -> str:
    pieces = text.split(IMG_CONTEXT)
    assert len(pieces) == len(tiles) + 1
    return pieces[0] + "".join(renderer.image_text(n) + p for n, p in zip(tiles, pieces[1:]))


@pytest.mark.parametrize("open_answer", [False, True], ids=["whole", "prompt"])
@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exported_jinja_renders_what_the_renderer_renders(name, case, bos, open_answer):
    tok = tokenizer(bos)
    template = get_template(name)
    messages = CASES[case][:-1] if open_answer else CASES[case]
    jinja = chat_template_jinja(template, tok.bos_token if tokenizer_adds_bos(tok) else None)
    rendered_by_jinja = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                                add_generation_prompt=open_answer)
    conv, frames = as_conversation(messages)
    renderer = Renderer(tok, TPT)
    ours = renderer.render(conv, template, TILES.get(case, []), frames)
    assert expand(rendered_by_jinja, renderer, TILES.get(case, [])) == ours.text
    assert tok.decode(ours.input_ids) == ours.text


def test_open_answer_is_the_prefix_of_the_whole_conversation():
    tok = tokenizer(True)
    renderer = Renderer(tok, TPT)
    for name in TEMPLATES:
        conv, frames = as_conversation(CASES["multiturn_system"])
        whole = renderer.render(conv, get_template(name), [5], frames)
        prompt = renderer.render(Conversation(conv.turns[:-1] + [(conv.turns[-1][0], None)], conv.system,
                                              conv.images), get_template(name), [5], frames)
        assert whole.input_ids[:len(prompt.input_ids)] == prompt.input_ids
        assert whole.text.startswith(prompt.text) and prompt.turn_ends == whole.turn_ends[:-1]


def test_vlmtrain_extensions_of_the_reference():
    """Pinned where vlmtrain keeps its own behaviour (the golden cases marked may_differ)."""
    tok = tokenizer(False)
    renderer = Renderer(tok, TPT)
    img = renderer.image_text(1)

    def text(line, template="internvl2_5", tiles=None, frames=()):
        conv = internvl.to_conversation(line, Path("/m"))
        conv.check()
        n = tiles or [1] * (len(conv.images) + sum(frames))
        return renderer.render(conv, get_template(template), n, list(frames)).text

    def convs(*values):
        return [{"from": f, "value": v} for f, v in zip(["human", "gpt"] * len(values), values)]

    # a placeholder in a later turn is where the image goes (the reference adds one at the first query)
    t = text({"image": "a.jpg", "conversations": convs("Hello!", "Hi!", "<image>\nWhat is this?", "A bike.")})
    assert "user\nHello!<|im_end|>" in t and f"user\n{img}\nWhat is this?<|im_end|>" in t
    # several images without placeholders: numbered before the first query (the reference raises)
    t = text({"image": ["a.jpg", "b.jpg"], "conversations": convs("Same?", "No.")})
    assert f"user\nImage-1: {img}\nImage-2: {img}\nSame?<|im_end|>" in t
    # some placeholders but not all: rejected as bad input, as the reference does
    with pytest.raises(SampleError, match="placeholder"):
        text({"image": ["a.jpg", "b.jpg"], "conversations": convs("<image>\nSame?", "No.")})
    # <video> without a newline expands like <video>\n (the reference keeps it as text or raises)
    t = text({"video": "v.mp4", "conversations": convs("<video> What happens?", "Rain.")}, frames=[2])
    assert f"user\nFrame-1: {img}\nFrame-2: {img}\n What happens?<|im_end|>" in t
    # a data system message with a template that has no place for one in the reference
    for name in ("internlm2-chat", "hermes2", "phi3-chat"):
        t = text({"conversations": [{"from": "system", "value": " Sys "}] + convs("Hi", "Yo")}, name)
        before, after = get_template(name).around("system")
        assert t.startswith(before + ("Sys" if get_template(name).strip else " Sys ") + after)
    # an empty answer is bad input (the reference trains on it)
    with pytest.raises(SampleError, match="empty"):
        text({"conversations": convs("Say nothing.", "")})
