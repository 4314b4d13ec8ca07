"""Nothing lost, nothing silent (issue 17): a run that trains nothing fails, steps without a
supervised token are not steps, and the run's records stay strict."""

from __future__ import annotations

import csv
import json
import math

import pytest

from conftest import REPO, compose_config
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


def test_short_secrets_are_redacted(tmp_path, monkeypatch):
    """A credential shorter than 8 characters, interpolated into the config, used to land in
    config.yaml and a directory name (finding 9)."""
    from vlmtrain.training.tracking import REDACTED, save_config, scrub_secrets, secret_env_values

    secrets = secret_env_values({"WANDB_API_KEY": "k3y", "HF_TOKEN": "1", "PATH": "/bin"})
    assert secrets == ["k3y"]  # "1" is a switch, not a credential
    assert scrub_secrets({"name": "run-k3y", "dir": "runs/k3y/x", "other": "k3yboard", "n": "1"}, secrets) == {
        "name": f"run-{REDACTED}", "dir": f"runs/{REDACTED}/x", "other": "k3yboard", "n": "1"}
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    cfg = compose_config(["logger.name=${oc.env:WANDB_API_KEY}"], run_dir=tmp_path)
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "k3y" not in text and REDACTED in text


def test_16_bit_and_other_modes_convert_to_the_right_pixels(tmp_path):
    import numpy as np
    from PIL import Image

    from vlmtrain.data.images import load_image

    grey16 = np.full((8, 8), 32896, dtype=np.uint16)  # 50% grey in 16 bits: 128 in 8 bits
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    px = np.asarray(load_image(tmp_path / "g16.png"))
    assert px.shape == (8, 8, 3) and (px == 128).all(), px[0, 0]  # PIL's convert made it 255 (white)
    for mode, value in [("L", 77), ("P", 3), ("LA", 90), ("RGBA", 200), ("CMYK", 0), ("1", 1)]:
        img = Image.new(mode, (4, 4), value if mode not in ("LA", "RGBA", "CMYK") else
                        {"LA": (90, 255), "RGBA": (200, 10, 10, 255), "CMYK": (0, 0, 0, 0)}[mode])
        img.save(tmp_path / f"m.{'png' if mode != 'CMYK' else 'jpg'}")
        out = load_image(tmp_path / f"m.{'png' if mode != 'CMYK' else 'jpg'}")
        assert out.mode == "RGB" and out.size == (4, 4)


@pytest.mark.parametrize("bad", [0, -3, "4", True])
def test_meta_max_dynamic_patch_must_be_a_positive_integer(tmp_path, bad):
    from vlmtrain.data.mixture import dataset_configs

    data = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    (tmp_path / "meta.json").write_text(json.dumps({"docs": {"annotation": str(data), "max_dynamic_patch": bad}}))
    with pytest.raises(UserError, match="max_dynamic_patch' must be an integer >= 1"):
        dataset_configs({"m": {"path": str(tmp_path / "meta.json")}})


@pytest.mark.parametrize("entry,match", [({"root": "x"}, "entry 'docs': needs an 'annotation' path"),
                                         ({"annotation": "a.jsonl", "max_tiles": 4}, "unknown keys \\['max_tiles'\\]")])
def test_meta_file_problems_are_named_not_a_format_guess(tmp_path, entry, match):
    """A meta file with a bad entry is reported as that entry's problem, not "cannot guess the format"."""
    from vlmtrain.data.mixture import dataset_configs

    (tmp_path / "meta.json").write_text(json.dumps({"docs": entry}))
    with pytest.raises(UserError, match=match):
        dataset_configs({"m": {"path": str(tmp_path / "meta.json")}})


@pytest.mark.parametrize("override,match", [("data.datasets.single.min_tiles=7", "min_tiles <= n_max"),
                                            ("data.datasets.single.template=nope", "template")])
def test_dataset_settings_fail_before_any_worker(tmp_path, override, match):
    data = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 2)
    with pytest.raises(UserError, match=match):
        train(compose_config(tiny_run(data, override, "data.num_workers=1"), run_dir=tmp_path / "run"))


def test_a_second_run_in_the_same_directory_is_refused(tmp_path):
    import subprocess
    import sys

    from vlmtrain.training.run import run_dir_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from vlmtrain.training.run import run_dir_lock\n"
        f"with run_dir_lock(Path({str(run_dir)!r})):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=r"in use by a running training \(pid \d+"):
            with run_dir_lock(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(run_dir):  # the holder died (kill -9): the directory is free again
        pass


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a crafted checkpoint does: run code when unpickled
        return (open, (self.marker, "w"))


def test_a_crafted_deepspeed_folder_runs_no_code(tmp_path):
    """init_from=<a DeepSpeed checkpoint folder>: DeepSpeed's zero_to_fp32 unpickles its shards
    (weights_only=False); vlmtrain reads them with weights_only and refuses what needs more."""
    import torch

    pytest.importorskip("deepspeed")
    from vlmtrain.models.run_checkpoint import read_model_state

    folder = tmp_path / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    marker = tmp_path / "pwned"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": {}, "buffer_names": [], "param_shapes": [], "shared_params": {},
                    "x": _Payload(str(marker))}, folder / "checkpoint" / name)
    with pytest.raises(UserError, match="refused"):
        read_model_state(folder, "init_from")
    assert not marker.exists()


def test_media_paths_stay_inside_the_dataset_root(tmp_path):
    """image: /etc/passwd or ../.. used to be read (and copied into shards by vlmtrain.shard)."""
    from collections import Counter

    from PIL import Image

    from vlmtrain.data.mixture import Skipped, build_mixture
    from vlmtrain.data.shard import write_shards

    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "ok.png")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "outside.png")
    lines = [{"image": p, "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "x"}]}
             for p in ("ok.png", "../outside.png", str(tmp_path / "outside.png"), "/etc/passwd", "./ok.png")]
    data = write_jsonl(root / "d.jsonl", lines)
    ds, _ = build_mixture(compose_config(["data=single", f"data.path={data}"]))
    reasons = [s.reason if isinstance(s, Skipped) else "ok" for s in (ds.load(i) for i in range(len(ds)))]
    assert reasons == ["ok", "media_outside_root", "media_outside_root", "media_outside_root", "ok"]
    result = write_shards(compose_config(["data=single", f"data.path={data}"]).data, tmp_path / "shards", log=lambda *_: None)
    assert next(iter(result.values()))["skipped"] == Counter(media_outside_root=3)
    ds, _ = build_mixture(compose_config(["data=single", f"data.path={data}", "data.media_outside_root=true"]))
    reasons = [s.reason if isinstance(s, Skipped) else "ok" for s in (ds.load(i) for i in range(len(ds)))]
    assert reasons == ["ok", "ok", "ok", "corrupt_media", "ok"]  # allowed: /etc/passwd is then just not an image


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 half a checkpoint"], ids=["empty", "truncated"])
@pytest.mark.parametrize("key", ["init_from", "resume"])
def test_empty_or_truncated_checkpoints_are_one_line_errors(tmp_path, content, key):
    """They used to end in a bare EOFError (or a zip reader error) deep inside the load."""
    from vlmtrain.models.run_checkpoint import find_checkpoint, find_resume_checkpoint

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(content)
    with pytest.raises(UserError, match=f"{key}: .*last.ckpt is (empty|not a complete torch checkpoint)"):
        if key == "resume":
            find_resume_checkpoint("auto", tmp_path)
        else:
            find_checkpoint(ckpt, key)


def test_gpu_hardware_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    data = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 2)
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        train(compose_config(tiny_run(data, "hardware=gpu"), run_dir=tmp_path / "run"))


def test_chat_keeps_the_session_on_bad_media_and_leaves_on_ctrl_c(tmp_path):
    from vlmtrain.data.conversation import SampleError
    from vlmtrain.inference.chat import run_console

    (tmp_path / "notes.txt").write_text("not an image")

    class Session:
        asked = []

        def ask(self, query, images, videos, write):
            if images:
                raise SampleError("corrupt_media", f"cannot decode image {images[0]}")
            self.asked.append(query)
            write("fine")

        def clear(self):
            pass

    lines = iter([f"<img>{tmp_path / 'notes.txt'}</img> what is it?", "and now?"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None

    out = []
    run_console(Session(), read, out.append)  # returns: Ctrl-C at the prompt leaves cleanly
    text = "".join(out)
    assert "error: cannot decode image" in text and Session.asked == ["and now?"]
