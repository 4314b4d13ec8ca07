"""Experiment tracking: the W&B run (offline, no network) holds the config and every metric users
read, a requeued run continues the same W&B run, and no secret lands in any file."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from wandb_records import read_run

from conftest import compose_config
from vlmtrain.config import DatasetConfig
from vlmtrain.training.loss import PowerWeighting, per_sample_loss_sums, weighted_cross_entropy
from vlmtrain.training.metrics import DatasetLoss, merge_sums
from vlmtrain.training.tracking import (
    REDACTED,
    is_secret_key,
    scrub_override,
    scrub_secrets,
    secret_env_values,
    wandb_run_id,
)

FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex chars, like a real key
FAKE_HF_TOKEN = "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42"


@pytest.mark.parametrize("key", ["api_key", "WANDB_API_KEY", "hf_token", "HF_TOKEN", "password", "client_secret",
                                 "aws_secret_access_key", "accessKey", "hubToken", "credentials", "token"])
def test_credential_keys_are_secret(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["tokenizer", "max_tokens", "tokens_per_tile", "image_token_id", "pad_token",
                                 "image_token", "num_key_value_heads", "keys", "monkey", "log_every_n_steps"])
def test_ordinary_keys_are_not_secret(key):
    assert not is_secret_key(key)


def test_scrub_secrets_keys_env_values_and_overrides(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("SOME_FLAG_TOKEN", "1")  # too short to be a credential
    cfg = {
        "model": {"tokenizer": "/tok", "image_token_id": 5, "hub": {"hf_token": FAKE_HF_TOKEN, "token": None}},
        "logger": {"notes": f"key is {FAKE_WANDB_KEY}!", "tags": ["a", FAKE_WANDB_KEY]},
        "overrides": ["stage.lr=1", f"+model.hub.hf_token={FAKE_HF_TOKEN}"],
        "dirname": f"stage.lr=1,logger.api_key={FAKE_HF_TOKEN}",
        "n": 3,
    }
    out = scrub_secrets(cfg)
    text = json.dumps(out)
    assert FAKE_WANDB_KEY not in text and FAKE_HF_TOKEN not in text
    assert out["model"]["hub"]["hf_token"] == REDACTED and out["model"]["hub"]["token"] is None
    assert out["model"]["tokenizer"] == "/tok" and out["model"]["image_token_id"] == 5 and out["n"] == 3
    assert out["logger"]["notes"] == f"key is {REDACTED}!"
    assert out["overrides"] == ["stage.lr=1", f"+model.hub.hf_token={REDACTED}"]
    assert out["dirname"] == f"stage.lr=1,logger.api_key={REDACTED}"
    assert secret_env_values({"HF_TOKEN": FAKE_HF_TOKEN, "PATH": "/usr/bin:/bin:/sbin"}) == [FAKE_HF_TOKEN]
    assert scrub_override("data.datasets.a.path=/x/tokens.jsonl") == "data.datasets.a.path=/x/tokens.jsonl"


def test_wandb_run_id_is_kept_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = wandb_run_id(tmp_path)
    assert (tmp_path / "wandb_run_id").read_text().strip() == first
    assert wandb_run_id(tmp_path) == first  # requeued / resumed: same run
    assert wandb_run_id(tmp_path, id="explicit1") == "explicit1"
    assert wandb_run_id(tmp_path) == "explicit1"
    monkeypatch.setenv("WANDB_RUN_ID", "fromagent")  # `wandb agent` names the run
    assert wandb_run_id(tmp_path / "other") == "fromagent"


def test_wandb_offline_unless_it_can_log_in(tmp_path, monkeypatch):
    from vlmtrain.cli import _wandb_offline

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SWEEP_ID", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _wandb_offline()
    (tmp_path / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_WANDB_KEY}\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert not _wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert _wandb_offline()
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    assert not _wandb_offline()


def test_per_dataset_loss_from_per_token_ce():
    """Per-sample sums from the same CE pass: each dataset's sum(w*CE)/sum(w), and together the
    step loss."""
    torch.manual_seed(0)
    hidden, head = torch.randn(10, 8), torch.randn(32, 8)
    targets = torch.randint(0, 32, (10,))
    sample_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    counts = torch.tensor([3, 2, 5])
    w = PowerWeighting(0.5)(counts)[sample_ids]
    num, ce = weighted_cross_entropy(hidden, head, targets, w, chunk_size=4, return_token_ce=True)
    assert torch.allclose(num, weighted_cross_entropy(hidden, head, targets, w))
    ref = torch.nn.functional.cross_entropy(hidden @ head.T, targets, reduction="none")
    assert torch.allclose(ce, ref, atol=1e-6)
    sums = per_sample_loss_sums(ce, w, sample_ids, 3)
    meter = DatasetLoss()
    meter.add(["a", "b", "a"], sums)
    a_mask = sample_ids != 1
    expect_a = (w[a_mask] * ref[a_mask]).sum() / w[a_mask].sum()
    got = meter.sums["a"][0] / meter.sums["a"][1]
    assert got == pytest.approx(float(expect_a), rel=1e-5)
    total = merge_sums([meter.sums])
    all_num = sum(v[0] for v in total.values())
    all_w = sum(v[1] for v in total.values())
    assert all_num / all_w == pytest.approx(float(num / w.sum()), rel=1e-5)
    # unweighted per-token CE, comparable across reweightings
    assert sum(v[2] for v in total.values()) / sum(v[3] for v in total.values()) == pytest.approx(float(ref.mean()))


def _mixed_dataset(tmp_path: Path) -> Path:
    """Two good text-only lines, one with a missing image, one malformed: skips by reason."""
    lines = [
        json.dumps({"conversations": [{"from": "human", "value": "What is 2 plus 2?"}, {"from": "gpt", "value": "4"}]}),
        json.dumps({"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red"}]}),
        json.dumps({"image": "nope.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                           {"from": "gpt", "value": "x"}]}),
        '{"conversations": [',
    ]
    path = tmp_path / "extra.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _wandb_run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)  # present, yet never written anywhere
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    run_dir = tmp_path / "run"
    cfg = compose_config(["logger=wandb", "logger.tags=[test]", "logger.group=tracking", "stage.max_steps=4",
                          "stage.global_batch_size=12", "data.datasets.shapes.repeat=0.0834",
                          "trainer.log_every_n_steps=1", "trainer.peak_tflops=1.0", "data.num_workers=0",
                          "trainer.enable_progress_bar=false"], run_dir=run_dir)
    with open_dict(cfg):
        cfg.data.datasets.extra = DatasetConfig(path=str(_mixed_dataset(tmp_path)))
        cfg.model.llm.config.hub_token = FAKE_HF_TOKEN  # a credential in the config itself
    from vlmtrain.training.run import train

    train(cfg)

    (wandb_file,) = _wandb_run_files(run_dir)
    run = read_run(wandb_file)
    assert run["id"] == (run_dir / "wandb_run_id").read_text().strip()
    # the full resolved config, scrubbed
    config = run["config"]
    assert config["stage"]["name"] == "mlp_warmup" and config["optim"]["lr"] == 2e-4
    assert config["model"]["llm"]["config"]["hidden_size"] == 128
    assert config["run_dir"] == str(run_dir)
    assert config["model"]["llm"]["config"]["hub_token"] == REDACTED
    # the metrics users read, every log_every_n_steps
    rows = [r for r in run["history"] if "train/loss" in r]
    assert [r["trainer/global_step"] for r in rows] == [0, 1, 2, 3]
    every_row = {"train/loss", "train/token_ce", "train/grad_norm", "train/lr/decay", "train/lr/no_decay", "train/tokens_per_s",
                 "train/samples_per_s", "train/tiles_per_s", "train/tflops_per_s_per_device", "train/mfu",
                 "train/padding_share", "train/tokens_seen", "data/skipped_total"}
    for row in rows:
        assert every_row <= set(row), every_row - set(row)
        assert 0 < row["train/mfu"] < 1 and 0 <= row["train/padding_share"] < 1 and row["train/tokens_per_s"] > 0
    # 8 demo lines + 4 extra: every step holds all 12 lines: both datasets' losses, and the skips counted by reason
    for i, row in enumerate(rows):
        assert row["train/loss/shapes"] > 0 and row["train/loss/extra"] > 0
        assert row["data/skipped/missing_media"] == row["data/skipped/malformed_json"] == i + 1
        assert row["data/skipped_total"] == 2 * (i + 1)
    if torch.cuda.is_available():
        assert "gpu/max_allocated_gib" in rows[-1]
    # the run summary, in W&B and beside the checkpoints
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = rows[-10:]
    assert summary["global_step"] == 4 and summary["steps"] == 4 and summary["wandb_run_id"] == run["id"]
    assert summary["final_loss"] == pytest.approx(sum(r["train/loss"] for r in rows) / len(rows), rel=1e-5)
    assert set(summary["final_loss_by_dataset"]) == {"shapes", "extra"}
    assert summary["skipped"]["missing_media"] >= 1 and summary["skipped"]["malformed_json"] >= 1
    assert 0 < summary["mfu"] < 1 and summary["tokens"] > 0 and summary["tiles"] > 0
    assert run["summary"]["summary/final_loss"] == pytest.approx(summary["final_loss"])
    assert run["summary"]["summary/tokens"] == summary["tokens"]
    # the same config beside the run, also scrubbed
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.model.llm.config.hub_token == REDACTED and saved.logger.tags == ["test"]

    # a requeued or resumed start in the same run directory continues the same W&B run
    cfg2 = compose_config(["logger=wandb", "stage.max_steps=1", "data.num_workers=0",
                           "trainer.enable_progress_bar=false"], run_dir=run_dir)
    train(cfg2)
    ids = {read_run(f)["id"] for f in _wandb_run_files(run_dir)}
    assert len(_wandb_run_files(run_dir)) == 2 and ids == {run["id"]}

    # no secret in any file the runs wrote
    for f in run_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert FAKE_WANDB_KEY.encode() not in data, f
            assert FAKE_HF_TOKEN.encode() not in data, f


@pytest.mark.slow
def test_tensorboard_holds_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlmtrain.training.run import train

    common = ["stage.max_steps=4", "stage.global_batch_size=4", "trainer.log_every_n_steps=2", "data.num_workers=0",
              "trainer.enable_progress_bar=false"]
    tb = train(compose_config(["logger=tensorboard", *common], run_dir=tmp_path / "tb"))
    (events,) = (tb / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss/shapes", "train/lr/decay", "train/tokens_per_s", "train/padding_share"} <= tags
    # every trainer.log_every_n_steps (2) steps
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 3]
    assert [e.step for e in acc.Scalars("train/tokens_per_s")] == [1, 3]
    assert (tb / "tensorboard" / "hparams.yaml").is_file() and (tb / "summary.json").is_file()
    # the run totals ride in the checkpoint, for a resumed run's summary
    ckpt = torch.load(tb / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["vlmtrain_metrics"]["steps"] >= 1 and ckpt["vlmtrain_metrics"]["totals"]["tokens"] > 0


def test_step_counts_throughput_and_padding():
    """Counts of a padded step (golden numbers), and the window metrics derived from them."""
    from vlmtrain.data.collate import Step, pad_batch
    from vlmtrain.data.encode import EncodedSample
    from vlmtrain.training.flops import InternVLDims, training_flops
    from vlmtrain.training.metrics import COUNTS, StepMeter, batch_counts

    a = EncodedSample(torch.arange(5), torch.tensor([-100, -100, 3, 4, 5]), torch.zeros(2, 3, 8, 8), [2], "a")
    b = EncodedSample(torch.arange(11), torch.tensor([-100] * 9 + [1, 2]), None, [], "b")
    mb = pad_batch([a, b], pad_id=0, tile_size=8)  # rows padded to 16 slots
    counts = dict(zip(COUNTS, batch_counts(mb).tolist()))
    assert counts == {"samples": 2, "tokens": 16, "slots": 32, "tiles": 2, "sum_sq_len": 25 + 121, "supervised": 5}

    dims = InternVLDims(64, 2, 256, 224, 14, 0.5, 128, 2, 4, 2, 32, 384, 2048)
    trainable = {"multi_modal_projector": "full"}
    meter = StepMeter(dims, trainable, world_size=2, peak_flops_per_device=1e12)
    meter.count(Step([mb]))
    meter.count(Step([mb]))
    other_rank = {"counts": [2 * v for v in counts.values()], "datasets": {}, "skipped": {"too_long": 1},
                  "memory": None}
    m = meter.collect(lambda local: [local, other_rank], Counter({"too_long": 2}))
    assert m["train/padding_share"] == pytest.approx(0.5)
    assert m["train/tokens_seen"] == 4 * 16 and m["train/samples_seen"] == 4 * 2
    assert m["data/skipped/too_long"] == 3 and m["data/skipped_total"] == 3
    ratio = m["train/tokens_per_s"] / m["train/tiles_per_s"]
    assert ratio == pytest.approx(16 / 2)
    flops = training_flops(dims, 8, 64, 4 * 146, 20, trainable)
    assert m["train/mfu"] == pytest.approx(m["train/tflops_per_s_per_device"] * 1e12 / 1e12)
    assert m["train/tflops_per_s_per_device"] / m["train/tokens_per_s"] == pytest.approx(flops / 64 / 2 / 1e12)


def test_hydra_records_are_scrubbed(tmp_path, monkeypatch):
    """A credential passed on the command line (e.g. hydra.job.env_set.WANDB_API_KEY=...) is
    redacted in Hydra's own records of the job and of its multirun."""
    from vlmtrain.training.tracking import scrub_hydra_records

    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    run = tmp_path / "sweep" / "0"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create([f"hydra.job.env_set.WANDB_API_KEY={FAKE_WANDB_KEY}", "stage.lr=1"]),
                   run / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"env_set": {"WANDB_API_KEY": FAKE_WANDB_KEY},
                                                       "override_dirname": f"hf_token={FAKE_HF_TOKEN},seed=1"}}}),
                   run / ".hydra" / "hydra.yaml")
    OmegaConf.save(OmegaConf.create({"seed": 1, "note": "nothing secret"}), run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": [f"hf_token={FAKE_HF_TOKEN}"]}}}),
                   tmp_path / "sweep" / "multirun.yaml")
    before = (run / ".hydra" / "config.yaml").read_text()
    scrub_hydra_records(run)
    for f in [*(run / ".hydra").glob("*.yaml"), tmp_path / "sweep" / "multirun.yaml"]:
        text = f.read_text()
        assert FAKE_WANDB_KEY not in text and FAKE_HF_TOKEN not in text, f
    assert OmegaConf.load(run / ".hydra" / "overrides.yaml") == [f"hydra.job.env_set.WANDB_API_KEY={REDACTED}",
                                                                 "stage.lr=1"]
    assert (run / ".hydra" / "config.yaml").read_text() == before  # untouched when clean


def test_meter_state_survives_a_resume():
    """Totals, losses and skips of the run before a resume carry into the resumed run's summary."""
    from vlmtrain.data.collate import Step, pad_batch
    from vlmtrain.data.encode import EncodedSample
    from vlmtrain.training.flops import InternVLDims
    from vlmtrain.training.metrics import StepMeter

    dims = InternVLDims(64, 2, 256, 224, 14, 0.5, 128, 2, 4, 2, 32, 384, 2048)
    s = EncodedSample(torch.arange(6), torch.tensor([-100, -100, -100, 4, 5, 6]), None, [], "a")
    step = Step([pad_batch([s], pad_id=0, tile_size=8)])

    def run(meter, n, skipped):
        for i in range(n):
            meter.count(step)
            meter.collect(lambda x: [x], Counter(skipped), loss=float(i))

    first = StepMeter(dims, {}, 1)
    run(first, 3, {"too_long": 1})
    resumed = StepMeter(dims, {}, 1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as stored in a checkpoint
    run(resumed, 2, {"too_long": 2})  # this process's own count since the resume
    summary = resumed.summary()
    assert summary["steps"] == 5 and summary["tokens"] == 5 * 6 and summary["skipped"] == {"too_long": 3}
    assert summary["first_loss"] == 0.0 and summary["final_loss"] == pytest.approx((0 + 1 + 2 + 0 + 1) / 5)
    assert summary["train_seconds"] >= first.summary()["train_seconds"]


def test_rank_imbalance_and_fillers_are_no_data():
    """The busiest rank over the mean rank, per step window; zero-weight filler micro-batches count nothing."""
    from vlmtrain.data.collate import Step, pad_batch, zero_weight_batch
    from vlmtrain.data.encode import EncodedSample
    from vlmtrain.training.flops import InternVLDims
    from vlmtrain.training.metrics import COUNTS, StepMeter, batch_counts

    a = EncodedSample(torch.arange(5), torch.tensor([-100, -100, 3, 4, 5]), torch.zeros(2, 3, 8, 8), [2], "a")
    mb = pad_batch([a], pad_id=0, tile_size=8)
    counts = batch_counts(mb).tolist()
    dims = InternVLDims(64, 2, 256, 224, 14, 0.5, 128, 2, 4, 2, 32, 384, 2048)
    meter = StepMeter(dims, {"multi_modal_projector": "full"}, world_size=2)
    meter.count(Step([mb, zero_weight_batch(0, 8), zero_weight_batch(0, 8)]))
    other = {"counts": [3 * v for v in counts], "datasets": {}, "skipped": {}, "memory": None}
    m = meter.collect(lambda local: [local, other], Counter())
    assert m["train/samples_seen"] == 4  # 1 here + 3 there: the fillers are not samples
    assert m["train/rank_imbalance/tokens"] == pytest.approx(3 / 2)  # busiest 3 units, mean 2
    assert m["train/rank_imbalance/tiles"] == pytest.approx(3 / 2)
    assert COUNTS.index("tiles") == 3
