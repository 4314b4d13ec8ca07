"""InternVL meta files: a JSON object name -> {root, annotation, data_augment, repeat_time,
max_dynamic_patch, length}, one entry per dataset of the mixture.

Pointing a dataset of the data config at a meta file (``format: meta``, or guessed) trains every
entry with its own settings: ``max_dynamic_patch`` -> ``n_max``, ``repeat_time`` -> ``repeat``,
``data_augment`` -> ``jpeg_augment``, ``root`` -> ``root``, ``annotation`` -> ``path``. Keys an
entry lacks come from the data config's entry (its ``n_max``, ``template``, ``system``, ...).
Relative paths are taken from the meta file's folder when they exist there, else from the
working directory (where InternVL's own scripts run).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

from vlmtrain.config import DatasetConfig
from vlmtrain.errors import MissingPathError, UserError

log = logging.getLogger(__name__)

KEYS = {"root", "annotation", "data_augment", "repeat_time", "max_dynamic_patch", "min_dynamic_patch",
        "length", "max_num_frame", "min_num_frame"}


def is_meta_file(path) -> bool:
    p = Path(path)
    if not p.is_file() or p.suffix != ".json":
        return False
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    # a JSON object of objects is no line format's file: a meta file, and expand_meta names what is
    # wrong with its entries (a missing annotation, an unknown key) instead of "cannot guess the format"
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, dict) for v in obj.values())


def _resolve(base: Path, p: str) -> str:
    q = Path(p).expanduser()
    if q.is_absolute():
        return str(q)
    return str(base / q) if (base / q).exists() else str(q)


def expand_meta(name: str, cfg: DatasetConfig) -> dict[str, DatasetConfig]:
    """The datasets of a meta file as DatasetConfigs named ``{name}/{entry}``."""
    path = Path(cfg.path).expanduser()
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingPathError(f"data.datasets.{name}.path: meta file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON in meta file: {e.msg}") from None
    if not isinstance(meta, dict) or not meta:
        raise UserError(f"{path}: a meta file is a JSON object name -> {{root, annotation, ...}}")
    out = {}
    for entry, spec in meta.items():
        where = f"{path}: entry {entry!r}"
        if not isinstance(spec, dict) or not isinstance(spec.get("annotation"), str):
            raise UserError(f"{where}: needs an 'annotation' path")
        unknown = set(spec) - KEYS
        if unknown:
            raise UserError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(KEYS)}")
        d = replace(cfg, path=_resolve(path.parent, spec["annotation"]), format=None)
        if spec.get("root") is not None:
            d.root = _resolve(path.parent, spec["root"])
        if "max_dynamic_patch" in spec:
            d.n_max = _positive_int(where, spec, "max_dynamic_patch")
        if "min_dynamic_patch" in spec:
            d.min_tiles = _positive_int(where, spec, "min_dynamic_patch")
        if "repeat_time" in spec:
            r = spec["repeat_time"]
            if not isinstance(r, (int, float)) or isinstance(r, bool) or not (math.isfinite(r) and r > 0):
                raise UserError(f"{where}: 'repeat_time' must be a finite number > 0, got {r!r}")
            d.repeat = float(r)
        if "min_num_frame" in spec:
            d.min_frames = _positive_int(where, spec, "min_num_frame")
        if "max_num_frame" in spec:
            d.max_frames = _positive_int(where, spec, "max_num_frame")
        if "data_augment" in spec:
            d.jpeg_augment = bool(spec["data_augment"])
        if "length" in spec:
            _check_length(where, spec["length"], Path(d.path))
        out[f"{name}/{entry}"] = d
    return out


def _positive_int(where: str, spec: dict, key: str) -> int:
    """An integer >= 1 (``max_dynamic_patch: 0`` used to train as one tile, silently)."""
    v = spec[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UserError(f"{where}: '{key}' must be an integer >= 1, got {v!r}")
    return v


def _check_length(where: str, length, annotation: Path) -> None:
    """InternVL's ``length`` is informative (it sizes nothing): a count that disagrees with the
    jsonl annotation means a stale meta file, so say so; training uses the lines the file has."""
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise UserError(f"{where}: 'length' must be a non-negative integer, got {length!r}")
    if annotation.suffix != ".jsonl" or not annotation.is_file():
        return
    with open(annotation, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    if lines != length:
        log.warning("%s: 'length' is %d but %s has %d lines; training uses the %d lines", where, length,
                    annotation, lines, lines)
