"""Webdataset tar shards written by ``python -m vlmtrain.shard``, read with random access.

A sample is ``{key}.json`` (``{"system", "turns": [[user, answer], ...], "images": [ext, ...],
"videos": [ext, ...], "source": "file:line"}``) plus its media as ``{key}.image0.jpg``,
``{key}.video0.mp4``, ...: the Conversation of any source after its format's conversion (grounding
boxes already in thousandths), with the original media bytes.

``path`` is a shard file, a folder of ``*.tar`` or a brace pattern (``shards/shard-{000000..000009}.tar``).
Shards are indexed once (tar headers only) so sample i of the shards is line i of the source:
the mixture's order, repeat subsets and per-sample randomness are the same as reading the source,
and the StepSampler splits every epoch across nodes, ranks and workers with each sample seen once.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from vlmtrain.data.conversation import Conversation, SampleError
from vlmtrain.data.formats.source import Record, decode_utf8
from vlmtrain.errors import MissingPathError, UserError


def shard_paths(path: str | Path) -> list[Path]:
    """Shard files named by a file, a folder of .tar files or a brace pattern; missing ones raise."""
    p = str(path)
    if "{" in p:
        from braceexpand import braceexpand  # with webdataset; only shard patterns need it

        paths = [Path(x).expanduser() for x in braceexpand(p)]
    elif Path(p).expanduser().is_dir():
        paths = sorted(Path(p).expanduser().glob("*.tar"))
        if not paths:
            raise MissingPathError(f"no *.tar shards in {p}")
    else:
        paths = [Path(p).expanduser()]
    missing = [str(x) for x in paths if not x.is_file()]
    if missing:
        raise MissingPathError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return paths


def claims(path: Path) -> bool:
    p = str(path)
    if p.endswith(".tar") or ("{" in p and ".tar" in p):
        return True
    return Path(p).is_dir() and any(Path(p).glob("*.tar")) and not (Path(p) / "labels").is_dir()


@dataclass
class ShardRecord(Record):
    """One sample of a shard: the (offset, size) of each of its tar members."""

    members: dict = field(default_factory=dict)

    def parse(self) -> dict:
        with open(self.file, "rb") as f:
            def member(name):
                offset, size = self.members[name]
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise SampleError("truncated_shard", f"member .{name} is cut off ({len(data)} of {size} bytes)")
                return data

            if self.error:
                raise SampleError("truncated_shard", self.error)
            if "json" not in self.members:
                raise SampleError("malformed_json", "shard sample has no .json member")
            obj = Record(self.file, self.line, decode_utf8(member("json"), "the .json member")).parse()
            obj["__media__"] = {name: member(name) for name in self.members if name != "json"}
        return obj


def index_shard(path: Path) -> list[ShardRecord]:
    """Samples of one tar in order: members grouped by key (the name up to its first dot)."""
    records: list[ShardRecord] = []
    by_key: dict[str, ShardRecord] = {}
    try:
        tar = tarfile.open(path, "r:")
    except tarfile.TarError as e:
        raise UserError(f"{path}: not a tar shard ({e})") from None
    with tar:
        try:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if key not in by_key:
                    by_key[key] = ShardRecord(str(path), len(records) + 1, "", members={})
                    records.append(by_key[key])
                by_key[key].members[ext] = (m.offset_data, m.size)
            problem = None if _has_end_marker(path) else "it lacks the end-of-archive blocks"
        except tarfile.TarError as e:
            problem = str(e)
    if problem:
        # a shard cut off mid-write: its complete samples stay readable, and the cut is one counted
        # skip (how many samples followed is unknown: the message says where it stops)
        records.append(ShardRecord(str(path), len(records) + 1, "", error=(
            f"the shard is truncated after {len(records)} samples ({problem}): what followed is lost"), members={}))
    return records


def _has_end_marker(path: Path) -> bool:
    """Whether a tar ends as a finished one does: a whole number of 512-byte blocks, the last two
    zero (tarfile reads a file cut inside a header as a shorter archive, silently)."""
    size = path.stat().st_size
    if size % 512 or size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def read(path) -> list[Record]:
    return [r for p in shard_paths(path) for r in index_shard(p)]


def to_conversation(obj: dict, root: Path) -> Conversation:
    media = obj.get("__media__", {})
    turns = obj.get("turns")
    if not isinstance(turns, list) or not all(isinstance(t, list) and len(t) == 2 for t in turns):
        raise SampleError("bad_message", "shard sample needs 'turns' [[user, answer], ...]")

    def blobs(kind: str) -> list[bytes]:
        names = obj.get(f"{kind}s") or []
        missing = [n for n in names if n not in media]
        if missing:
            raise SampleError("missing_media", f"shard sample lacks member .{missing[0]}")
        return [media[n] for n in names]

    return Conversation(
        turns=[(u, a) for u, a in turns], system=obj.get("system"), images=blobs("image"), videos=blobs("video")
    )


def _read_media(src, kind: str) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    try:
        return Path(src).read_bytes()
    except FileNotFoundError:
        raise SampleError("missing_media", f"{kind} not found: {src}") from None


def _suffix(src, default: str) -> str:
    if isinstance(src, (bytes, bytearray)):
        return default
    return Path(src).suffix.lstrip(".").lower() or default


def to_sample(conv: Conversation, key: str, source: str) -> dict:
    """A Conversation as one webdataset sample (a dict of member extension -> bytes)."""
    sample = {"__key__": key}
    names = {"image": [], "video": []}
    for kind, items, default in (("image", conv.images, "jpg"), ("video", conv.videos, "mp4")):
        for i, src in enumerate(items):
            ext = f"{kind}{i}.{_suffix(src, default)}"
            sample[ext] = _read_media(src, kind)
            names[kind].append(ext)
    meta = {"system": conv.system, "turns": [list(t) for t in conv.turns], "images": names["image"],
            "videos": names["video"], "source": source}
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample
