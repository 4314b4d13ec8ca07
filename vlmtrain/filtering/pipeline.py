"""One slice of a data config through the rules, and the merge that writes what was kept.

The records of every dataset (as the trainer's readers give them: ``MixtureDataset`` over the
same data config, meta files expanded) are numbered in config order and cut into ``n``
contiguous slices. A slice writes, per dataset, one verdict per record (reasons, scores, the
features corpus rules need) to ``<out>/slices/<i>-of-<n>/``, then ``done.json``. The merge reads
the verdicts of all ``n`` slices in record order, runs the corpus rules (duplicates), and writes
``<out>/<dataset>/kept.jsonl``, ``rejected.jsonl`` (and ``review.jsonl``), a data config and a meta
file for the kept data, ``summary.json`` and ``report.md``. One process is slice 0 of 1 followed by
the merge, so n slices and one process write the same files, byte for byte.

A record is first loaded as training would load it (``MixtureDataset.load_line``, headers only):
one that training would skip (malformed JSON, missing media, placeholder mismatch, too long...)
is rejected as ``unreadable`` with the reader's reason. Then every rule looks at it; LLM rules look
only at records nothing else rejected (``filter.score_rejected=true``: at all of them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tarfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf, open_dict

from vlmtrain.data.conversation import SampleError
from vlmtrain.errors import MissingPathError, UserError
from vlmtrain.filtering.records import UNREADABLE, source_object
from vlmtrain.filtering.rules import Sample

log = logging.getLogger(__name__)

# -- configuration --------------------------------------------------------------------------------


def parse_slice(value) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> (i, n); None -> (0, 1)."""
    if value is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(value).split("/"))
    except ValueError:
        raise UserError(f"filter.slice must be i/n (e.g. 0/8), got {value!r}") from None
    if not 0 <= i < n:
        raise UserError(f"filter.slice={value}: need 0 <= i < n")
    return i, n


def build_rules(filter_cfg) -> list:
    """Each entry of ``filter.rules`` built from its ``_target_``, named by its key (null entries
    are switched off)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    rules = []
    for name, spec in (filter_cfg.rules or {}).items():
        if spec is None:
            continue
        if "_target_" not in spec:
            raise UserError(f"filter.rules.{name} has no _target_ (a rule class, e.g. "
                             "vlmtrain.filtering.rules.NgramRepetition)")
        try:
            rules.append(instantiate(spec, name=name, _convert_="all"))
        except (InstantiationException, ValueError, TypeError) as e:  # a rule's own check
            cause = e.__cause__ or e
            raise UserError(f"filter.rules.{name}: {str(cause).splitlines()[0]}") from None
    return rules


def build_scorer(filter_cfg):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if filter_cfg.scorer is None:
        raise UserError("an LLM rule is configured but filter.scorer is not: use filter=llm")
    try:
        return instantiate(filter_cfg.scorer, _convert_="all")
    except (InstantiationException, ValueError, TypeError) as e:  # the Scorer's own checks
        cause = e.__cause__ or e
        if isinstance(cause, FileNotFoundError):
            raise MissingPathError(str(cause)) from None
        raise UserError(f"filter.scorer: {str(cause).splitlines()[0]}") from None


def fingerprint(cfg, mixture) -> str:
    """What the verdicts depend on: the data and filter configs and the data files' sizes and
    times. Slices with another fingerprint are never merged together."""
    filt = cast(dict, OmegaConf.to_container(cfg.filter, resolve=True))
    for k in ("slice", "merge", "progress", "examples"):
        filt.pop(k, None)
    stats = []
    for s in mixture.sources:
        p = Path(s.cfg.path).expanduser()
        if p.is_file():
            stats.append([str(p), p.stat().st_size, p.stat().st_mtime_ns])
        else:
            stats.append([str(p), len(s.records)])
    data = cast(dict, OmegaConf.to_container(cfg.data, resolve=True))
    for k in ("num_workers", "persistent_workers", "prefetch_factor", "micro_batch_size", "collate", "balance_ranks"):
        data.pop(k, None)
    blob = json.dumps([data, filt, stats, OmegaConf.to_container(cfg.model, resolve=True)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_data(cfg):
    from vlmtrain.data.mixture import build_mixture

    with open_dict(cfg):
        cfg.data.on_error = "skip"  # the filter records bad lines; it never stops at one
    mixture, _ = build_mixture(cfg, training=False)
    return mixture


def slice_dir(out: Path, i: int, n: int) -> Path:
    return out / "slices" / f"{i}-of-{n}"


# -- one slice ------------------------------------------------------------------------------------


def examine(mixture, source, j: int, rules) -> tuple[dict, Sample | None]:
    """The verdict of record ``j`` of ``source`` under the sample and corpus rules, and its Sample
    (None when it cannot be read)."""
    from vlmtrain.data.mixture import Skipped

    record = source.records[j]
    v: dict[str, Any] = {"i": j, "reasons": [], "metrics": {}}
    loaded = mixture.load_line(source, j, random.Random(f"filter:{source.name}:{j}"), pixels=False)
    if isinstance(loaded, Skipped):
        v["reasons"].append({"rule": UNREADABLE, "reason": loaded.reason, "message": loaded.message[:300]})
    try:
        obj = record.parse()
        conv = source.reader.to_conversation(obj, source.root)
    except SampleError:
        return v, None
    sample = Sample(source.name, j, record.where(), obj, conv)
    for rule in rules:
        if rule.kind == "batch" or rule.exempts(source.name):
            continue
        if rule.kind == "corpus":
            feats = rule.features(sample)
            if feats is not None:
                v.setdefault("features", {})[rule.name] = feats
            continue
        record_finding(v, rule.name, rule.check(sample))
    return v, sample


def record_finding(v: dict, rule: str, f) -> None:
    """Put a rule's Finding (or None: it did not apply) into a verdict."""
    if f is None:
        return
    if f.score is not None:
        v["metrics"][rule] = round(float(f.score), 4)
    if f.group:
        v.setdefault("groups", {})[rule] = f.group
    if f.review:
        v.setdefault("review", []).append({"rule": rule, "reply": f.review})
    if f.fired:
        v["reasons"].append(f.reason(rule))


def _counts_line(counts: Counter, width: int = 6) -> str:
    return ", ".join(f"{k}={c}" for k, c in counts.most_common(width))


def run_slice(cfg, out: Path, i: int, n: int, chunk: int = 256) -> dict:
    from tqdm import tqdm

    mixture = build_data(cfg)
    rules = build_rules(cfg.filter)
    batch_rules = [r for r in rules if r.kind == "batch"]
    scorer = build_scorer(cfg.filter) if batch_rules else None
    fp = fingerprint(cfg, mixture)
    folder = slice_dir(out, i, n)
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "verdicts").mkdir(parents=True)
    if scorer is not None:
        scorer.open_cache(out / "llm_cache", f"{i}-of-{n}")
    units = [(k, j) for k, s in enumerate(mixture.sources) for j in range(len(s.records))]
    lo, hi = i * len(units) // n, (i + 1) * len(units) // n
    counts, kept = Counter(), 0
    files = {}
    bar = tqdm(total=hi - lo, desc=f"filter {i}/{n}", unit="sample", disable=not cfg.filter.progress,
               mininterval=0.5 if sys.stderr.isatty() else 10, file=sys.stderr)
    try:
        for start in range(lo, hi, chunk):
            rows = []
            for k, j in units[start:min(hi, start + chunk)]:
                source = mixture.sources[k]
                v, sample = examine(mixture, source, j, rules)
                rows.append((k, v, sample))
            for rule in batch_rules:
                todo = [(v, s) for _, v, s in rows if s is not None and not rule.exempts(s.dataset)
                        and (cfg.filter.score_rejected or not v["reasons"])]
                for (v, _), f in zip(todo, rule.check_batch([s for _, s in todo], scorer)):
                    record_finding(v, rule.name, f)
            for k, v, _ in rows:
                if k not in files:
                    files[k] = open(folder / "verdicts" / f"{k:05d}.jsonl", "w", encoding="utf-8")
                files[k].write(json.dumps(v, ensure_ascii=False, sort_keys=True) + "\n")
                for r in v["reasons"]:
                    counts[r["rule"] if r["rule"] != UNREADABLE else f"{UNREADABLE}/{r['reason']}"] += 1
                for r in v.get("review", []):  # LLM replies with no score
                    counts[f"{r['rule']}/unparseable"] += 1
                kept += not v["reasons"]
            bar.update(len(rows))
            bar.set_postfix_str(f"rejected {bar.n - kept}: {_counts_line(counts)}", refresh=False)
    finally:
        bar.close()
        for f in files.values():
            f.close()
    done = {"fingerprint": fp, "slice": i, "slices": n, "records": hi - lo, "kept_before_corpus_rules": kept,
            "counts": dict(sorted(counts.items()))}
    if scorer is not None:
        done["llm"] = {"generated": scorer.generated, "cached": scorer.cached, "tiny_model": scorer.tiny,
                       "model": str(scorer.path)}
    tmp = folder / "done.json.tmp"
    tmp.write_text(json.dumps(done, indent=1) + "\n")
    os.replace(tmp, folder / "done.json")  # atomic: another slice may be reading it to decide who merges
    print(f"slice {i}/{n}: {hi - lo} records, {hi - lo - kept} rejected before the corpus rules"
          + (f" ({_counts_line(counts, 99)})" if counts else "")
          + (f"; LLM replies generated {scorer.generated}, from cache {scorer.cached}" if scorer else ""))
    return done


# -- the merge ------------------------------------------------------------------------------------


def slices_done(out: Path, n: int, fp: str) -> list[int]:
    """The slices of n whose done.json carries fingerprint ``fp``."""
    done = []
    for i in range(n):
        f = slice_dir(out, i, n) / "done.json"
        try:
            if json.loads(f.read_text()).get("fingerprint") == fp:
                done.append(i)
        except (OSError, json.JSONDecodeError):
            continue
    return done


def read_verdicts(out: Path, n: int, k: int, count: int, name: str) -> list[dict]:
    rows = []
    for i in range(n):
        f = slice_dir(out, i, n) / "verdicts" / f"{k:05d}.jsonl"
        if f.is_file():
            rows += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
    rows.sort(key=lambda v: v["i"])
    if [v["i"] for v in rows] != list(range(count)):
        raise UserError(f"{out}/slices: the verdicts of dataset {name} do not cover its {count} records once "
                         "each (slices of another run?): re-run the slices")
    return rows


class LinesOutput:
    """jsonl / json-list sources: kept.jsonl is trainable as it is (every line reader reads jsonl),
    with the source's format and its media root."""

    def __init__(self, source, folder: Path):
        self.source, self.folder = source, folder
        self.kept = open(folder / "kept.jsonl", "w", encoding="utf-8")

    def keep(self, record, obj) -> None:
        self.kept.write(record.text.rstrip("\n") + "\n")

    def close(self) -> dict:
        self.kept.close()
        return {"path": str(self.folder / "kept.jsonl"), "format": self.source.format,
                "root": str(Path(self.source.root).expanduser().resolve())}


class CogvlmOutput(LinesOutput):
    """A CogVLM-SFT folder: ``kept/labels/`` holds copies of the kept label files, ``kept/images``
    links to the source's images folder; kept.jsonl lists the kept labels' objects."""

    def __init__(self, source, folder: Path):
        super().__init__(source, folder)
        self.dir = folder / "kept"
        (self.dir / "labels").mkdir(parents=True)
        (self.dir / "images").symlink_to((Path(source.root).expanduser() / "images").resolve(), target_is_directory=True)

    def keep(self, record, obj) -> None:
        self.kept.write(json.dumps(obj, ensure_ascii=False) + "\n")
        shutil.copyfile(record.file, self.dir / "labels" / Path(record.file).name)

    def close(self) -> dict:
        self.kept.close()
        return {"path": str(self.dir), "format": "cogvlm"}


class ShardsOutput(LinesOutput):
    """Webdataset shards: ``kept/<shard name>`` holds the kept samples' tar members, byte for byte
    and under their names, one output shard per input shard; kept.jsonl lists their json members."""

    def __init__(self, source, folder: Path):
        super().__init__(source, folder)
        self.dir = folder / "kept"
        self.dir.mkdir()
        self.tars: dict[str, tuple] = {}

    def _tar(self, shard: str):
        if shard not in self.tars:
            with tarfile.open(shard, "r:") as t:
                names = {m.offset_data: m.name for m in t if m.isfile()}
            self.tars[shard] = (tarfile.open(self.dir / Path(shard).name, "w", format=tarfile.USTAR_FORMAT), names)
        return self.tars[shard]

    def keep(self, record, obj) -> None:
        import io

        self.kept.write(json.dumps(obj, ensure_ascii=False) + "\n")
        tar, names = self._tar(record.file)
        with open(record.file, "rb") as f:
            for offset, size in sorted(record.members.values()):
                f.seek(offset)
                info = tarfile.TarInfo(names[offset])
                info.size, info.mtime, info.mode = size, 0, 0o644
                tar.addfile(info, io.BytesIO(f.read(size)))

    def close(self) -> dict:
        self.kept.close()
        for tar, _ in self.tars.values():
            tar.close()
        return {"path": str(self.dir), "format": "wds"}


OUTPUTS = {"cogvlm": CogvlmOutput, "wds": ShardsOutput}
"""Formats that are not lines of one file; every other format is written by LinesOutput."""


def dataset_entry(source, data_cfg_raw: dict, written: dict) -> dict:
    """The data-config entry of the kept data: the source's settings (n_max, repeat, augmentation,
    template, system, frames) with its new path, format and root."""
    entry = {k: v for k, v in asdict(source.cfg).items() if v is not None}
    entry.pop("root", None)
    entry.update(written)
    # data-level settings that a filtered config would otherwise lose (it names datasets only)
    if entry.get("system") is None and data_cfg_raw.get("system") is not None:
        entry["system"] = data_cfg_raw["system"]
    template = data_cfg_raw.get("template")
    if entry.get("template") is None and isinstance(template, str) and "${" not in template:
        entry["template"] = template
    return entry


def meta_entry(entry: dict, kept: int) -> dict:
    """The same as an InternVL meta-file entry (templates and system prompts have no meta key)."""
    m = {"root": entry.get("root", ""), "annotation": entry["path"], "repeat_time": entry.get("repeat", 1.0),
         "max_dynamic_patch": entry.get("n_max", 6), "min_dynamic_patch": entry.get("min_tiles", 1), "length": kept}
    if not m["root"]:
        m.pop("root")
    for key, meta_key in (("jpeg_augment", "data_augment"), ("min_frames", "min_num_frame"),
                          ("max_frames", "max_num_frame")):
        if entry.get(key) is not None:
            m[meta_key] = entry[key]
    return m


def merge(cfg, out: Path, n: int) -> dict:
    from vlmtrain.filtering.report import write_report

    mixture = build_data(cfg)
    rules = build_rules(cfg.filter)
    fp = fingerprint(cfg, mixture)
    done = slices_done(out, n, fp)
    missing = sorted(set(range(n)) - set(done))
    if missing:
        raise UserError(f"{out}/slices: slice(s) {', '.join(f'{i}/{n}' for i in missing[:8])} not done with this "
                         "config: run them (filter.slice=i/n) before merging")
    slice_info = [json.loads((slice_dir(out, i, n) / "done.json").read_text()) for i in range(n)]
    verdicts = [read_verdicts(out, n, k, len(s.records), s.name) for k, s in enumerate(mixture.sources)]
    for rule in (r for r in rules if r.kind == "corpus"):
        items = ((s.name, v["i"], s.records[v["i"]].where(), v.get("features", {}).get(rule.name))
                 for s, vs in zip(mixture.sources, verdicts) for v in vs if not v["reasons"] and not rule.exempts(s.name))
        for (name, j), f in rule.decide(items).items():
            k = next(k for k, s in enumerate(mixture.sources) if s.name == name)
            verdicts[k][j]["reasons"].append(f.reason(rule.name))
    data_raw = OmegaConf.to_container(cfg.data, resolve=False)
    entries, meta, stats = {}, {}, []
    for source, vs in zip(mixture.sources, verdicts):
        folder = out / source.name
        folder.mkdir(parents=True, exist_ok=True)
        for old in ("kept.jsonl", "rejected.jsonl", "review.jsonl"):
            (folder / old).unlink(missing_ok=True)
        if (folder / "kept").is_symlink() or (folder / "kept").is_file():
            (folder / "kept").unlink()
        elif (folder / "kept").is_dir():
            shutil.rmtree(folder / "kept")
        writer = OUTPUTS.get(source.format, LinesOutput)(source, folder)
        rejected, review, n_kept = [], [], 0
        for v in vs:
            record = source.records[v["i"]]
            obj = source_object(record)
            if v["reasons"]:
                rejected.append({"line": record.line, "source": record.file, "sample": obj, "reasons": v["reasons"]})
            else:
                writer.keep(record, obj)
                n_kept += 1
            for r in v.get("review", []):
                review.append({"line": record.line, "source": record.file, **r})
        written = writer.close()
        _write_jsonl(folder / "rejected.jsonl", rejected)
        if review:
            _write_jsonl(folder / "review.jsonl", review)
        stats.append({"dataset": source.name, "format": source.format, "records": len(vs), "kept": n_kept,
                      "folder": str(folder)})
        if n_kept:
            entries[source.name] = dataset_entry(source, data_raw, written)
            meta[source.name] = meta_entry(entries[source.name], n_kept)
        else:
            log.warning("%s: every record was rejected; the kept data config leaves it out", source.name)
    if not entries:
        raise UserError(f"no record of any dataset was kept (see {out}/*/rejected.jsonl): no data config written")
    conf = out / "data" / "filtered.yaml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f"# Kept data written by `python -m vlmtrain.filter`: "
                    f"`python -m vlmtrain hydra.searchpath=[file://{out.resolve()}] data=filtered`\n"
                    + OmegaConf.to_yaml({"datasets": entries}))
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    summary = write_report(out, cfg, mixture, verdicts, stats, slice_info, rules)
    print(f"kept {summary['kept']} of {summary['records']} records; data config: {conf}; report: {out / 'report.md'}")
    return summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# -- the command ----------------------------------------------------------------------------------


def run(cfg) -> dict | None:
    """``python -m vlmtrain.filter``: a slice (``filter.slice=i/n``, default all: 0/1), then the
    merge when every slice of n is done (``filter.merge``: ``auto``; ``only``: just merge;
    ``never``)."""
    if OmegaConf.is_missing(cfg, "out"):
        raise UserError("out is not set: out=DIR names the folder for the kept and rejected data")
    out = Path(cfg.out).expanduser()
    i, n = parse_slice(cfg.filter.slice)
    mode = cfg.filter.merge
    if mode not in ("auto", "only", "never"):
        raise UserError(f"filter.merge must be auto, only or never, got {mode!r}")
    if mode == "only":
        return merge(cfg, out, n)
    done = run_slice(cfg, out, i, n)
    if mode == "never" or len(slices_done(out, n, done["fingerprint"])) < n:
        return None
    lock = out / "slices" / f"merge-{n}.lock"
    try:
        os.mkdir(lock)  # the last slice to finish merges; a slice finishing at the same moment leaves it
    except FileExistsError:
        print(f"another process is merging ({lock} exists)")
        return None
    try:
        return merge(cfg, out, n)
    finally:
        os.rmdir(lock)
