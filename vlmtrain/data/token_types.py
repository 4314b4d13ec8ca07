"""Token types and position ids of families that route image positions by type (CogVLM): the data
side computes them per sample (``ImageLayout.token_types``), collation and packing carry them, and
the model (``vlmtrain.models.cogvlm``) uses the same functions for generation.

The rules are those of THUDM's released ``modeling_cogvlm.py`` (``build_position_ids``): a position
is VISION where the image context token is; boi and eoi (an image's first and last VISION position)
count as language; all other positions of an image share one position id.
"""

from __future__ import annotations

import torch

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


def build_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The release's rule: boi and eoi count as language, all patches of an image share one id.
    (B, T) -> (B, T) int64. Padding (attention_mask 0) takes no position."""
    tmp = token_type_ids.clone()
    if attention_mask is not None:
        tmp[~attention_mask.bool()] = -1
    boi_eoi = torch.zeros_like(tmp, dtype=torch.bool)
    boi_eoi[:, 1:] |= (tmp[:, 1:] == VISION_TOKEN_TYPE) & (tmp[:, :-1] != VISION_TOKEN_TYPE)
    boi_eoi[:, 0] |= tmp[:, 0] == VISION_TOKEN_TYPE
    boi_eoi[:, :-1] |= (tmp[:, :-1] == VISION_TOKEN_TYPE) & (tmp[:, 1:] != VISION_TOKEN_TYPE)
    boi_eoi[:, -1] |= tmp[:, -1] == VISION_TOKEN_TYPE
    tmp[boi_eoi] = LANGUAGE_TOKEN_TYPE
    step = torch.zeros_like(tmp, dtype=torch.long)
    step[:, 1:] = ((tmp[:, 1:] == LANGUAGE_TOKEN_TYPE)
                   | ((tmp[:, 1:] == VISION_TOKEN_TYPE) & (tmp[:, :-1] == LANGUAGE_TOKEN_TYPE))).long()
    return step.cumsum(-1)


def sample_position_ids(token_type_ids: torch.Tensor, cu_seq_lens: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids that start at 0 in every sample: per packed sample (``cu_seq_lens``) or per row
    from its first attended token (left padding), each by ``build_position_ids``.

    The release counts a left-padded row from 1 (its first real token increments the count); here
    a padded and an unpadded row of the same sample get the same positions."""
    if cu_seq_lens is not None:
        pos = build_position_ids(token_type_ids)
        starts = cu_seq_lens[:-1].long()
        lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
        return pos - torch.repeat_interleave(pos[:, starts], lengths, dim=1)
    pos = build_position_ids(token_type_ids, attention_mask)
    if attention_mask is None:
        return pos
    first = attention_mask.long().argmax(-1, keepdim=True)
    return (pos - pos.gather(1, first)).clamp(min=0) * attention_mask.long()



def sample_token_types(input_ids: torch.Tensor, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_type_ids, position_ids) of one sample's 1-D ``input_ids``."""
    tt = (input_ids == image_token_id).long()
    return tt, build_position_ids(tt.unsqueeze(0))[0]
