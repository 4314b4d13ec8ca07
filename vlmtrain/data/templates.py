"""Chat templates as data: how a conversation is laid out in text and which parts carry loss.

Each turn renders as ``user`` (no loss) then the answer followed by ``answer_end`` (loss on both)
then ``turn_sep`` (no loss). Every marker is a special token of the tokenizer, so rendering turn
by turn tokenizes exactly like rendering the whole text at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmtrain.errors import UserError

INTERNVL_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    prefix: str
    """Text before everything (e.g. a BOS token)."""
    system: str
    """Format of the system block, with {content}; empty string: the template has none."""
    user: str
    """Format of a user turn, with {content}, including the assistant header that follows."""
    answer_end: str
    """End-of-turn marker after an answer; it carries loss so the model learns to stop."""
    turn_sep: str
    """Text after answer_end, before the next turn (no loss)."""
    default_system: str = ""
    stop: str = ""

    def render_system(self, system: str | None) -> str:
        text = self.default_system if system is None else system
        return self.prefix + (self.system.format(content=text) if self.system and text else "")


INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
"""System text the InternVL 2 / 1.5 checkpoints were trained with (internlm2-chat, phi3-chat, Hermes-2)."""

_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    answer_end="<|im_end|>",
    turn_sep="\n",
    stop="<|im_end|>",
)

# InternVL 1.5 / 2 render internlm2-chat, Hermes-2 and phi3-chat in its "MPT" style: the end marker
# is the whole separator, with no newline after it (unlike the LLMs' own HF chat templates). We keep
# that layout, because fine-tuning a released InternVL checkpoint on another layout shifts its inputs.
_CHATML_MPT = dict(
    system="<|im_start|>system\n{content}<|im_end|>",
    user="<|im_start|>user\n{content}<|im_end|><|im_start|>assistant\n",
    answer_end="<|im_end|>",
    turn_sep="",
    stop="<|im_end|>",
)

TEMPLATES = {
    t.name: t
    for t in [
        # InternVL 2.5: chatml with newlines (Qwen2.5 and InternLM2.5 LLMs alike)
        ChatTemplate(name="internvl2_5", prefix="", default_system=INTERNVL_SYSTEM, **_CHATML),
        # InternVL 1.5 / 2 with InternLM2 LLMs; the InternLM2 tokenizer starts every text with <s>
        ChatTemplate(name="internlm2-chat", prefix="<s>", default_system=INTERNVL2_SYSTEM, **_CHATML_MPT),
        # InternVL 2 with Nous-Hermes-2-Yi-34B (chatml; the Yi tokenizer adds no BOS)
        ChatTemplate(name="hermes2", prefix="", default_system=INTERNVL2_SYSTEM, **_CHATML_MPT),
        # InternVL 2 / Mini-InternVL 1.5 with Phi-3-mini (its tokenizer starts with <s>)
        ChatTemplate(
            name="phi3-chat",
            prefix="<s>",
            system="<|system|>\n{content}<|end|>",
            user="<|user|>\n{content}<|end|><|assistant|>\n",
            answer_end="<|end|>",
            turn_sep="",
            default_system=INTERNVL2_SYSTEM,
            stop="<|end|>",
        ),
        # Llama 3 instruct layout, as Meta's chat template writes it
        ChatTemplate(
            name="llama3-chat",
            prefix="<|begin_of_text|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user=(
                "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            answer_end="<|eot_id|>",
            turn_sep="",
            stop="<|eot_id|>",
        ),
    ]
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise UserError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
