"""The cogvlm_chat template against the release's prompt code (THUDM/cogvlm-chat-hf,
``build_conversation_input_ids`` with ``template_version="chat"`` and ``_history_to_prompt``):

    input_ids = [BOS] + [pad] * (2 + patches)            # token type VISION
              + tokenize("Question: {q1} Answer: {a1}\\n ... Question: {qn} Answer:")
              + tokenize(label) + [EOS]                   # labels: label + EOS only

Goldens: the rendered strings, and which text carries loss. vlmtrain also trains the history's
answers (the release's fine-tuning splits a conversation into one sample per turn; with causal
attention each answer sees the same prefix either way), never their missing EOS.
"""

import torch

from vlmtrain.assets import TOKENIZER_DIR
from vlmtrain.data.conversation import Conversation
from vlmtrain.data.placeholders import CLIP_MEAN, CLIP_STD, ImageLayout
from vlmtrain.data.render import Renderer
from vlmtrain.data.templates import get_template
from vlmtrain.data.token_types import build_position_ids
from vlmtrain.training.loss import IGNORE_INDEX

IMG = "<IMG_CONTEXT>"
LAYOUT = ImageLayout(context=IMG, start="", end="", tokens_per_tile=6, mean=CLIP_MEAN, std=CLIP_STD,
                     image_mode="resize", token_types=True)


def _tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _supervised(tok, r) -> list[str]:
    """The runs of loss-carrying tokens, decoded."""
    runs, cur = [], []
    for i, label in zip(r.input_ids, r.labels):
        if label != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


GOLDEN = {
    # (turns, images) -> (text, supervised runs)
    "single": ([("<image>\nWhat colour is the circle?", "Red.")], 1,
               IMG * 6 + "Question: What colour is the circle? Answer: Red.</s>", [" Red.</s>"]),
    "multi": ([("<image>\nQ1?", "A1."), ("Q2?", "A2.")], 1,
              IMG * 6 + "Question: Q1? Answer: A1.\nQuestion: Q2? Answer: A2.</s>", [" A1.", " A2.</s>"]),
    "caption": ([("Describe this image in detail.", "A cat.")], 1,  # the image with no placeholder goes first
                IMG * 6 + "Question: Describe this image in detail. Answer: A cat.</s>", [" A cat.</s>"]),
    "text_only": ([("Hi", "Hello.")], 0, "Question: Hi Answer: Hello.</s>", [" Hello.</s>"]),
}


def test_cogvlm_chat_goldens():
    tok = _tok()
    renderer = Renderer(tok, LAYOUT)
    template = get_template("cogvlm_chat")
    for name, (turns, n_images, text, supervised) in GOLDEN.items():
        from vlmtrain.data.placeholders import place_media

        conv = Conversation(turns=place_media(turns, n_images, 0), images=[None] * n_images)
        r = renderer.render(conv, template, [1] * n_images)
        assert r.text == text, name
        assert _supervised(tok, r) == supervised, name
        assert tok.decode(r.input_ids) == text, name
        # the prompt (last answer open) ends with "Answer:", the release's generation prompt
        prompt = renderer.render(Conversation(turns=conv.turns[:-1] + [(conv.turns[-1][0], None)],
                                              images=conv.images), template, [1] * n_images)
        assert prompt.text.endswith("Answer:") and text.startswith(prompt.text), name


def test_image_positions_share_one_position_id():
    tok = _tok()
    r = Renderer(tok, LAYOUT).render(Conversation(turns=[("<image>\nQ?", "A.")], images=[None]),
                                     get_template("cogvlm_chat"), [1])
    ids = torch.tensor(r.input_ids)
    tt = (ids == tok.convert_tokens_to_ids(IMG)).long()
    assert tt[:6].tolist() == [1] * 6 and tt[6:].sum() == 0
    pos = build_position_ids(tt.unsqueeze(0))[0].tolist()
    # boi 0, the four patches share 1, eoi 2, then the text counts on from 3
    assert pos[:7] == [0, 1, 1, 1, 1, 2, 3]
    assert pos[6:] == list(range(3, 3 + len(pos) - 6))
