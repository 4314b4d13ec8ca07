"""The preference stage (issue 20): MPO's loss terms by hand and against TRL, precomputed = live
reference, a pair's images encoded once, pairs kept whole by packing, the preference format's bad
input policy, exact resume of BCO's delta and the data, and SFT -> `vlmtrain pairs` -> MPO end to end."""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from conftest import compose_config
from vlmtrain.config import dataset_config
from vlmtrain.data.collate import StepCollator, pad_batch
from vlmtrain.data.encode import PairSample
from vlmtrain.data.formats import guess_format
from vlmtrain.data.formats.preference import load_reference, reference_path
from vlmtrain.data.mixture import MixtureDataset, Skipped
from vlmtrain.data.packing import PackedStepCollator
from vlmtrain.data.synthetic import ensure_demo_dataset
from vlmtrain.errors import UserError
from vlmtrain.models.build import build_model, load_tokenizer
from vlmtrain.models.internvl import tokens_per_tile
from vlmtrain.training.objective import build_objective
from vlmtrain.training.preference import (
    CopyReference,
    PrecomputedReference,
    PreferenceObjective,
    bco_pair,
    dpo_sigmoid,
    sample_logps,
)
from vlmtrain.training.run import build_trainer, train

BETA = 0.1
# fixed sequence log-probs of three pairs: policy and reference, chosen and rejected
PC = torch.tensor([-12.0, -30.5, -7.25])
PR = torch.tensor([-15.0, -28.0, -9.75])
RC = torch.tensor([-13.5, -29.0, -8.0])
RR = torch.tensor([-14.0, -29.5, -8.5])


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_and_bco_terms_equal_the_formula_by_hand():
    delta = 0.037
    dpo = dpo_sigmoid(PC - RC, PR - RR, BETA)
    bco = bco_pair(PC - RC, PR - RR, BETA, delta)
    for i in range(3):
        rc, rr = float(PC[i] - RC[i]), float(PR[i] - RR[i])
        assert dpo[i].item() == pytest.approx(-_logsig(BETA * (rc - rr)), rel=1e-6)
        assert bco[i].item() == pytest.approx(-_logsig(BETA * rc - delta) - _logsig(-(BETA * rr - delta)), rel=1e-6)


def _trl_loss(loss_type: str, chosen_len: int = 4):
    """TRL's DPOTrainer loss (its own _compute_loss) on the same sequence log-probs: a stand-in model
    returns per-token log-probs that sum to PC / PR over completions of ``chosen_len`` tokens, and the
    reference log-probs come precomputed."""
    from trl import DPOTrainer

    n, length = len(PC), chosen_len + 2
    completion = torch.zeros(2 * n, length, dtype=torch.long)
    completion[:, 2:] = 1
    per_token = torch.zeros(2 * n, length - 1)
    for row, total in enumerate(torch.cat([PC, PR])):
        per_token[row, 1:] = total / chosen_len  # shifted: completion tokens 2.. are predicted at 1..
    zeros = torch.zeros(2 * n, length - 1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    accel = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=BETA, use_weighting=False, label_smoothing=0.0, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * n, length, dtype=torch.long), "attention_mask": torch.ones(2 * n, length),
              "completion_mask": completion, "ref_chosen_logps": RC, "ref_rejected_logps": RR}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _ours(dpo=0.0, bco=0.0, sft=0.0, chosen_len=4):
    """Our PreferenceObjective's loss on the same log-probs: a batch stand-in whose pairs carry them."""
    objective = PreferenceObjective(PrecomputedReference(), beta=BETA, dpo_weight=dpo, bco_weight=bco, sft_weight=sft)
    terms = objective_terms(objective, PC, PR, RC, RR, chosen_len)
    stats = terms.stats
    return float(terms.total) / len(PC), {k: float(v) for k, v in objective.metrics(stats, None).items()}


def objective_terms(objective, pc, pr, rc, rr, chosen_len):
    import vlmtrain.training.preference as pref

    n = len(pc)
    mb = SimpleNamespace(pairs=torch.arange(2 * n).reshape(-1, 2), zero_weight=False, input_ids=torch.zeros(1, 1),
                         ref_logps=torch.stack([rc, rr], 1), num_supervised=torch.full((2 * n,), chosen_len))
    logps = torch.stack([pc, pr], 1).reshape(-1)
    real = pref.sample_logps
    pref.sample_logps = lambda model, batch: logps
    try:
        return objective(None, mb)
    finally:
        pref.sample_logps = real


def test_dpo_sigmoid_and_bco_pair_match_trl():
    for loss_type, weights in (("sigmoid", {"dpo": 1.0}), ("bco_pair", {"bco": 1.0}), ("sft", {"sft": 1.0})):
        trl_loss, trl_metrics = _trl_loss(loss_type)
        ours, metrics = _ours(**weights)  # BCO's delta is 0 before the first step; TRL 1.x has none
        assert ours == pytest.approx(trl_loss, rel=1e-5), loss_type
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected"):
            assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-7), key
    # MPO: TRL's weighted sum of the three, as InternVL2.5-MPO configures it (sigmoid,bco_pair,sft: 0.8,0.2,1)
    mpo = 0.8 * _trl_loss("sigmoid")[0] + 0.2 * _trl_loss("bco_pair")[0] + _trl_loss("sft")[0]
    assert _ours(0.8, 0.2, 1.0)[0] == pytest.approx(mpo, rel=1e-5)


def test_bco_delta_is_the_running_mean_of_step_rewards_and_round_trips():
    objective = PreferenceObjective(PrecomputedReference(), beta=BETA)
    means = []
    for shift in (0.0, 1.0, -2.5):
        terms = objective_terms(objective, PC + shift, PR, RC, RR, 4)
        stats = terms.stats
        means.append((float(stats["rewards/chosen"]) + float(stats["rewards/rejected"])) / (2 * len(PC)))
        delta_used = float(objective.delta)
        objective.end_step(stats)
        # the loss of this step used the mean of the steps before it
        assert delta_used == pytest.approx(sum(means[:-1]) / max(1, len(means) - 1) if len(means) > 1 else 0.0)
    assert float(objective.delta) == pytest.approx(sum(means) / 3)
    other = PreferenceObjective(PrecomputedReference(), beta=BETA)
    other.load_state_dict(objective.state_dict())
    assert torch.equal(other.delta, objective.delta) and int(other.delta_steps) == 3


# -- data: the preference format, pairs collated with their images once ---------------------------------


def write_pairs(path: Path, n: int, extra: list[str] = ()) -> Path:
    """n preference lines from the demo data (chosen: the ground truth; rejected: another count)."""
    demo = ensure_demo_dataset()
    lines = []
    for raw in open(demo):
        o = json.loads(raw)
        if not isinstance(o.get("image"), str):
            continue
        q, a = o["conversations"][0]["value"], o["conversations"][1]["value"]
        wrong = str(int(a) + 1) if a.isdigit() else ("no" if a != "no" else "yes")
        lines.append(json.dumps({"image": str(demo.parent / o["image"]), "question": q, "chosen": a, "rejected": wrong}))
        if len(lines) == n:
            break
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def _setup(tmp_path, n=6, extra=(), n_max=1):
    cfg = compose_config(["model=tiny", "data=single", f"data.path={write_pairs(tmp_path / 'p.jsonl', n, extra)}",
                          f"++data.datasets.single.n_max={n_max}", "++data.datasets.single.jpeg_augment=false",
                          "data.media_outside_root=true"])  # the pairs name the demo's images by absolute path
    tok = load_tokenizer(cfg.model)
    v = cfg.model.vision
    ds = MixtureDataset(cfg.data, tok, tokens_per_tile(v.image_size, v.patch_size, cfg.model.downsample_ratio))
    return cfg, tok, ds


def test_preference_format_is_guessed_and_bad_lines_are_counted(tmp_path):
    bad = [json.dumps({"question": "q?", "chosen": "a", "rejected": "a"}),
           json.dumps({"question": "q?", "chosen": "", "rejected": "b"}),
           json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}],
                       "chosen": "a", "rejected": "b"}),
           "{not json"]
    cfg, tok, ds = _setup(tmp_path, n=2, extra=bad)
    assert guess_format(tmp_path / "p.jsonl") == "preference"
    items = [ds.load(i) for i in range(len(ds))]
    assert all(isinstance(x, PairSample) for x in items[:2])
    skipped = items[2:]
    assert [s.reason for s in skipped] == ["identical_pair", "bad_pair", "bad_message", "malformed_json"]
    assert all(isinstance(s, Skipped) and s.where.endswith(f"p.jsonl:{i}") for i, s in enumerate(skipped, start=3))
    # the pair shares its prompt: the same tokens up to where the answers start, tiles once
    pair = items[0]
    assert pair.rejected.pixel_values is None and pair.chosen.pixel_values is not None
    first = int((pair.chosen.labels != -100).nonzero()[0])
    assert torch.equal(pair.chosen.input_ids[:first], pair.rejected.input_ids[:first])
    with pytest.raises(UserError, match="preference stage"):
        cfg2 = compose_config(["model=tiny"])
        build_objective(cfg2.stage, cfg2.loss)(None, StepCollator(2, tok.pad_token_id, 224)(items[:2]).micro_batches[0])


def _model(cfg, tok):
    model = build_model(cfg.model, tok, seed=0)
    model.eval()
    return model


def test_a_pairs_images_are_encoded_once_and_feed_both_answers(tmp_path):
    cfg, tok, ds = _setup(tmp_path, n=4, n_max=4)
    model = _model(cfg, tok)
    calls = []
    model.model.vision_tower.register_forward_hook(
        lambda m, a, kw, o: calls.append((a[0] if a else kw["pixel_values"]).shape[0]), with_kwargs=True)
    pairs = [ds.load(i) for i in range(4)]
    tiles = sum(p.pixel_values.shape[0] for p in pairs)
    for collate in (StepCollator(4, tok.pad_token_id, 224), PackedStepCollator(tok.pad_token_id, 224, 100000, 100)):
        mb = collate(pairs).micro_batches[0]
        assert len(collate(pairs).micro_batches) == 1 and mb.pixel_values.shape[0] == tiles
        calls.clear()
        objective = PreferenceObjective(PrecomputedReference())
        mb.ref_logps = torch.zeros(4, 2)
        with torch.no_grad():
            objective(model, mb)
        assert calls == [tiles]  # one vision-tower call over each pair's tiles once
        # and each answer sees its images: its log-prob equals the one of the answer encoded alone
        with torch.no_grad():
            together = sample_logps(model, mb)
            for i, p in enumerate(pairs):
                for j, s in enumerate((p.chosen, p.rejected)):
                    alone = pad_batch([s if s.pixel_values is not None else
                                       type(s)(s.input_ids, s.labels, p.pixel_values, s.num_tiles, s.dataset)],
                                      tok.pad_token_id, 224)
                    assert float(sample_logps(model, alone)[0]) == pytest.approx(float(together[mb.pairs[i, j]]),
                                                                                  abs=1e-4)


def test_packing_never_splits_a_pair(tmp_path):
    cfg, tok, ds = _setup(tmp_path, n=6)
    pairs = [ds.load(i) for i in range(6)]
    budget = max(len(p) for p in pairs) + 10  # room for about one pair per buffer
    step = PackedStepCollator(tok.pad_token_id, 224, budget, 48)(pairs)
    assert len(step.micro_batches) > 1
    seen = 0
    for mb in step.micro_batches:
        n = len(mb.pairs)
        assert mb.pairs.tolist() == [[2 * i, 2 * i + 1] for i in range(n)]  # both answers in this buffer
        assert mb.tile_index.numel() == 2 * mb.pixel_values.shape[0]  # each tile shown to both answers
        seen += n
    assert seen == 6


def test_precomputed_reference_gives_the_live_references_loss(tmp_path):
    from vlmtrain.inference.pairs import reference_logps

    cfg, tok, ds = _setup(tmp_path, n=6)
    model = _model(cfg, tok)
    trained = SimpleNamespace(model=model, tokenizer=tok, model_cfg=cfg.model)
    data = OmegaConf.to_object(cfg.data)
    settings = dataset_config("single", cfg.data.datasets.single)  # the tiling training reads it with
    ref_file = reference_logps(trained, data, "single", tmp_path / "p.jsonl", 4, "test", settings)
    assert ref_file == reference_path(tmp_path / "p.jsonl") and len(load_reference(tmp_path / "p.jsonl").rows) == 6
    live = PreferenceObjective(CopyReference())
    live.setup(model)
    with torch.no_grad():  # the policy moves away from the reference
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    pre = PreferenceObjective(PrecomputedReference())
    ds2 = MixtureDataset(cfg.data, tok, 64)  # reads the reference log-probs beside the data now
    step = StepCollator(3, tok.pad_token_id, 224)([ds2.load(i) for i in range(6)])
    for mb in step.micro_batches:
        assert mb.ref_logps is not None
        a, b = live(model, mb), pre(model, mb)
        assert float(a.total.detach()) == pytest.approx(float(b.total.detach()), rel=1e-5, abs=1e-5)
        assert float(a.stats["rewards/margins"]) != 0.0
        for k in a.stats:
            assert float(a.stats[k]) == pytest.approx(float(b.stats[k]), rel=1e-4, abs=1e-5), k
    # other tiling than the first pass's is an error, before any step
    other = compose_config(["model=tiny", "data=single", f"data.path={tmp_path / 'p.jsonl'}",
                            "++data.datasets.single.n_max=4"])
    with pytest.raises(UserError, match="other data settings.*n_max: 1 there, 4 here"):
        MixtureDataset(other.data, tok, 64)
    # so is another image mode (the same tile count, other pixels); a file that predates the key is read
    other = compose_config(["model=tiny", "data=single", f"data.path={tmp_path / 'p.jsonl'}",
                            "++data.datasets.single.n_max=1", "data.image_mode=resize"])
    with pytest.raises(UserError, match="other data settings.*image_mode: 'tile' there, 'resize' here"):
        MixtureDataset(other.data, tok, 64)
    ref_lines = ref_file.read_text().splitlines()
    head = json.loads(ref_lines[0])
    del head["provenance"]["settings"]["image_mode"]
    ref_file.write_text("\n".join([json.dumps(head), *ref_lines[1:]]) + "\n")
    MixtureDataset(other.data, tok, 64)
    # a line changed after its log-probs were written is an error naming it
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"chosen"', '"chosen" ', 1)
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:2: the line changed"):
        MixtureDataset(cfg.data, tok, 64).load(1)


# -- training: exact resume, and SFT -> pairs -> MPO end to end -------------------------------------------


class Killed(Exception):
    pass


class Recorder(Callback):
    def __init__(self, rows, kill_at=None):
        self.rows, self.kill_at = rows, kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            raise Killed()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        h = hashlib.sha1()
        for mb in batch.micro_batches:
            h.update(mb.input_ids.numpy().tobytes())
        self.rows.append((trainer.global_step, h.hexdigest(), float(trainer.callback_metrics["train/loss"]),
                          float(pl_module.objective.delta)))


def _train(monkeypatch, overrides, run_dir, recorder):
    def with_recorder(cfg, rd, *args, **kwargs):  # train passes the logged config and extra callbacks too
        trainer = build_trainer(cfg, rd, *args, **kwargs)  # the real one, imported before any patch
        trainer.callbacks.insert(0, recorder)
        return trainer

    monkeypatch.setattr("vlmtrain.training.run.build_trainer", with_recorder)
    return train(compose_config(overrides, run_dir=run_dir))


@pytest.mark.slow
def test_killed_and_resumed_mpo_run_continues_delta_and_data_exactly(tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "p.jsonl", 12)
    common = ["stage=mpo", "data=single", f"data.path={data}", "++data.datasets.single.n_max=1", "data.num_workers=0",
              "stage.global_batch_size=4", "data.micro_batch_size=2", "stage.max_epochs=2", "stage.lr=1e-3",
              "trainer.checkpoint_every_n_steps=1", "trainer.enable_progress_bar=false"]
    full = []
    _train(monkeypatch, common, tmp_path / "full", Recorder(full))
    assert [s for s, *_ in full] == list(range(1, 7))
    assert full[-1][3] != 0.0  # delta moved
    first = []
    with pytest.raises(Killed):
        _train(monkeypatch, common, tmp_path / "cut", Recorder(first, kill_at=2))
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert float(ckpt["vlmtrain_objective"]["bco_delta"]) == first[-1][3]
    assert any(k.startswith("reference.") for k in ckpt["state_dict"])  # the frozen copy resumes as it was
    second = []
    _train(monkeypatch, [*common, "resume=auto"], tmp_path / "cut", Recorder(second))
    assert first + second == full  # same data per step, same losses, same delta, bit for bit
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


@pytest.mark.slow
def test_sft_then_pairs_then_mpo_and_dpo(tmp_path):
    from vlmtrain.cli import command

    common = ["data.num_workers=0", "trainer.enable_progress_bar=false", "data.datasets.shapes.n_max=1"]
    sft = train(compose_config(["stage=instruction_tuning", "stage.max_steps=4", "stage.lr=1e-3", *common],
                               run_dir=tmp_path / "sft"))
    cfg = compose_config([f"ckpt={sft}", f"out={tmp_path / 'pairs'}", "pairs.limit=12", "pairs.samples=2",
                          "pairs.max_new_tokens=4", "device=cpu", "data.datasets.shapes.n_max=1"], config_name="pairs")
    summary = command("pairs").run(cfg)
    made = summary["datasets"]["shapes"]
    assert made["pairs"] >= 4, made
    lines = [json.loads(x) for x in open(made["file"])]
    assert all(set(x["provenance"]) >= {"method", "source", "ground_truth", "ckpt"} for x in lines)
    assert guess_format(Path(made["file"])) == "preference"
    assert len(load_reference(made["file"]).rows) == made["pairs"]
    single = ["data=single", f"data.path={made['file']}", "++data.datasets.single.n_max=1",
              "++data.datasets.single.jpeg_augment=false"]
    # the reference pass again, for the tiling this training uses (build mode wrote it for the defaults)
    command("pairs").run(compose_config([f"ckpt={sft}", "pairs.mode=reference", "device=cpu", *single],
                                        config_name="pairs"))
    assert load_reference(made["file"]).settings["n_max"] == 1
    pairs_data = [*single, "data.num_workers=0", "stage.global_batch_size=2", "data.micro_batch_size=2",
                  "stage.max_steps=2", "trainer.enable_progress_bar=false", f"init_from={sft}"]
    for stage in (["stage=mpo"], ["stage=dpo", "stage/reference=precomputed"]):
        run = train(compose_config([*stage, *pairs_data], run_dir=tmp_path / stage[0].split("=")[1]))
        rows = [r for r in open(run / "metrics.csv")]
        header = rows[0].strip().split(",")
        for key in ("train/rewards/chosen", "train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen",
                    "train/loss/dpo", "train/loss/bco", "train/loss/sft", "train/bco/delta"):
            assert key in header, key
        assert len(rows) == 3


def test_adapter_reference_is_the_base_model_and_restores_the_policy(tmp_path):
    from vlmtrain.models.build import apply_stage
    from vlmtrain.training.preference import AdapterReference, pair_logps

    cfg, tok, ds = _setup(tmp_path, n=2)
    model = _model(cfg, tok)
    mb = StepCollator(2, tok.pad_token_id, 224)([ds.load(i) for i in range(2)]).micro_batches[0]
    with torch.no_grad():
        base = pair_logps(sample_logps(model, mb), mb)
    lora_cfg = compose_config(["model=tiny", "stage=mpo_lora"])
    apply_stage(model, OmegaConf.to_object(lora_cfg.stage))
    reference = AdapterReference()
    assert reference.setup(model) is None  # no copy
    with torch.no_grad():  # trained adapters: the policy is no longer the base model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    ref = reference(model, mb)
    assert torch.allclose(ref, base, atol=1e-5)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == grads
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(pair_logps(sample_logps(model, mb), mb), base, atol=1e-3)
    with pytest.raises(UserError, match="stage.trainable"):  # a fully trained part would move the reference
        model.model.multi_modal_projector.requires_grad_(True)
        reference.setup(model)
