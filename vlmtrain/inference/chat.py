"""A multi-turn chat with images and videos, answers streamed token by token: what `vlmtrain chat`
runs (``vlmtrain.cli.chat``; ``python -m vlmtrain.chat`` is the same).

    vlmtrain chat ckpt=outputs/2026-11-21/12-00-00
    vlmtrain chat ckpt=exported/ generation.do_sample=true generation.temperature=0.7
    vlmtrain chat ckpt=exported/ chat.query='<image>What is shown?' chat.images=[cat.jpg]

At the ``<<<`` prompt type a message. ``<image>`` / ``<video>`` placeholders in it are followed by
one prompt per placeholder for the media path; ``<img>path</img>`` inline is an image at that
place. A message with no placeholder sent with ``chat.images`` set is answered once (scripts).
``clear`` starts a new conversation, ``exit`` (or end of input) quits.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from vlmtrain.data.conversation import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, SampleError
from vlmtrain.data.placeholders import leading_images
from vlmtrain.errors import MissingPathError, UserError
from vlmtrain.inference.engine import GenerationConfig, InferenceEngine, Prompt, resolve_device
from vlmtrain.models.checkpoint import load_trained

PROMPT = "<<< "


@dataclass
class ChatOptions:
    query: str | None = None
    """Answer this once and exit (with ``images`` / ``videos`` for its placeholders)."""
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    system: str | None = None
    """System prompt; None: the template's default."""
    max_tiles: int = 12
    num_frames: int = 8


class ChatSession:
    """A conversation: history of turns and the media they referenced, in placeholder order."""

    def __init__(self, engine, gen: GenerationConfig, system: str | None = None):
        self.engine, self.gen, self.system = engine, gen, system
        self.clear()

    def clear(self) -> None:
        self.history: list[tuple[str, str]] = []
        self.images: list = []
        self.videos: list = []

    def ask(self, query: str, images: list, videos: list, write: Callable[[str], None]) -> str:
        prompt = Prompt(query, self.images + list(images), self.videos + list(videos), list(self.history), self.system)
        pieces = []
        for piece in self.engine.stream(prompt, self.gen):
            pieces.append(piece)
            write(piece)
        answer = self.engine.answer("".join(pieces))
        self.history.append((query, answer))
        self.images += list(images)
        self.videos += list(videos)
        return answer


def run_console(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> None:
    """The interactive loop. ``read(prompt)`` returns a line (EOFError ends), ``write`` prints."""
    while True:
        try:
            line = read(PROMPT)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave cleanly
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "exit":
            return
        if text == "clear":
            session.clear()
            write("(history cleared)\n")
            continue
        try:
            query, images, videos = resolve_media(text, read)
            session.ask(query, images, videos, write)
        except (UserError, SampleError) as e:  # a missing or unreadable medium: the session goes on
            write(f"error: {e}\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C while answering: stop this answer, keep the session
            write("\n(interrupted)\n")
            continue
        write("\n")


def resolve_media(text: str, read: Callable[[str], str]) -> tuple[str, list, list]:
    """The message with every medium as a placeholder, and the image / video paths in order:
    ``<img>path</img>`` inline gives its path; a typed ``<image>`` / ``<video>`` asks for one."""
    images, videos, out, pos = [], [], [], 0
    pattern = re.compile(rf"<img>(.*?)</img>|{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}")
    for m in pattern.finditer(text):
        out.append(text[pos:m.start()])
        pos = m.end()
        if m.group(0) == VIDEO_PLACEHOLDER:
            videos.append(_existing(read("Input a video path <<< ").strip()))
            out.append(VIDEO_PLACEHOLDER)
        else:
            path = m.group(1).strip() if m.group(1) is not None else read("Input an image path <<< ").strip()
            images.append(_existing(path))
            out.append(IMAGE_PLACEHOLDER)
    out.append(text[pos:])
    return "".join(out), images, videos


def _existing(path: str) -> str:
    if not os.path.isfile(os.path.expanduser(path)):
        raise MissingPathError(f"no such file: {path}")
    return os.path.expanduser(path)


def chat(cfg) -> str | None:
    trained = load_trained(cfg.ckpt, getattr(torch, cfg.dtype) if cfg.dtype else None)
    engine = InferenceEngine(trained, max_tiles=cfg.chat.max_tiles, num_frames=cfg.chat.num_frames,
                             device=resolve_device(cfg.device))
    gen = GenerationConfig(**OmegaConf.to_container(cfg.generation, resolve=True))
    session = ChatSession(engine, gen, cfg.chat.system)

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    if cfg.chat.query is not None:
        queues = {"image": list(cfg.chat.images), "video": list(cfg.chat.videos)}

        def take(prompt: str) -> str:
            queue = queues["video" if "video" in prompt else "image"]
            if not queue:
                raise UserError("chat.query has more <image>/<video> placeholders than chat.images/chat.videos")
            return queue.pop(0)

        query, images, videos = resolve_media(cfg.chat.query, take)
        if queues["video"]:
            raise UserError(f"{len(queues['video'])} chat.videos have no <video> placeholder in chat.query")
        # images without a placeholder go before the query, as the data formats place them
        leading = [_existing(p) for p in queues["image"]]
        query = leading_images(len(leading)) + query if leading else query
        answer = session.ask(query, leading + images, videos, write)
        write("\n")
        return answer
    write(f"vlmtrain chat ({trained.source}). 'clear' resets the conversation, 'exit' quits.\n")
    def read(prompt: str) -> str:
        write(prompt)  # not input(): on a terminal it may send the prompt to stderr
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    run_console(session, read, write)
    return None
