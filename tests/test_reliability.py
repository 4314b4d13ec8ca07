"""Nothing lost, nothing silent (issue 17): a run that trains nothing fails, steps without a
supervised token are not steps, and the run's records stay strict."""

from __future__ import annotations

import csv
import json
import math

import pytest

from conftest import compose_config
from vlmtrain.errors import UserError
from vlmtrain.training.run import train

GOOD = {"conversations": [{"from": "human", "value": "What is 1 + 1?"}, {"from": "gpt", "value": "2"}]}
MISSING_IMAGE = {"image": "nope.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                         {"from": "gpt", "value": "a cat"}]}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def tiny_run(path, *extra):
    return ["data=single", f"data.path={path}", "stage.global_batch_size=1", "data.micro_batch_size=1",
            "data.num_workers=0", "stage.max_epochs=1", "stage.warmup_steps=0", "trainer.enable_progress_bar=false",
            *extra]


def logged(run_dir, key="train/loss"):
    return [(int(float(r["step"])), float(r[key])) for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get(key)]


@pytest.mark.parametrize("extra", [[], ["stage.max_steps=5"]], ids=["epochs", "max_steps"])
def test_all_bad_data_is_an_error_not_a_success(tmp_path, extra):
    """Every sample skipped: before, exit 0 with samples 0 and final_loss 0.0 (and an endless loop
    under stage.max_steps); now a UserError naming the skip reasons."""
    data = write_jsonl(tmp_path / "bad.jsonl", [MISSING_IMAGE, "{not json", MISSING_IMAGE])
    with pytest.raises(UserError, match=r"nothing was trained.*missing_media: 2.*malformed_json: 1|"
                                        r"nothing was trained.*malformed_json: 1.*missing_media: 2"):
        train(compose_config(tiny_run(data, *extra), run_dir=tmp_path / "run"))


def test_too_small_max_seq_len_is_an_error(tmp_path):
    data = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 3)
    with pytest.raises(UserError, match="too_long: 3"):
        train(compose_config(tiny_run(data, "data.max_seq_len=4"), run_dir=tmp_path / "run"))


def test_steps_without_supervised_tokens_are_not_steps(tmp_path):
    """4 good and 4 bad lines, one sample per step: the 4 steps whose sample was skipped log no
    0.0 loss, take no optimizer or scheduler step, and do not count as steps; summary.json is
    strict JSON."""
    good = [{"conversations": [{"from": "human", "value": f"What is {i} + 1?"}, {"from": "gpt", "value": str(i + 1)}]}
            for i in range(4)]
    data = write_jsonl(tmp_path / "mixed.jsonl", [*good, MISSING_IMAGE, MISSING_IMAGE, "{bad", MISSING_IMAGE])
    run_dir = train(compose_config(tiny_run(data), run_dir=tmp_path / "run"))
    losses = logged(run_dir)
    assert [s for s, _ in losses] == [0, 1, 2, 3] and all(v > 0 for _, v in losses), losses
    lrs = [v for _, v in logged(run_dir, "train/lr/decay")]
    assert len(lrs) == 4  # the cosine schedule moved 4 times, not 8
    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["global_step"] == 4 and summary["steps"] == 4 and summary["samples"] == 4
    assert summary["skipped"] == {"malformed_json": 1, "missing_media": 3}
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0


def test_micro_batch_size_below_one_is_an_error(tmp_path):
    data = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 3)
    with pytest.raises(UserError, match="data.micro_batch_size"):
        train(compose_config(tiny_run(data, "data.micro_batch_size=-2"), run_dir=tmp_path / "run"))
