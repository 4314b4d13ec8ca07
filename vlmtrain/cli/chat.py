"""`vlmtrain chat ckpt=<run dir | .ckpt | HF dir>`: a multi-turn console with images and videos,
answers streamed token by token (``vlmtrain.inference.chat``).

    vlmtrain chat ckpt=outputs/2026-11-21/12-00-00
    vlmtrain chat ckpt=exported/ generation.do_sample=true generation.temperature=0.7
    vlmtrain chat ckpt=exported/ chat.query='<image>What is shown?' chat.images=[cat.jpg]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from vlmtrain.cli import Command, start
from vlmtrain.config import DType
from vlmtrain.inference.chat import ChatOptions, chat
from vlmtrain.inference.engine import GenerationConfig


@dataclass
class ChatConfig:
    ckpt: str = MISSING
    device: str = "auto"
    dtype: DType | None = None
    chat: ChatOptions = field(default_factory=ChatOptions)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


COMMAND = Command("chat", chat, config_name="chat", schema=ChatConfig, schema_name="vlmtrain_chat_schema")


def main() -> None:
    start(COMMAND)
