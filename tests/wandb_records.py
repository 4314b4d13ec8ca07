"""Read an offline W&B run (run-<id>.wandb) without the network: config, history rows, summary.

The file is W&B's transaction log: a 7-byte header (":W&B", magic, version) then LevelDB-log
framing (32 KiB blocks; each chunk has crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle,
4 last) around protobuf ``Record`` messages. wandb 0.31 ships no Python reader, so tests use this.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            yield _record(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield _record(buf + chunk)


def _record(raw: bytes) -> pb.Record:
    r = pb.Record()
    r.ParseFromString(raw)
    return r


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(path: Path, timeout: float = 60.0) -> dict:
    """{"id", "config": {key: value}, "history": [row, ...], "summary": {key: value}}.

    W&B's service writes the file asynchronously, also after ``wandb.finish()`` returns: wait
    until the run's exit record is in it.
    """
    deadline = time.monotonic() + timeout
    while True:
        recs = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out = {"id": None, "config": {}, "history": [], "summary": {}}
    for r in recs:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"] = r.run.run_id
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return out
