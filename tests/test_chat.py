"""vlmtrain.chat: the console through a pseudo-terminal, streaming, history and one-shot mode."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
from model_fixtures import make_run_dir
from omegaconf import OmegaConf
from PIL import Image

from vlmtrain.inference.chat import ChatSession, chat, resolve_media, run_console
from vlmtrain.inference.engine import GenerationConfig, InferenceEngine, Prompt
from vlmtrain.models.checkpoint import load_trained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    make_run_dir(d / "run")
    Image.new("RGB", (320, 200), (30, 160, 60)).save(d / "green.png")
    Image.new("RGB", (200, 200), (220, 30, 30)).save(d / "red.png")
    return d


def test_resolve_media_inline_and_prompted(run):
    asked = []

    def read(prompt):
        asked.append(prompt)
        return str(run / "red.png")

    text, images, videos = resolve_media(f"<img>{run / 'green.png'}</img> vs <image>: which is red?", read)
    assert text == "<image> vs <image>: which is red?"
    assert images == [str(run / "green.png"), str(run / "red.png")] and videos == [] and len(asked) == 1
    with pytest.raises(FileNotFoundError):
        resolve_media("<img>/no/such.png</img>", read)


def test_console_streams_keeps_history_and_clears(run):
    trained = load_trained(run / "run")
    engine = InferenceEngine(trained, max_tiles=4)
    gen = GenerationConfig(max_new_tokens=6)
    session = ChatSession(engine, gen)
    lines = iter(["<image>What colour is it?", str(run / "green.png"), "And the shape?", "clear", "Hi", "exit"])
    written = []
    run_console(session, lambda prompt: (written.append(prompt), next(lines))[1], written.append)
    # answers equal non-streamed greedy generation with the same history
    a1 = engine.generate([Prompt("<image>What colour is it?", [str(run / "green.png")])], gen)[0]
    a2 = engine.generate([Prompt("And the shape?", [str(run / "green.png")],
                                 history=[("<image>What colour is it?", a1)])], gen)[0]
    a3 = engine.generate([Prompt("Hi")], gen)[0]
    out = "".join(written)
    assert a1 in out and a2 in out and a3 in out and "(history cleared)" in out
    assert session.history == [("Hi", a3)]  # clear dropped the earlier turns
    pieces = list(engine.stream(Prompt("Hi"), gen))
    assert len([p for p in pieces if p]) >= 2  # tokens arrive one piece at a time


def test_one_shot_query(run, capsys):
    cfg = OmegaConf.create({"ckpt": str(run / "run"), "device": "cpu", "dtype": None,
                            "chat": {"query": "What colour?", "images": [str(run / "red.png")], "videos": [],
                                     "system": None, "max_tiles": 4, "num_frames": 8},
                            "generation": {"max_new_tokens": 6, "do_sample": False}})
    answer = chat(cfg)
    engine = InferenceEngine(load_trained(run / "run"), max_tiles=4)
    assert answer == engine.generate([Prompt("<image>\nWhat colour?", [str(run / "red.png")])],
                                     GenerationConfig(max_new_tokens=6))[0]
    assert answer in capsys.readouterr().out


@pytest.mark.slow
def test_console_through_a_pseudo_terminal(run):
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmtrain.chat", f"ckpt={run / 'run'}", "device=cpu", "chat.max_tiles=4",
         "generation.max_new_tokens=6"],
        stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, env=env, cwd=REPO, close_fds=True,
    )
    os.close(slave)
    buf = b""

    def until(marker: bytes, timeout=180):
        nonlocal buf
        end = time.time() + timeout
        while marker not in buf:
            assert time.time() < end, f"timed out waiting for {marker!r}; got {buf[-500:]!r}"
            r, _, _ = select.select([master], [], [], 1)
            if r:
                buf += os.read(master, 4096)
        head, _, buf = buf.partition(marker)
        return head

    try:
        until(b"<<< ")
        os.write(master, b"<image>What colour is it?\n")
        until(b"Input an image path <<< ")
        os.write(master, f"{run / 'green.png'}\n".encode())
        answer = until(b"<<< ").decode(errors="replace")
        os.write(master, b"exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    engine = InferenceEngine(load_trained(run / "run"), max_tiles=4)
    expected = engine.generate([Prompt("<image>What colour is it?", [str(run / "green.png")])],
                               GenerationConfig(max_new_tokens=6))[0]
    assert expected.split()[0] in answer


def test_video_placeholder_becomes_frames(run, tmp_path):
    import av
    import numpy as np

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(16):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 15, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    engine = InferenceEngine(load_trained(run / "run"), max_tiles=4, num_frames=4)
    ids, px = engine.encode(Prompt("<video>\nWhat happens?", videos=[str(path)]))
    text = engine.tokenizer.decode(ids)
    assert px.shape[0] == 4 and all(f"Frame-{i}: <img>" in text for i in range(1, 5))
    assert ids.count(engine.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) == 4 * engine.tokens_per_tile
