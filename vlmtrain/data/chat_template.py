"""The Jinja chat template an export carries: a ChatTemplate's layout for serving engines.

``chat_template_jinja`` renders OpenAI-style messages (``content`` a string or a list of parts
``{"type": "text" | "image" | "video"}``) as ``vlmtrain.data.render`` renders the same
conversation, with the placeholders transformers' ``InternVLProcessor`` expands: an image part is
``<IMG_CONTEXT>\\n`` (a leading ``<image>\\n``); a video part with ``num_frames`` is training's
frame lines ``Frame-1: <IMG_CONTEXT>\\n...`` (pass its frames as images); a video part without it
is ``<video>\\n``, which the processor expands itself (sampling frames, and labelling them
``Frame1:`` like the model card's chat code, not training's ``Frame-1:``). The BOS is written when
the tokenizer adds one, since engines tokenise a rendered template without special tokens.
``tests/test_render.py`` holds the template to the renderer.
"""

from __future__ import annotations

import json

from vlmtrain.data.templates import ChatTemplate


def _render_content(image: str) -> str:
    """Jinja macros: ``render(content)`` as the renderer writes a message (an image part is
    ``image`` + a newline), ``images_first(content)`` (ChatTemplate.image_first: the images, then
    the rest stripped) and ``images_only(content)`` (ChatTemplate.user_images_only)."""
    def lit(s: str) -> str:
        return json.dumps(s, ensure_ascii=False)

    img = lit(image + "\n")
    return (
        "{%- macro render(content, skip_images=false) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for part in content -%}"
        f"{{%- if part['type'] == 'image' -%}}{{%- if not skip_images -%}}{{{{ {img} }}}}{{%- endif -%}}"
        "{%- elif part['type'] == 'video' and part.get('num_frames') -%}"
        f"{{%- for i in range(part['num_frames']) -%}}{{{{ 'Frame-' ~ (i + 1) ~ {lit(': ' + image + chr(10))} }}}}"
        "{%- endfor -%}"
        "{%- elif part['type'] == 'video' -%}{{ '<video>\\n' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        "{%- macro images_first(content) -%}"
        "{%- set n = 0 if content is string else (content | selectattr('type', 'equalto', 'image') | list | length) -%}"
        "{%- if n == 0 -%}{{ render(content) }}"
        f"{{%- else -%}}{{{{ ({img} * n + (render(content, true) | trim)) | trim }}}}{{%- endif -%}}"
        "{%- endmacro -%}"
        "{%- macro images_only(content) -%}"
        "{%- if content is not string -%}{%- for part in content -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{ {lit(image)} }}}}"
        "{%- elif part['type'] == 'video' -%}{{ render([part]) }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
    )


def chat_template_jinja(t: ChatTemplate, bos_token: str | None = None, image: str = "<IMG_CONTEXT>") -> str:
    """The Jinja template of ``t``; ``bos_token``: the BOS to start with (None: none); ``image``:
    what an image part is written as (the native processor's placeholder, ``ImageLayout.placeholder``)."""

    def lit(s: str | None) -> str:
        return "none" if s is None else json.dumps(s, ensure_ascii=False)

    def content(expr: str, user: bool = False) -> str:
        macro = "images_only" if user and t.user_images_only else "images_first" if t.image_first else "render"
        out = f"render({expr}, true)" if t.images_at_start else f"{macro}({expr})"  # images went first (CogVLM)
        if t.image_sep is not None:
            out = f"({out} | replace({lit(image + chr(10))}, {lit(image + t.image_sep)}))"
        return f"({out} | trim)" if t.strip else out

    user_before, user_after = t.around("user")
    first, each, each_user = (content("messages[0]['content']"), content("message['content']"),
                              content("message['content']", user=True))
    out = _render_content(image)
    if t.bos and bos_token:
        out += f"{{{{- {lit(bos_token)} -}}}}"
    if t.prefix:
        out += f"{{{{- {lit(t.prefix)} -}}}}"
    if t.images_at_start:  # every image part of every message, before everything (CogVLM)
        out += (
            "{%- set images = namespace(n=0) -%}"
            "{%- for m in messages -%}{%- if m['content'] is not string -%}{%- for part in m['content'] -%}"
            "{%- if part['type'] == 'image' -%}{%- set images.n = images.n + 1 -%}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}{%- endfor -%}"
            f"{{{{- {lit(image)} * images.n -}}}}"
        )
    out += (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        f"{{%- set system = {first} -%}}"
        "{%- set loop_messages = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {lit(t.default_system)} -%}}{{%- set loop_messages = messages -%}}"
        "{%- endif -%}"
    )
    if t.system:
        before, after = t.around("system")
        out += f"{{%- if system is not none -%}}{{{{- {lit(before)} + system + {lit(after)} -}}}}{{%- endif -%}}"
    out += (
        "{%- for message in loop_messages -%}"
        f"{{%- if message['role'] == 'user' -%}}"
        f"{{{{- {lit(user_before)} + {each_user} + {lit(user_after)} -}}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{- {lit(t.assistant + t.answer_prefix)} + {each} -}}}}"
        + ("" if t.history_end is None else f"{{%- if not loop.last -%}}{{{{- {lit(t.history_end)} -}}}}{{%- else -%}}")
        + f"{{{{- {lit(t.answer_end + t.turn_sep)} -}}}}"
        + ("" if t.history_end is None else "{%- endif -%}")
        + "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {lit(t.assistant)} -}}}}{{%- endif -%}}"
    )
    return out
