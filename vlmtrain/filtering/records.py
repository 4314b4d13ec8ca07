"""What the filter writes about a source record: its source object, and the rule name of a
record that training would skip."""

from __future__ import annotations

import json

from vlmtrain.data.conversation import SampleError

UNREADABLE = "unreadable"
"""The rule of a record that training would skip; the reason's ``reason`` key holds the reader's."""


def source_object(record):
    """The record's source object as the file holds it (a jsonl line's or json element's object, a
    label file's, a shard sample's json), or its raw text when it is not valid JSON."""
    if record.text:
        try:
            return json.loads(record.text)
        except json.JSONDecodeError:
            return record.text.rstrip("\r\n")
    try:
        return {k: v for k, v in record.parse().items() if not k.startswith("__")}  # the readers' own keys
    except SampleError:
        return None
