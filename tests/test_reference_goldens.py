"""vlmtrain against outputs of InternVL's own training code: one test per golden case.

The cases live in ``$VLMTRAIN_REFERENCE_GOLDENS`` (default ``tests/golden/internvl_reference``):
``templates.json`` (a data line, its template, tokenizer and media -> the text, input_ids and
labels the reference produced, or the error it raised) and ``frames.json`` (the training frame
draw's support per output frame, short videos padded). Everything is derived from the case fields
and the tokenizers of that directory, so any golden set of this format runs unchanged:

    pytest tests -k reference
    VLMTRAIN_REFERENCE_GOLDENS=/path/to/other/set pytest tests/test_reference_goldens.py

A case is run through training's own path: the InternVL format reader (placeholder placement)
and ``ConversationEncoder`` (the renderer) with the case's tiles per image or frames per video.
``text`` is compared with one leading BOS string removed from both sides: the reference writes
BOS into the string for internvl2_5 and lets the tokenizer add it for internlm2-chat / phi3-chat,
and both end as the same single BOS id, which the exact ``input_ids`` comparison pins.
Cases marked ``may_differ`` are where vlmtrain keeps its own behaviour (README, "Chat
templates"): they are held to vlmtrain's rules instead (``_own_behaviour``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from functools import cache
from pathlib import Path

import pytest

from vlmtrain.data.conversation import SampleError
from vlmtrain.data.encode import ConversationEncoder
from vlmtrain.data.formats import internvl
from vlmtrain.data.render import IMG_CONTEXT, IMG_END, IMG_START
from vlmtrain.data.templates import get_template
from vlmtrain.data.video import training_frame_indices
from vlmtrain.training.loss import IGNORE_INDEX

GOLDENS = Path(os.environ.get("VLMTRAIN_REFERENCE_GOLDENS")
               or Path(__file__).parent / "golden" / "internvl_reference")
TEMPLATE_CASES = json.loads((GOLDENS / "templates.json").read_text(encoding="utf-8"))
FRAME_CASES = json.loads((GOLDENS / "frames.json").read_text(encoding="utf-8"))["cases"]

OWN_REJECTIONS = {"empty_answer", "placeholder_mismatch"}
"""Why vlmtrain may reject a line the reference trains on (counted as bad input)."""


@cache
def tokenizer(bos: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GOLDENS / "tokenizers" / ("bos" if bos else "plain")),
                                        local_files_only=True)
    if bos:
        tok.add_bos_token = True  # transformers 5 does not read the flag from tokenizer_config.json
    return tok


def data_line(case) -> dict:
    """The case as an InternVL jsonl line (media paths are never opened)."""
    line = {"conversations": json.loads(json.dumps(case["conversations"]))}
    media = case.get("media")
    if media == "image":
        line["image"] = "image0.jpg"
    elif media == "images":
        line["image"] = [f"image{i}.jpg" for i in range(len(case["num_patches"]))]
    elif media == "video":
        line["video"] = "video0.mp4"
    elif media is not None:
        raise ValueError(f"unknown media kind {media!r}")
    return line


def encode(case):
    tok = tokenizer(bool(case["bos"]))
    conv = internvl.to_conversation(data_line(case), Path("/media"))
    conv.check()
    frames = [len(case["num_patches"])] if case.get("media") == "video" else []
    encoder = ConversationEncoder(tok, case["num_image_token"], max_seq_len=10**9)
    ids, labels = encoder.encode(conv, get_template(case["template"]), list(case["num_patches"]), None, frames)
    return tok, ids.tolist(), labels.tolist()


def without_bos(text: str, tok) -> str:
    return text[len(tok.bos_token):] if tok.bos_token and text.startswith(tok.bos_token) else text


@pytest.mark.parametrize("case", TEMPLATE_CASES, ids=[c["id"] for c in TEMPLATE_CASES])
def test_template_case(case):
    if case.get("may_differ"):
        _own_behaviour(case)
        return
    if "raises" in case:
        with pytest.raises(SampleError):
            encode(case)
        return
    tok, ids, labels = encode(case)
    assert without_bos(tok.decode(ids), tok) == without_bos(case["text"], tok)
    assert ids == case["input_ids"]
    if case.get("labels_comparable", True):
        assert labels == case["labels"]


def _own_behaviour(case):
    """vlmtrain's rules where it deliberately differs: the line is rejected as bad input for a
    documented reason, or it renders with every image in place and loss on exactly the answers."""
    try:
        tok, ids, labels = encode(case)
    except SampleError as e:
        assert e.reason in OWN_REJECTIONS, e
        return
    template = get_template(case["template"])
    text = tok.decode(ids)
    strip = str.strip if template.strip else (lambda s: s)
    # every image (video frame) in order, each with its tiles' image tokens
    blocks = [block.split(IMG_END)[0] for block in text.split(IMG_START)[1:]]
    assert [b.count(IMG_CONTEXT) for b in blocks] == [case["num_image_token"] * n for n in case["num_patches"]]
    assert text.count(IMG_END) == len(case["num_patches"])
    # loss on the answers and their end markers, nothing else
    answers = [strip(m["value"]) for m in case["conversations"] if m["from"] == "gpt"]
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "".join(a + template.answer_end for a in answers)
    # the data's system message, else the template's
    system = [m["value"] for m in case["conversations"] if m["from"] == "system"] or [template.default_system]
    if template.system and system[0] is not None:
        before, after = template.around("system")
        assert before + strip(system[0]) + after in text
    # the questions, in order, with their placeholders expanded
    pos = 0
    for m in case["conversations"]:
        if m["from"] == "human":
            for part in strip(m["value"]).replace("<video>", "<image>").split("<image>"):
                part = part.strip("\n")
                if part:
                    pos = text.index(part, pos)


# -- frames --------------------------------------------------------------------------------------
class ScriptedRng:
    """Plays one outcome of every random call the sampler makes: ``script[k]`` picks among the
    options of call k (0 when the script is shorter), and ``options`` records how many each
    call had, so every outcome can be enumerated, or only the smallest (all 0) and largest."""

    def __init__(self, script=(), largest=False):
        self.script, self.largest, self.options = list(script), largest, []

    def _pick(self, n: int) -> int:
        k = len(self.options)
        self.options.append(n)
        return n - 1 if self.largest else (self.script[k] if k < len(self.script) else 0)

    def randrange(self, start, stop):
        return start + self._pick(stop - start)

    def sample(self, population, k):
        population = list(population)
        n = math.comb(len(population), k)
        pick = self._pick(n)
        if pick == n - 1:
            return population[len(population) - k:]
        return list(next(itertools.islice(itertools.combinations(population, k), pick, None)))


def frame_support(vlen: int, num_frames: int, enumerate_up_to: int = 20000):
    """[min, max] per output frame of ``training_frame_indices``, over all its outcomes when
    there are at most ``enumerate_up_to`` of them; beyond that from the smallest and largest
    outcome, which bound every position because each position grows with every choice."""
    probe = ScriptedRng()
    training_frame_indices(vlen, num_frames, probe)
    if math.prod(probe.options) > enumerate_up_to:
        low = training_frame_indices(vlen, num_frames, ScriptedRng())
        high = training_frame_indices(vlen, num_frames, ScriptedRng(largest=True))
        return [[a, b] for a, b in zip(low, high)]
    outcomes = [training_frame_indices(vlen, num_frames, ScriptedRng(script))
                for script in itertools.product(*(range(n) for n in probe.options))]
    return [[min(col), max(col)] for col in zip(*outcomes)]


@pytest.mark.parametrize("case", FRAME_CASES, ids=[c["id"] for c in FRAME_CASES])
def test_frame_case(case):
    vlen, n = case["vlen"], case["num_frames"]
    assert frame_support(vlen, n) == case["rand_support"]
    # a real draw: n frames (short videos padded with their last frame), in time order, in support
    rng = random.Random(case["id"])
    for _ in range(20):
        indices = training_frame_indices(vlen, n, rng)
        assert len(indices) == n and indices == sorted(indices)
        assert all(lo <= i <= hi for i, (lo, hi) in zip(indices, case["rand_support"]))
        assert indices[min(n, vlen) - 1:] == [indices[min(n, vlen) - 1]] * (n - min(n, vlen) + 1)
