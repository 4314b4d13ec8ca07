"""Chat templates as data: how a conversation is laid out in text and which parts carry loss.

A conversation renders (``vlmtrain.data.render``) as

    [tokenizer BOS] prefix system  ( user  assistant ANSWER answer_end  turn_sep )*

where ``system`` and ``user`` are formats with one ``{content}``; only ANSWER and ``answer_end``
carry loss (the end marker is learnt so the model stops). At inference the last turn stops after
``assistant``, the header generation continues from. Adding a template is one entry in
``TEMPLATES``; the exported Jinja chat template (``vlmtrain.models.export``) is derived from the
same fields.

The InternVL layouts are those of InternVL's own training code (``internvl_chat``:
``preprocess_internvl2_5`` and the ``Conversation`` templates in ``conversation.py``), checked token
for token against its outputs (``tests/test_reference_goldens.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmtrain.errors import UserError

CONTENT = "{content}"

INTERNVL_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
"""System text of InternVL 2.5 (template ``internvl2_5``)."""

INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
"""System text the InternVL 2 / 1.5 checkpoints were trained with (internlm2-chat, phi3-chat, Hermes-2)."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str
    """Format of the system block, with {content}; "" when the template has no system block."""
    user: str
    """Format of a user turn, with {content} (no loss)."""
    assistant: str
    """Header before an answer (no loss); generation starts after it."""
    answer_end: str
    """End-of-turn marker after an answer; it carries loss so the model learns to stop."""
    turn_sep: str = ""
    """Text after answer_end, before the next turn (no loss)."""
    default_system: str | None = None
    """System text when neither the data nor the config gives one; None: no system block then."""
    strip: bool = False
    """Strip leading/trailing whitespace of every message (InternVL's internlm2-chat does)."""
    bos: bool = True
    """Start with the tokenizer's BOS when the tokenizer adds one (``tokenizer_adds_bos``), as
    InternVL's training code does: InternLM2 and Phi-3 tokenizers add ``<s>``, Qwen2.5's has none."""
    prefix: str = ""
    """Literal text before everything else (after the BOS)."""
    stop: str = ""
    """The token generation stops at (besides the tokenizer's EOS)."""
    history_end: str | None = None
    """What follows an answer that is not the conversation's last (no loss), instead of
    ``answer_end`` + ``turn_sep``: CogVLM's history is ``Answer: {a}\n`` without an EOS. None: every
    answer ends with ``answer_end``."""
    images_at_start: bool = False
    """Images go at the very start (after the BOS and ``prefix``), their ``<image>`` placeholders
    (and the newline after each) removed from the text: CogVLM puts the image's positions right
    after the BOS, before the prompt. Videos are refused (no frame lines to place)."""
    image_sep: str | None = None
    """Replaces the newline after an ``<image>`` (the placement rule puts ``<image>\\n`` before a
    query): MiniGPT-4 writes ``<Img>...</Img> question`` with a space. None: the newline stays."""
    image_first: bool = False
    """A message with images renders as its images (each ``<image>\\n``) then its other text,
    stripped: LLaVA's ``preprocess_multimodal`` (``<image>\\n`` + the rest, stripped)."""
    user_images_only: bool = False
    """A user message renders as its images alone, its text dropped: LLaVA's ``preprocess_plain``
    (the caption stage trains on image -> caption, whatever the instruction says)."""
    image_markers: bool = True
    """False: an image is its context tokens alone, without the layout's start / end (MiniGPT-4's
    stage 1 puts the 32 query embeddings straight after the BOS)."""
    answer_prefix: str = ""
    """Text before each answer that carries loss (vicuna_v1's space after ``ASSISTANT:``: the
    prompt ends at the colon and the answer's first token holds the space)."""
    answer_apart: bool = False
    """Tokenise each answer (prefix, text and end marker) on its own, not merged with the prompt
    text before it: MiniGPT-4 tokenises its target text separately from the prompt."""

    def __post_init__(self):
        for field in ("user",) + (("system",) if self.system else ()):
            if getattr(self, field).count(CONTENT) != 1:
                raise ValueError(f"template {self.name}: {field} must hold {CONTENT} exactly once")

    def around(self, field: str) -> tuple[str, str]:
        """(text before, text after) the {content} of the ``system`` or ``user`` format."""
        before, _, after = getattr(self, field).partition(CONTENT)
        return before, after


# InternVL 1.5 / 2 lay internlm2-chat, Hermes-2 and phi3-chat out in fastchat's "MPT" style: the end
# marker is the whole separator, with no newline after it, and there is always a system block.
_CHATML_MPT = dict(
    system="<|im_start|>system\n{content}<|im_end|>",
    user="<|im_start|>user\n{content}<|im_end|>",
    assistant="<|im_start|>assistant\n",
    answer_end="<|im_end|>",
    stop="<|im_end|>",
    default_system=INTERNVL2_SYSTEM,
)

TEMPLATES = {
    t.name: t
    for t in [
        # InternVL 2.5 (preprocess_internvl2_5): chatml with a newline after every block
        ChatTemplate(
            name="internvl2_5",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            assistant="<|im_start|>assistant\n",
            answer_end="<|im_end|>",
            turn_sep="\n",
            default_system=INTERNVL_SYSTEM,
            stop="<|im_end|>",
        ),
        # InternVL 1.5 / 2 with InternLM2 LLMs (preprocess_internlm strips every message)
        ChatTemplate(name="internlm2-chat", strip=True, **_CHATML_MPT),
        # InternVL 2 with Nous-Hermes-2-Yi-34B / Qwen2 (preprocess_mpt)
        ChatTemplate(name="hermes2", **_CHATML_MPT),
        # InternVL 2 / Mini-InternVL 1.5 with Phi-3-mini (preprocess_phi3)
        ChatTemplate(
            name="phi3-chat",
            system="<|system|>\n{content}<|end|>",
            user="<|user|>\n{content}<|end|>",
            assistant="<|assistant|>\n",
            answer_end="<|end|>",
            default_system=INTERNVL2_SYSTEM,
            stop="<|end|>",
        ),
        # CogVLM-Chat v1.1 (THUDM/cogvlm-chat-hf, template_version "chat": _history_to_prompt and
        # build_conversation_input_ids): [BOS] image "Question: {q} Answer: {a}</s>"; history turns are
        # "Question: {q} Answer: {a}\n" without the EOS; no system block
        ChatTemplate(
            name="cogvlm_chat",
            system="",
            user="Question: {content} Answer:",
            assistant="",
            answer_prefix=" ",   # the release tokenizes the answer apart: its first token is ▁word
            answer_end="</s>",
            history_end="\n",
            images_at_start=True,
            stop="</s>",
        ),
        # Llama 3 instruct, as Meta's chat template writes it: every message trimmed, no default
        # system block, the BOS the tokenizer's (Meta's template writes bos_token itself)
        ChatTemplate(
            name="llama3-chat",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
            answer_end="<|eot_id|>",
            strip=True,
            stop="<|eot_id|>",
        ),
    ]
}

# LLaVA-1.5 (llava/conversation.py, llava/train/train.py: preprocess_plain / preprocess_v1) and
# MiniGPT-4 (minigpt4/models/minigpt_base.py, train_configs/minigpt4_stage2_finetune.yaml)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
"""System text of LLaVA's ``conv_vicuna_v1``."""

TEMPLATES.update({
    t.name: t
    for t in [
        # conv_llava_plain + preprocess_plain: <image> then the caption and sep "\n"; the user's text
        # is dropped, only the caption and the "\n" carry loss
        # (no image markers: MiniGPT-4's stage 1, BOS + the query embeddings + caption + "\n", is the same rule)
        ChatTemplate(name="plain", system="", user="{content}", assistant="", answer_end="\n",
                     user_images_only=True, image_markers=False),
        # conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"): system + " " + "USER: " + q + " " +
        # "ASSISTANT: " + a + "</s>"; preprocess_v1 masks through "ASSISTANT:", the answer and "</s>" train
        ChatTemplate(name="vicuna_v1", system="{content} ", user="USER: {content} ", assistant="ASSISTANT:",
                     answer_prefix=" ", answer_end="</s>", default_system=VICUNA_SYSTEM, stop="</s>",
                     image_first=True),
        # MiniGPT-4 stage 2: '###Human: {} ###Assistant: ' around '<Img><ImageHere></Img> instruction';
        # the target is answer + end_sym "###", tokenised apart from the prompt
        ChatTemplate(name="minigpt4", system="", user="###Human: {content} ", assistant="###Assistant: ",
                     answer_end="###", image_first=True, image_sep=" ", answer_apart=True),
    ]
})

REFERENCE_NAMES = {"Hermes-2": "hermes2"}
"""InternVL's template names that vlmtrain spells differently."""


def get_template(name: str) -> ChatTemplate:
    name = REFERENCE_NAMES.get(name, name)
    if name not in TEMPLATES:
        raise UserError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
