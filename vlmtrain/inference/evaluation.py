"""Answer a held-out set in batches and score it: what `vlmtrain eval` runs
(``vlmtrain.cli.eval``; ``python -m vlmtrain.eval`` is the same).

    vlmtrain eval ckpt=outputs/2026-11-21/12-00-00                 # demo held-out split
    vlmtrain eval ckpt=runs/s2/checkpoints/last.ckpt data=demo_val eval.batch_size=16
    vlmtrain eval ckpt=exported/ out=eval_out generation.max_new_tokens=32

Every assistant turn of every line is one question: the turns before it (with their reference
answers) form the history, the model answers the turn's query, and the answer is scored against
the reference by exact match (whitespace-stripped), relaxed match (case, whitespace and
punctuation normalised) and ANLS (average normalised Levenshtein similarity, threshold 0.5), per
dataset and overall. ``predictions.jsonl`` lands beside ``metrics.json`` in ``out`` (default:
``<run or checkpoint dir>/eval``). The data config's ``repeat`` factors are ignored: each line
counts once; a line that cannot be read is skipped and counted.

``eval.group_by=<key>`` also reports the metrics per value of that annotation key (e.g. a
benchmark's ``category``): a string applies to every turn of its line, a list gives one value per
assistant turn (the synthetic shapes data writes ``question_types`` this way); a line without the
key counts under ``(none)``.

    vlmtrain eval ckpt=runs/lp data=demo_val eval.group_by=question_types
"""

from __future__ import annotations

import json
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vlmtrain.config import dataset_config
from vlmtrain.data.conversation import SampleError
from vlmtrain.data.formats import guess_format, reader
from vlmtrain.errors import MissingPathError, UserError
from vlmtrain.inference.engine import GenerationConfig, InferenceEngine, Prompt, resolve_device
from vlmtrain.models.checkpoint import load_trained

log = logging.getLogger("vlmtrain")


@dataclass
class EvalOptions:
    batch_size: int = 8
    """Questions generated together (left-padded)."""
    limit: int | None = None
    """Evaluate only the first N questions of each dataset."""
    anls_threshold: float = 0.5
    group_by: str | None = None
    """An annotation key to break the metrics down by (a string per line, or a list with one
    value per assistant turn)."""


# -- metrics --------------------------------------------------------------------------------------


def relaxed(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(text.split())


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, reference: str, threshold: float = 0.5) -> float:
    """1 - normalised edit distance (case-insensitive, whitespace-collapsed), 0 below the threshold."""
    p, r = " ".join(prediction.lower().split()), " ".join(reference.lower().split())
    if not p and not r:
        return 1.0
    nl = levenshtein(p, r) / max(len(p), len(r))
    return 1.0 - nl if nl < threshold else 0.0


def score(prediction: str, reference: str, threshold: float = 0.5) -> dict[str, float]:
    return {
        "exact_match": float(prediction.strip() == reference.strip()),
        "relaxed_match": float(relaxed(prediction) == relaxed(reference)),
        "anls": anls(prediction, reference, threshold),
    }


def summarise(rows: list[dict]) -> dict[str, float]:
    n = len(rows)
    out: dict[str, float] = {"count": n}
    for k in ("exact_match", "relaxed_match", "anls"):
        out[k] = sum(r[k] for r in rows) / n if n else 0.0
    return out


# -- questions ------------------------------------------------------------------------------------


@dataclass
class Question:
    dataset: str
    where: str
    turn: int
    prompt: Any
    reference: str
    group: str | None = None


NO_GROUP = "(none)"


def group_of(raw, key: str | None, turn: int, where: str) -> str | None:
    """The ``key`` value of a parsed record for assistant turn ``turn`` (see ``EvalOptions.group_by``)."""
    if key is None:
        return None
    value = raw.get(key) if isinstance(raw, dict) else None
    if value is None:
        return NO_GROUP
    if isinstance(value, (list, tuple)):
        if turn >= len(value):
            raise UserError(f"{where}: eval.group_by key {key!r} has {len(value)} values, "
                             f"but the line has more assistant turns")
        value = value[turn]
    return str(value)


def questions(name: str, dcfg, default_system: str | None, limit: int | None, skipped: dict,
              group_by: str | None = None) -> list[Question]:
    path = Path(dcfg.path).expanduser()
    if not path.exists():
        raise MissingPathError(f"data.datasets.{name}.path: {path} does not exist")
    fmt = reader(dcfg.format or guess_format(path))
    root = Path(dcfg.root).expanduser() if dcfg.root else (path if path.is_dir() else path.parent)
    out: list[Question] = []
    for record in fmt.read(path):
        try:
            raw = record.parse()
            conv = fmt.to_conversation(raw, root)
            conv.check()
        except SampleError as e:
            skipped[f"{name}/{e.reason}"] = skipped.get(f"{name}/{e.reason}", 0) + 1
            continue
        system = conv.system if conv.system is not None else (dcfg.system if dcfg.system is not None else default_system)
        images, videos = list(conv.images), list(conv.videos)
        for t, (user, answer) in enumerate(conv.turns):
            history = conv.turns[:t]
            seen = "".join(u + a for u, a in history) + user
            n_img, n_vid = seen.count("<image>"), seen.count("<video>")
            out.append(Question(name, record.where(), t, Prompt(user, images[:n_img], videos[:n_vid], history, system),
                                answer, group_of(raw, group_by, t, record.where())))
            if limit is not None and len(out) >= limit:
                return out
    return out


# -- evaluation -----------------------------------------------------------------------------------


def default_out(ckpt: str) -> Path:
    p = Path(ckpt).expanduser()
    if p.is_file():
        p = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return p / "eval"


def evaluate(cfg: DictConfig) -> dict:
    trained = load_trained(cfg.ckpt, getattr(torch, cfg.dtype) if cfg.dtype else None)
    with open_dict(cfg):
        cfg.model = OmegaConf.to_container(trained.model_cfg, resolve=True)
    data = cfg.data
    if not data.datasets:
        raise UserError("data.datasets is empty: name at least one dataset to evaluate")
    out_dir = Path(cfg.out).expanduser() if cfg.out else default_out(cfg.ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = GenerationConfig(**OmegaConf.to_container(cfg.generation, resolve=True))
    results, skipped = {}, {}
    rows_all = []
    with open(out_dir / "predictions.jsonl", "w") as f:
        for name, dcfg in data.datasets.items():
            dcfg = dataset_config(name, dcfg)
            # video as in validation: the model card's frame rule over max_frames frames
            frames = dcfg.max_frames if dcfg.max_frames is not None else data.max_frames
            engine = InferenceEngine(trained, max_tiles=dcfg.n_max, num_frames=frames,
                                     template=dcfg.template or data.template, system=data.system,
                                     device=resolve_device(cfg.device))
            qs = questions(name, dcfg, None, cfg.eval.limit, skipped, cfg.eval.group_by)
            rows = []
            for start in range(0, len(qs), cfg.eval.batch_size):
                batch = qs[start:start + cfg.eval.batch_size]
                preds = engine.generate([q.prompt for q in batch], gen)
                for q, pred in zip(batch, preds):
                    row = {"dataset": name, "where": q.where, "turn": q.turn, "query": q.prompt.query,
                           "prediction": pred, "reference": q.reference,
                           **score(pred, q.reference, cfg.eval.anls_threshold)}
                    if q.group is not None:
                        row["group"] = q.group
                    rows.append(row)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                log.info("%s: %d/%d answered", name, len(rows), len(qs))
            results[name] = summarise(rows)
            rows_all += rows
    metrics = {"ckpt": str(cfg.ckpt), "datasets": results, "overall": summarise(rows_all), "skipped": skipped}
    if cfg.eval.group_by:
        metrics["group_by"] = cfg.eval.group_by
        metrics["groups"] = summarise_groups(rows_all)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    print(format_table(metrics))
    print(f"predictions: {out_dir / 'predictions.jsonl'}\nmetrics: {out_dir / 'metrics.json'}")
    return metrics


def summarise_groups(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Metrics per ``group`` value, and per prefix before a ``/`` (``one_image/count`` also counts
    under ``one_image``), sorted by name."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        g = r.get("group")
        if g is None:
            continue
        parts = g.split("/")
        for i in range(1, len(parts) + 1):
            groups.setdefault("/".join(parts[:i]), []).append(r)
    return {g: summarise(groups[g]) for g in sorted(groups)}


def format_table(metrics: dict) -> str:
    named = list(metrics["datasets"].items()) + [("overall", metrics["overall"])]
    named += [(f"{metrics['group_by']}={g}", m) for g, m in metrics.get("groups", {}).items()]
    width = max([24] + [len(n) + 2 for n, _ in named])
    lines = [f"{'dataset':<{width}}{'count':>7}{'exact':>9}{'relaxed':>9}{'anls':>9}"]
    for name, m in named:
        lines.append(f"{name:<{width}}{m['count']:>7}{m['exact_match']:>9.3f}{m['relaxed_match']:>9.3f}{m['anls']:>9.3f}")
    if metrics["skipped"]:
        lines.append("skipped lines: " + ", ".join(f"{k}: {v}" for k, v in sorted(metrics["skipped"].items())))
    return "\n".join(lines)
