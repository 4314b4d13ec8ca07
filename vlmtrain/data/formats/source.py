"""Raw records of one annotation source, kept as text until a sample is asked for."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlmtrain.data.conversation import SampleError
from vlmtrain.errors import MissingPathError, UserError


@dataclass
class Record:
    """One annotation line: where it came from and its JSON text (parsed lazily)."""

    file: str
    line: int
    text: str | None
    error: str | None = None
    """Why the line could not even be read as text (then ``text`` is None): parsing it raises a
    counted ``bad_encoding`` skip, so one bad byte costs one line, never the dataset."""

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def parse(self) -> dict:
        if self.text is None:
            raise SampleError("bad_encoding", self.error or "unreadable line")
        try:
            obj = json.loads(self.text)
        except json.JSONDecodeError as e:
            raise SampleError("malformed_json", f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise SampleError("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
        return obj


def read_json_records(path: Path) -> list[Record]:
    """Lines of a .jsonl file, or the elements of a .json list (line = element index + 1)."""
    if not path.exists():
        raise MissingPathError(f"annotation file not found: {path}")
    if path.suffix == ".json":
        data = path.read_bytes()
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:  # one JSON document: no line of it can be skipped alone
            line = data.count(b"\n", 0, e.start) + 1
            raise UserError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON list of samples")
        return [Record(str(path), i + 1, json.dumps(item, ensure_ascii=False)) for i, item in enumerate(items)]
    records = []
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                records.append(Record(str(path), i, None, f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"))
                continue
            if line.strip():  # type: ignore[attr-defined]  # stubs narrower than the code's use
                records.append(Record(str(path), i, line))
    return records


def decode_utf8(data: bytes, what: str) -> str:
    """``data`` as text; not UTF-8 is a counted ``bad_encoding`` skip of the sample it belongs to."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError("bad_encoding", f"{what} is not UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None


def first_object(path: Path):
    """The first JSON object of a .jsonl file, or the first element (or the object) of a .json file;
    None when there is none. Used to guess a file's format."""
    path = Path(path)
    if not path.is_file() or path.suffix not in (".json", ".jsonl"):
        return None
    try:
        if path.suffix == ".jsonl":  # a bad byte is that line's problem, not the guess's
            with path.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.strip():
                        return json.loads(line)
            return None
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(obj, list):
        return obj[0] if obj else None
    return obj
