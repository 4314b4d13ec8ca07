"""Fuzz: a few dozen malformed lines of every format, mixed into good ones, through the real loader
(the training run, a loader worker, on_error=skip): every bad line is counted under its reason, and
the run trains on all the rest (issue 17, finding 4)."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from io import BytesIO

import pytest
from omegaconf import open_dict
from PIL import Image

from conftest import compose_config
from vlmtrain.training.run import train

Q, A = "<image>\nWhat colour is it?", "red"


def conv(q=Q, a=A):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


# (line, reason) for the line formats; a line is a JSON-able object, or raw bytes/str written as is
INTERNVL_BAD = [
    (b"{not json", "malformed_json"), (b"[1, 2]", "malformed_json"), (b'"a string"', "malformed_json"),
    (b"null", "malformed_json"), (b'{"conversations": "\xff\xfe"}', "bad_encoding"),
    ({"image": "a.png"}, "no_turns"), ({"image": "a.png", "conversations": "hello"}, "no_turns"),
    ({"image": "a.png", "conversations": ["hello", "there"]}, "bad_message"),
    ({"image": "a.png", "conversations": [{"from": ["human"], "value": Q}, {"from": "gpt", "value": A}]}, "bad_message"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": A}]}, "bad_message"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": ""}]}, "empty_answer"),
    ({"image": 7, "conversations": conv()}, "bad_media"), ({"image": ["a.png", 3], "conversations": conv()}, "bad_media"),
    ({"image": "nope.png", "conversations": conv()}, "missing_media"),
    ({"image": "notes.txt", "conversations": conv()}, "corrupt_media"),
    ({"image": "a.png", "conversations": conv("<image><image> two?")}, "placeholder_mismatch"),
    ({"image": "a.png", "conversations": conv(a="<box>[[true, 2, 3, 4]]</box>")}, "bad_bbox"),
    ({"image": "a.png", "conversations": conv(a="<box>[[0, 0, 2000, 10]]</box>")}, "bad_bbox"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no_turns"),
]
SWIFT_BAD = [
    (b"{not json", "malformed_json"), (b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', "bad_encoding"),
    ({"messages": "hello"}, "bad_message"), ({"messages": ["hello"]}, "bad_message"),
    ({"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "a"}]}, "bad_message"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "bad_message"),
    ({"messages": [{"role": "user", "content": "q"}]}, "bad_message"),
    ({"query": 5, "response": "a"}, "bad_message"), ({"query": "q", "response": "a", "history": 5}, "bad_message"),
    ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}], "images": 3}, "bad_media"),
    ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}], "images": ["nope.png"]}, "missing_media"),
    ({"messages": [{"role": "user", "content": "<image><ref-object>"}, {"role": "assistant", "content": "<bbox>"}],
      "images": ["a.png"], "objects": {"ref": ["x"], "bbox": [[True, 2, 3, 4]]}}, "bad_bbox"),
    ({"messages": [{"role": "user", "content": "<image><ref-object>"}, {"role": "assistant", "content": "<bbox>"}],
      "images": ["a.png"], "objects": {"ref": ["x"], "bbox": [[0, 0, 500, 10]]}}, "bad_bbox"),  # a.png is 64 wide
]


def image(path, size=(64, 48), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


def write_lines(path, good, bad):
    with open(path, "wb") as f:
        for line in [*good, *(b for b, _ in bad)]:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")


def tar_member(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, BytesIO(data))


def build(tmp_path):
    """Every format's folder; returns ({name: dataset entry}, expected skips, number of good samples)."""
    root = tmp_path / "data"
    root.mkdir()
    png = BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(png, format="PNG")
    image(root / "a.png")
    (root / "notes.txt").write_text("not an image")
    expected, good, datasets = Counter(), 0, {}

    good_internvl = [{"image": "a.png", "conversations": conv()}] * 3
    write_lines(root / "internvl.jsonl", good_internvl, INTERNVL_BAD)
    datasets["internvl"] = {"path": str(root / "internvl.jsonl"), "format": "internvl"}
    expected.update(r for _, r in INTERNVL_BAD)
    good += 3

    good_swift = [{"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
                   "images": ["a.png"]}] * 3
    write_lines(root / "swift.jsonl", good_swift, SWIFT_BAD)
    datasets["swift"] = {"path": str(root / "swift.jsonl"), "format": "swift"}
    expected.update(r for _, r in SWIFT_BAD)
    good += 3

    # llava: one JSON list; its bad elements are the JSON-able ones of the InternVL cases
    llava_bad = [(b, r) for b, r in INTERNVL_BAD if not isinstance(b, bytes)] + [(5, "malformed_json"), ("x", "malformed_json")]
    (root / "llava.json").write_text(json.dumps([*good_internvl, *(b for b, _ in llava_bad)]))
    datasets["llava"] = {"path": str(root / "llava.json"), "format": "llava"}
    expected.update(r for _, r in llava_bad)
    good += 3

    cog = tmp_path / "cogvlm"
    (cog / "labels").mkdir(parents=True)
    (cog / "images").mkdir()
    labels = {"000": {"captions": [{"role": "caption", "content": "a red square"}]},
              "001": {"conversations": [{"role": "user", "content": "colour?"}, {"role": "assistant", "content": "red"}]},
              "002": b'{"captions": [{"role": "caption", "content": "caf\xe9"}]}',  # latin-1
              "003": b"{broken", "004": {"captions": "nope"}, "005": {"captions": [{"role": "caption", "content": 5}]},
              "006": {"captions": [{"role": "caption", "content": "no image for me"}]}}
    for stem, label in labels.items():
        (cog / "labels" / f"{stem}.json").write_bytes(label if isinstance(label, bytes) else json.dumps(label).encode())
        if stem != "006":
            image(cog / "images" / f"{stem}.png")
    datasets["cogvlm"] = {"path": str(cog), "format": "cogvlm"}
    expected.update(["bad_encoding", "malformed_json", "bad_message", "bad_message", "missing_media"])
    good += 2

    shards = tmp_path / "shards"
    shards.mkdir()
    ok = json.dumps({"turns": [["<image>\ncolour?", "red"]], "images": ["image0.png"]}).encode()
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        for key, members in [("000000000", {"json": ok, "image0.png": png.getvalue()}),
                             ("000000001", {"json": ok, "image0.png": png.getvalue()}),
                             ("000000002", {"json": b'{"turns": [["\xff", "a"]]}'}),             # bad_encoding
                             ("000000003", {"image0.png": png.getvalue()}),                    # no json: malformed_json
                             ("000000004", {"json": json.dumps({"turns": "x"}).encode()}),       # bad_message
                             ("000000005", {"json": json.dumps({"turns": [[5, "a"]]}).encode()}),  # bad_message
                             ("000000006", {"json": ok}),                                      # missing_media
                             ("000000007", {"json": ok, "image0.png": b"garbage"})]:           # corrupt_media
            for ext, data in members.items():
                tar_member(tar, f"{key}.{ext}", data)
    with tarfile.open(shards / "shard-000001.tar", "w") as tar:
        for key in ("000000008", "000000009"):
            tar_member(tar, f"{key}.json", ok)
            tar_member(tar, f"{key}.image0.png", png.getvalue())
    # cut off inside the header of its second sample (tarfile alone reads that as a shorter archive):
    # the first sample stays, the cut counts once
    whole = (shards / "shard-000001.tar").read_bytes()
    with tarfile.open(shards / "shard-000001.tar") as tar:
        third = tar.getmembers()[2].offset
    (shards / "shard-000001.tar").write_bytes(whole[:third + 100])
    datasets["wds"] = {"path": str(shards), "format": "wds"}
    expected.update(["bad_encoding", "malformed_json", "bad_message", "bad_message", "missing_media", "corrupt_media",
                     "truncated_shard"])
    good += 3  # two in the first shard, one before the cut
    return datasets, expected, good


def test_fuzzed_lines_of_every_format_are_counted_and_the_rest_trains(tmp_path):
    datasets, expected, good = build(tmp_path)
    total = good + sum(expected.values())
    cfg = compose_config(["stage.global_batch_size=1", "data.micro_batch_size=1", "data.num_workers=1",
                          "stage.max_epochs=1", "stage.warmup_steps=0", "trainer.enable_progress_bar=false",
                          "trainer.log_every_n_steps=50"], run_dir=tmp_path / "run")
    with open_dict(cfg):
        cfg.data.datasets = {name: {**d, "n_max": 1} for name, d in datasets.items()}
    run_dir = train(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped"] == dict(expected), (summary["skipped"], dict(expected))
    assert summary["samples"] == good and summary["global_step"] == good
    assert sum(summary["skipped"].values()) + summary["samples"] == total


def test_raise_mode_names_file_and_line_and_the_shard_tool_counts_too(tmp_path):
    from vlmtrain.data.mixture import build_mixture
    from vlmtrain.data.shard import write_shards
    from vlmtrain.errors import UserError

    datasets, _, _ = build(tmp_path)
    path = datasets["internvl"]["path"]
    cfg = compose_config(["data=single", f"data.path={path}", "data.on_error=raise"])
    ds, _ = build_mixture(cfg)
    bad_line = 3 + 1 + next(i for i, (_, r) in enumerate(INTERNVL_BAD) if r == "bad_encoding")
    with pytest.raises(UserError, match=rf"internvl.jsonl:{bad_line}: not UTF-8"):
        for i in range(len(ds)):
            try:
                ds.load(i)
            except UserError as e:
                if "UTF-8" in str(e):
                    raise
    # vlmtrain.shard reads through the same checks: every bad line counted, nothing crashes
    cfg = compose_config(["data=single", f"data.path={path}"])
    result = write_shards(cfg.data, tmp_path / "shards", log=lambda *_: None)
    (entry,) = result.values()
    # (the shard tool copies media bytes without decoding them: the non-image is caught when trained)
    assert entry["samples"] == 3 + 1
    assert entry["skipped"] == Counter(r for _, r in INTERNVL_BAD if r != "corrupt_media")
