"""The one renderer: training, evaluation, chat and the exported Jinja chat template render the same
string for the same conversation (video included); the Jinja template renders what the renderer
renders for every template, with and without a BOS-adding tokenizer, on text, images, video,
multi-turn and system cases; and vlmtrain's own rules where it extends the reference (README
"What a released checkpoint sees")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
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


def expand(text: str, renderer: Renderer, tiles: list[int], markers: bool = True) -> str:
    pieces = text.split(IMG_CONTEXT)
    assert len(pieces) == len(tiles) + 1
    return pieces[0] + "".join(renderer.image_text(n, markers) + p for n, p in zip(tiles, pieces[1:]))


@pytest.mark.parametrize("open_answer", [False, True], ids=["whole", "prompt"])
@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exported_jinja_renders_what_the_renderer_renders(name, case, bos, open_answer):
    tok = tokenizer(bos)
    template = get_template(name)
    messages = CASES[case][:-1] if open_answer else CASES[case]
    if messages[0]["role"] == "system" and not template.system:
        pytest.skip(f"template {name} has no system block (the renderer refuses a system text)")
    jinja = chat_template_jinja(template, tok.bos_token if tokenizer_adds_bos(tok) else None)
    rendered_by_jinja = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                                add_generation_prompt=open_answer)
    conv, frames = as_conversation(messages)
    renderer = Renderer(tok, TPT)
    if frames and template.images_at_start:
        # a video where the images go before everything (CogVLM): refused, counted
        with pytest.raises(SampleError):
            renderer.render(conv, template, TILES.get(case, []), frames)
        return
    ours = renderer.render(conv, template, TILES.get(case, []), frames)
    assert expand(rendered_by_jinja, renderer, TILES.get(case, []), template.image_markers) == ours.text
    assert tok.decode(ours.input_ids) == ours.text


def test_open_answer_is_the_prefix_of_the_whole_conversation():
    tok = tokenizer(True)
    renderer = Renderer(tok, TPT)
    for name in TEMPLATES:
        conv, frames = as_conversation(CASES["multiturn_system" if get_template(name).system else "one_image"])
        if not get_template(name).system:
            conv.turns = [("Hello", "Hi."), *conv.turns]
            conv.images = [None]
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


def test_training_chat_eval_and_export_render_the_same_string(tmp_path):
    """One conversation with a system message, an image and a video, through every path: the
    training sample, each evaluation question, the chat console's turns and the exported
    tokenizer's chat template (with its image placeholders expanded) are the same text."""
    from model_fixtures import make_run_dir
    from omegaconf import OmegaConf
    from test_data_formats import image, write_jsonl
    from test_data_processing import make_video

    from vlmtrain.config import DataConfig, DatasetConfig
    from vlmtrain.data.images import normalize_pixels
    from vlmtrain.data.mixture import MixtureDataset
    from vlmtrain.inference.chat import ChatSession, resolve_media
    from vlmtrain.inference.engine import GenerationConfig, InferenceEngine
    from vlmtrain.inference.evaluation import questions
    from vlmtrain.models.checkpoint import load_trained
    from vlmtrain.models.export import export
    from vlmtrain.models.internvl import tokens_per_tile

    cfg, _, _ = make_run_dir(tmp_path / "run")
    trained = load_trained(tmp_path / "run")
    tok, v = trained.tokenizer, cfg.model.vision
    template = get_template(cfg.model.template)
    image(tmp_path / "a.png", size=(300, 150), colour=(200, 40, 40))
    make_video(tmp_path / "v.mp4", num_frames=20)
    turns = [("<image>\nWhat colour is it?", "Red."), ("<video>\nAnd in the clip?", "Grey.")]
    line = {"image": "a.png", "video": "v.mp4", "conversations": [{"from": "system", "value": "Look closely."}]
            + [{"from": f, "value": t} for q, a in turns for f, t in (("human", q), ("gpt", a))]}
    dcfg = DatasetConfig(path=str(write_jsonl(tmp_path / "d.jsonl", [line])), n_max=4, min_frames=3, max_frames=3,
                         jpeg_augment=False)
    data = DataConfig(datasets={"d": dcfg}, template=cfg.model.template, tile_size=v.image_size, max_seq_len=65536)
    sample = MixtureDataset(data, tok, tokens_per_tile(v.image_size, v.patch_size, cfg.model.downsample_ratio),
                            seed=0)[(0, 0)]
    training = tok.decode(sample.input_ids)
    n_image = sample.num_tiles[0]
    engine = InferenceEngine(trained, max_tiles=4, num_frames=3)

    def prompt_text(prompt) -> str:
        ids, pixels = engine.encode(prompt)
        # the image's tiles are training's pixels (training's tiles are uint8, normalised on the device)
        assert torch.allclose(pixels[:n_image], normalize_pixels(sample.pixel_values[:n_image]))
        return tok.decode(ids)

    # evaluation: each assistant turn is asked with the turns before it as history
    evaluated = [prompt_text(q.prompt) for q in questions("d", dcfg, None, None, {})]
    ends = [training.index(a + template.answer_end) for _, a in turns]
    assert evaluated == [training[:end] for end in ends]
    assert all(text.endswith(template.assistant) for text in evaluated)

    # chat: the console's session, media typed as placeholders then paths
    asked = []
    engine.stream = lambda prompt, gen: asked.append(prompt_text(prompt)) or iter([turns[len(asked) - 1][1]])
    session = ChatSession(engine, GenerationConfig(), system="Look closely.")
    paths = iter([str(tmp_path / "a.png"), str(tmp_path / "v.mp4")])
    for query, _ in turns:
        session.ask(*resolve_media(query, lambda _: next(paths)), write=lambda s: None)
    assert asked == evaluated

    # the exported chat template, as a serving engine renders it
    out = export(OmegaConf.create({"ckpt": str(tmp_path / "run"), "out": str(tmp_path / "hf"), "dtype": None,
                                   "max_tiles": 4}))
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    messages = [{"role": "system", "content": "Look closely."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": [{"type": "video", "num_frames": 3}, {"type": "text", "text": "And in the clip?"}]},
                {"role": "assistant", "content": "Grey."}]
    renderer = Renderer(tok, engine.tokens_per_tile)
    tiles = sample.num_tiles
    for k, end in enumerate([2, 4]):
        text = exported.apply_chat_template(messages[:end], add_generation_prompt=True, tokenize=False)
        assert expand(text, renderer, tiles[:1 + 3 * k]) == evaluated[k]
    whole = exported.apply_chat_template(messages, tokenize=False)
    assert expand(whole, renderer, tiles) == training


def test_template_fields_bos_and_missing_system_block():
    """A template may opt out of the tokenizer's BOS; one without a system block refuses a system
    text instead of dropping it (a data line is skipped, a config value is the user's error)."""
    import dataclasses

    from vlmtrain.errors import UserError

    tok = tokenizer(True)
    renderer = Renderer(tok, TPT)
    conv = Conversation(turns=[("q", "a")])
    base = get_template("internvl2_5")
    assert renderer.render(conv, base).input_ids[0] == tok.bos_token_id
    assert renderer.render(conv, dataclasses.replace(base, bos=False)).input_ids[0] != tok.bos_token_id
    bare = dataclasses.replace(base, name="bare", system="", default_system=None)
    assert not renderer.render(conv, bare).text.removeprefix("<s>").startswith("<|im_start|>system")
    with pytest.raises(SampleError, match="no system block"):
        renderer.render(Conversation(turns=[("q", "a")], system="S"), bare)
    with pytest.raises(UserError, match="no system block"):
        renderer.render(conv, bare, system="S")
