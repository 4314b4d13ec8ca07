"""The data tools as users run them: preview, stats and shard on `data=single data.path=...`, and
training on a one-off dataset."""

import json
import os
import subprocess
import sys

import pytest
from test_data_formats import image, write_jsonl

from conftest import REPO, compose_config
from vlmtrain.cli import command, use_schema
from vlmtrain.config import register_schemas
from vlmtrain.data.preview import preview
from vlmtrain.training.run import train


def compose_tool(verb, overrides):
    """Compose as the tool's entry point does (its schema extends the training one)."""
    use_schema(command(verb))
    try:
        return compose_config(overrides)
    finally:
        register_schemas()


def run(module, *args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    return p


def _messages(*pairs):
    return [{"role": role, "content": text} for q, a in pairs for role, text in (("user", q), ("assistant", a))]


@pytest.fixture(params=["swift2", "swift4"])
def source(tmp_path, request):
    """The same lines in ms-swift 2.x's query/response form and ms-swift 3/4's messages form."""
    image(tmp_path / "a.png", size=(400, 100))
    image(tmp_path / "b.png", size=(100, 100))
    lines = [
        {"query": "<image>Colour?", "response": "red", "history": [["Hi", "Hello"]], "images": ["a.png"]},
        {"query": "Sum 2+2?", "response": "4"},
        {"query": "<image>Broken", "response": "x", "images": ["missing.png"]},
        {"query": "<image><image>Same?", "response": "no", "images": ["a.png", "b.png"]},
    ]
    if request.param == "swift4":
        lines = [{"messages": _messages(*(line.get("history") or []), (line["query"], line["response"])),
                  **({"images": line["images"]} if "images" in line else {})} for line in lines]
    return write_jsonl(tmp_path / "train.jsonl", lines)


def test_preview_json_and_text(tmp_path, source):
    p = run("vlmtrain.preview", "data=single", f"data.path={source}", "index=0", "preview.format=json",
            "data.datasets.single.n_max=4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    obj = json.loads(p.stdout)
    assert set(obj) == {"text", "input_ids", "labels", "num_tiles", "supervised"}
    assert obj["num_tiles"] == [5]  # 4:1 -> 4x1 grid + thumbnail
    assert obj["supervised"] == ["Hello<|im_end|>", "red<|im_end|>"]
    assert obj["text"].count("<IMG_CONTEXT>") == 64 * 5 and len(obj["input_ids"]) == len(obj["labels"])
    assert not (tmp_path / "outputs").exists()  # the tools leave no Hydra output folder behind

    text = preview(compose_tool("preview", ["data=single", f"data.path={source}", "index=0",
                                                   "data.datasets.single.n_max=4"]))
    assert "<img><IMG_CONTEXT>x64x5</img>" in text and "«red<|im_end|>»" in text and "«Hello<|im_end|>»" in text
    assert "tiles per image/frame: [5]" in text and "Hi<|im_end|>" in text

    with pytest.raises(ValueError, match=f"{source}:3.*missing_media"):
        preview(compose_tool("preview", ["data=single", f"data.path={source}", "index=2"]))


def test_stats_and_shard_cli(tmp_path, source):
    png = tmp_path / "stats.png"
    p = run("vlmtrain.stats", "data=single", f"data.path={source}", "data.datasets.single.repeat=2.0",
            f"stats.plot={png}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "== single (swift)" in out and "lines: 4   after repeat: 8   share of mixture: 100.0%" in out
    assert "missing_media: 1" in out and "tokens: p50" in out and "tiles per sample: 0:1" in out
    assert png.stat().st_size > 1000

    p = run("vlmtrain.shard", "data=single", f"data.path={source}", f"out={tmp_path / 'shards'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "single: 3 samples in 1 shards" in p.stdout and "missing_media: 1" in p.stdout
    assert (tmp_path / "shards" / "single" / "shard-000000.tar").is_file()


@pytest.mark.slow
def test_train_on_a_one_off_dataset(tmp_path, source):
    cfg = compose_config(["data=single", f"data.path={source}", "stage.global_batch_size=2", "stage.max_steps=2",
                          "data.num_workers=0", "data.max_seq_len=4096", "data.datasets.single.n_max=2"],
                         run_dir=tmp_path / "run")
    run_dir = train(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
