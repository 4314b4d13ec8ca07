"""End to end on the tiny model: the three stages chained through init_from, on the CPU."""

import csv

import pytest
import torch

from conftest import compose_config
from vlmtrain.training.run import train


def _losses(run_dir):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_three_stages_chain(tmp_path):
    common = ["stage.max_epochs=2", "data.num_workers=0"]
    s1 = train(compose_config(["stage=mlp_warmup", *common], run_dir=tmp_path / "s1"))
    s15 = train(compose_config(["stage=vit_incremental", f"init_from={s1}", *common], run_dir=tmp_path / "s15"))
    s2 = train(compose_config(["stage=instruction_tuning", f"init_from={s15}", *common], run_dir=tmp_path / "s2"))

    for run in (s1, s15, s2):
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
        assert (run / "tokenizer" / "tokenizer.json").is_file()

    w1, w15, w2 = _weights(s1), _weights(s15), _weights(s2)
    proj = "model.model.multi_modal_projector.linear_1.weight"
    vit = "model.model.vision_tower.encoder.layer.0.mlp.fc1.weight"
    llm = "model.model.language_model.layers.0.mlp.up_proj.weight"
    # stage 1.5 started from stage 1: its frozen LLM is stage 1's LLM, bit for bit
    assert torch.equal(w15[llm], w1[llm])
    # and it trained the ViT, which stage 1 had frozen
    assert not torch.equal(w15[vit], w1[vit])
    # stage 2 moved everything
    for k in (proj, vit, llm):
        assert not torch.equal(w2[k], w15[k])

    l2 = _losses(s2)
    assert sum(l2[-3:]) / 3 < sum(l2[:3]) / 3, l2
    l1 = _losses(s1)
    assert sum(l1[-3:]) / 3 < sum(l1[:3]) / 3, l1
