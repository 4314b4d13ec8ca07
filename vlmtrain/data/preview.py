"""One sample as the model will see it: what `vlmtrain preview` prints (``vlmtrain.cli.preview``;
``python -m vlmtrain.preview`` is the same).

    vlmtrain preview data=single data.path=train.jsonl index=3
    vlmtrain preview data=demo index=0 preview.format=json      # one JSON object
    vlmtrain preview data=single data.path=meta.json index=10 preview.eval=true

Text mode prints the rendered text with image-token runs collapsed (``<IMG_CONTEXT>x256x7``: 256
tokens per tile, 7 tiles), the tokens that carry loss between « », the tiles per image or video
frame, and token counts. JSON mode prints ``text`` (image runs expanded), ``input_ids``, ``labels``,
``num_tiles`` and ``supervised`` (the decoded loss-carrying text, one string per assistant turn).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmtrain.config import Choice, choice
from vlmtrain.data.mixture import Skipped, build_mixture
from vlmtrain.errors import UserError
from vlmtrain.training.loss import IGNORE_INDEX

if TYPE_CHECKING:
    PreviewFormat = Choice
else:
    PreviewFormat = choice("PreviewFormat", ["text", "json"], __name__)


@dataclass
class PreviewOptions:
    format: PreviewFormat = PreviewFormat("text")
    """``text`` (for reading) or ``json`` (one object, for scripts)."""
    epoch: int = 0
    """Epoch whose random draws (JPEG quality, video frames) are shown."""
    eval: bool = False
    """Evaluation-time sampling (video frames by the model card's rule, no JPEG re-encoding) instead of
    training's random draws."""


def _runs(values: list) -> list[tuple[Any, int, int]]:
    """(value, start, end) for each run of equal values."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((values[start], start, i))
            start = i
    return out


def supervised_spans(labels: list[int]) -> list[tuple[int, int]]:
    return [(s, e) for v, s, e in _runs([t != IGNORE_INDEX for t in labels]) if v]


def render_json(sample, tokenizer) -> dict:
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    return {
        "text": tokenizer.decode(ids, skip_special_tokens=False),
        "input_ids": ids,
        "labels": labels,
        "num_tiles": list(sample.num_tiles),
        "supervised": [tokenizer.decode(ids[s:e], skip_special_tokens=False) for s, e in supervised_spans(labels)],
    }


def render_text(sample, tokenizer, tokens_per_tile: int, context: str = "<IMG_CONTEXT>") -> str:
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    img = tokenizer.convert_tokens_to_ids(context)
    # segments of (is image context, carries loss): decode each, collapse image runs
    keys = [(t == img, lab != IGNORE_INDEX) for t, lab in zip(ids, labels)]
    parts = []
    for (is_img, loss), s, e in _runs(keys):
        if is_img:
            n = e - s
            parts.append(f"{context}x{tokens_per_tile}x{n // tokens_per_tile}" if n % tokens_per_tile == 0
                         else f"{context}x{n}")
            continue
        text = tokenizer.decode(ids[s:e], skip_special_tokens=False)
        parts.append(f"«{text}»" if loss else text)
    n_sup = sample.num_supervised
    head = [
        f"dataset: {sample.dataset}",
        f"tokens: {len(ids)}   supervised (carry loss): {n_sup}   truncated: {sample.truncated}",
        f"tiles per image/frame: {list(sample.num_tiles)}   total tiles: {sum(sample.num_tiles)}"
        + (f"   pixel_values: {tuple(sample.pixel_values.shape)}" if sample.pixel_values is not None else ""),
        "text (« » marks the tokens that carry loss):",
        "-" * 72,
    ]
    return "\n".join(head) + "\n" + "".join(parts) + "\n" + "-" * 72


def preview(cfg) -> str:
    """Sample ``cfg.index`` of the mixture, rendered as ``cfg.preview`` says (a PreviewOptions)."""
    opts = cfg.preview
    if opts.format not in ("text", "json"):
        raise UserError(f"preview.format must be text or json, got {opts.format!r}")
    dataset, tokenizer = build_mixture(cfg, training=not opts.eval)
    source, line = dataset.locate(cfg.index)
    sample = dataset.load(cfg.index, opts.epoch)
    if isinstance(sample, Skipped):
        raise UserError(f"sample {cfg.index} ({sample.where}) is rejected: {sample.reason}: {sample.message}")
    if opts.format == "json":
        return json.dumps(render_json(sample, tokenizer), ensure_ascii=False)
    layout = dataset.layout
    where = source.records[line].where()
    return (f"sample {cfg.index} of {len(dataset)}   source: {where}\n"
            + render_text(sample, tokenizer, layout.tokens_per_tile, layout.context))
