"""Exact loss normalisation over a whole optimizer step: one SGD step (lr 1, no clipping, no decay,
so the update is minus the gradient) is the same whether the step's samples come as one batch,
as 2 accumulated micro-batches, packed, or split over 2 gloo ranks on the CPU (DDP, fork)."""

import csv

import pytest
import torch

from conftest import compose_config
from vlmtrain.training.run import train

# fp32; the runs sum the same terms in a different order (and DDP all-reduces them)
ATOL = 2e-5

SGD_STEP = [
    "stage=instruction_tuning", "stage.drop_path=0", "stage.max_steps=1", "stage.global_batch_size=4",
    "stage.warmup_steps=0", "stage.warmup_ratio=0", "stage.lr=1.0", "stage.weight_decay=0",
    "optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "~optim.optimizer.eps",
    "optim.grad_clip=0", "data.num_workers=0", "trainer.enable_progress_bar=false", "loss=square",
]


def _update(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def one_batch_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("one_batch")
    return train(compose_config([*SGD_STEP, "data.micro_batch_size=4"], run_dir=run))


@pytest.fixture(scope="module")
def one_batch(one_batch_run):
    return _update(one_batch_run)


def _step_metrics(run_dir) -> dict:
    """The step's logged counts and losses (rates left out: they depend on timing)."""
    rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("train/loss")]
    assert len(rows) == 1
    keys = ("train/loss", "train/token_ce", "train/loss/shapes", "train/tokens_seen", "train/samples_seen")
    return {k: float(rows[0][k]) for k in keys}


def _assert_same_update(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=k)


def test_sgd_step_moves_every_part(one_batch, tmp_path):
    cfg = compose_config([*SGD_STEP, "data.micro_batch_size=4"])
    from vlmtrain.models.build import build_model, load_tokenizer

    init = build_model(cfg.model, load_tokenizer(cfg.model), cfg.seed).state_dict()
    for k in ("model.model.vision_tower.encoder.layer.0.mlp.fc1.weight",
              "model.model.multi_modal_projector.linear_1.weight",
              "model.model.language_model.layers.0.mlp.up_proj.weight", "model.lm_head.weight"):
        assert not torch.equal(one_batch[k], init[k.removeprefix("model.")]), k


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        ["data.micro_batch_size=2"],  # 2 accumulated micro-batches
        ["data/collate=packed"],  # one packed row
        ["data/collate=packed", "data.collate.max_tokens=1024"],  # several packed rows, accumulated
    ],
    ids=["accumulate_2", "packed", "packed_accumulate"],
)
def test_single_process_variants_equal_one_batch(one_batch, tmp_path, variant):
    _assert_same_update(one_batch, _update(train(compose_config([*SGD_STEP, *variant], run_dir=tmp_path))))


@pytest.mark.slow
@pytest.mark.parametrize(
    "collate",
    [["data.micro_batch_size=1"], ["data/collate=packed", "data.collate.max_tokens=700"],
     ["data/collate=packed", "data.collate.max_tokens=700", "data.balance_ranks=true"]],
    ids=["padded", "packed", "packed_balanced"],  # balanced: the ranks split the step by cost, same union
)
def test_two_gloo_ranks_equal_one_process(one_batch, one_batch_run, tmp_path, collate):
    # each rank takes 2 of the step's 4 samples (unequal loss weights per rank), as 2 micro-batches
    # of 1 (padded) or as many packed rows as its samples need (the ranks may differ in count)
    ddp = ["hardware.devices=2", "hardware.strategy=ddp_fork", *collate]
    run_dir = train(compose_config([*SGD_STEP, *ddp, "trainer.log_every_n_steps=1"], run_dir=tmp_path))
    _assert_same_update(one_batch, _update(run_dir))
    # the logged metrics gather both ranks: the same counts and losses as the one process's
    ranks, one = _step_metrics(run_dir), _step_metrics(one_batch_run)
    assert ranks.keys() == one.keys()
    for k in one:
        assert ranks[k] == pytest.approx(one[k], rel=1e-5), k


def test_a_step_stays_on_the_host_until_its_micro_batches_run():
    """The datamodule hands a Step to training_step untouched (it moves each micro-batch itself and
    sums the step weight from the host counts, with no device sync); other batches move as usual."""
    from vlmtrain.data.collate import Step
    from vlmtrain.training.datamodule import VLMDataModule

    dm = object.__new__(VLMDataModule)  # the hook uses no state
    step = Step(micro_batches=[])
    assert dm.transfer_batch_to_device(step, torch.device("meta"), 0) is step
    assert dm.transfer_batch_to_device(torch.ones(2), torch.device("meta"), 0).device.type == "meta"
