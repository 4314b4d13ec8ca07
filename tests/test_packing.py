"""Packing: buffers respect their budgets, and a packed batch gives the loss and every gradient of
the same samples run one by one (per-sample attention isolation, restarting positions, per-sample
loss weights), for token, sample and square reweighting."""

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from vlmtrain.data.collate import Step, StepCollator, pad_batch
from vlmtrain.data.encode import EncodedSample
from vlmtrain.data.mixture import MixtureDataset
from vlmtrain.data.packing import PackedStepCollator, plan_buffers
from vlmtrain.models.attention import document_ids, varlen_causal_attention
from vlmtrain.models.build import build_model, load_tokenizer
from vlmtrain.models.internvl import tokens_per_tile
from vlmtrain.training.loss import IGNORE_INDEX, PowerWeighting
from vlmtrain.training.module import VLMTrainingModule
from vlmtrain.training.objective import CrossEntropyObjective

# fp32 on the CPU; packed and one-by-one runs sum the same terms in another order
RTOL, ATOL = 1e-4, 1e-6


def _sample(n_tokens, n_tiles=0, tile=224):
    ids = torch.arange(n_tokens)
    pix = torch.zeros(n_tiles, 3, tile, tile) if n_tiles else None
    return EncodedSample(ids, ids.clone(), pix)


def test_plan_respects_budgets_and_never_splits():
    samples = [_sample(n, t) for n, t in [(900, 3), (500, 1), (700, 0), (100, 2), (1000, 4), (50, 0)]]
    plan = plan_buffers(samples, max_tokens=1024, max_tiles=4)
    assert sorted(i for b in plan for i in b) == list(range(len(samples)))  # every sample once, whole
    for b in plan:
        assert sum(len(samples[i]) for i in b) <= 1024
        assert sum(0 if samples[i].pixel_values is None else samples[i].pixel_values.shape[0] for i in b) <= 4
    # first fit: sample 3 skips buffer 0 (tiles 3 + 2 > 4) and joins buffer 1; sample 5 fills buffer 0
    assert plan == [[0, 5], [1, 3], [2], [4]]


def test_collator_rows_positions_and_skips():
    collate = PackedStepCollator(pad_id=0, tile_size=224, max_tokens=1024, max_tiles=4)
    step = collate([_sample(900, 3), _sample(100, 0), _sample(2000, 0), _sample(10, 5)])
    assert [s.reason for s in step.skipped] == ["too_long", "too_many_tiles"]
    (mb,) = step.micro_batches
    assert mb.input_ids.shape == (1, 1000) and mb.pixel_values.shape[0] == 3
    assert mb.cu_seq_lens.tolist() == [0, 900, 1000] and mb.max_length == 900
    assert mb.position_ids[0, 899] == 899 and mb.position_ids[0, 900] == 0  # restart per sample
    assert mb.sample_index[0, 899] == 0 and mb.sample_index[0, 900] == 1
    assert mb.labels[0, 900] == IGNORE_INDEX  # no target across the sample boundary


def test_sdpa_backend_isolates_samples():
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    out = varlen_causal_attention(q, k, v, cu, 8, backend="sdpa")
    assert document_ids(cu, 20).tolist() == [0] * 5 + [1] * 7 + [2] * 8
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk, vv = (t[a:b].repeat_interleave(2, dim=1).transpose(0, 1) for t in (k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(q[a:b].transpose(0, 1), kk, vv, is_causal=True)
        torch.testing.assert_close(out[a:b], ref.transpose(0, 1), rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def tiny():
    cfg = compose_config(["model.attention=sdpa"])
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, seed=0).eval()  # eval: no drop path; gradients still flow
    v = cfg.model.vision
    data = MixtureDataset(cfg.data, tok, tokens_per_tile(v.image_size, v.patch_size, cfg.model.downsample_ratio))
    # images (1..several tiles), multi-image and text-only samples
    samples = [data[i] for i in range(10)]
    assert all(isinstance(s, EncodedSample) for s in samples)
    assert any(s.pixel_values is None for s in samples) and any(s.pixel_values is not None for s in samples)
    return cfg, tok, model, samples


def _loss_and_grads(module, batches):
    module.model.zero_grad(set_to_none=True)
    num = 0.0
    for mb in batches:
        num = num + module.objective(module.model, mb).total
    loss = num / module.objective.step_weight(Step(micro_batches=list(batches)))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("power", [0.0, 1.0, 0.5], ids=["token", "sample", "square"])
def test_packed_equals_one_by_one(tiny, power):
    cfg, tok, model, samples = tiny
    module = VLMTrainingModule(model, CrossEntropyObjective(PowerWeighting(power)), cfg.optim, cfg.stage)
    ref_loss, ref_grads = _loss_and_grads(
        module, [pad_batch([s], tok.pad_token_id, cfg.data.tile_size) for s in samples]
    )
    # a budget that packs several samples per row, over more than one row
    budget = max(len(s) for s in samples) + 200
    step = PackedStepCollator(tok.pad_token_id, cfg.data.tile_size, max_tokens=budget, max_tiles=48)(samples)
    assert not step.skipped and 1 < len(step.micro_batches) < len(samples)
    loss, grads = _loss_and_grads(module, step.micro_batches)

    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    assert grads.keys() == ref_grads.keys()
    assert len(grads) == len(list(model.parameters()))  # every parameter: ViT, projector, LLM, head
    for k in grads:
        scale = ref_grads[k].abs().max().clamp(min=1.0)
        torch.testing.assert_close(grads[k] / scale, ref_grads[k] / scale, rtol=RTOL, atol=ATOL, msg=k)


def test_collators_from_config():
    cfg = compose_config(["data/collate=packed"])
    collate = instantiate(cfg.data.collate, pad_id=0, tile_size=224)
    assert isinstance(collate, PackedStepCollator) and (collate.max_tokens, collate.max_tiles) == (16384, 48)
    cfg = compose_config(["data.micro_batch_size=3"])  # padded is the default
    collate = instantiate(cfg.data.collate, pad_id=0, tile_size=224)
    assert isinstance(collate, StepCollator) and collate.micro_batch_size == 3


def test_activation_checkpointing_keeps_loss_and_gradients(tiny):
    cfg, tok, _, samples = tiny
    step = PackedStepCollator(tok.pad_token_id, cfg.data.tile_size)(samples[:4])
    results = []
    for parts in ([], ["vision_tower", "language_model"]):
        ckpt_cfg = compose_config(["model.attention=sdpa", f"model.gradient_checkpointing=[{','.join(parts)}]"])
        model = build_model(ckpt_cfg.model, tok, seed=0)  # train mode: transformers checkpoints only then
        assert model.model.language_model.is_gradient_checkpointing == bool(parts)
        assert model.model.vision_tower.is_gradient_checkpointing == bool(parts)
        module = VLMTrainingModule(model, CrossEntropyObjective(PowerWeighting(0.5)), cfg.optim, cfg.stage)
        results.append(_loss_and_grads(module, step.micro_batches))
    (loss, grads), (ckpt_loss, ckpt_grads) = results
    torch.testing.assert_close(ckpt_loss, loss, rtol=RTOL, atol=ATOL)
    for k in grads:
        torch.testing.assert_close(ckpt_grads[k], grads[k], rtol=RTOL, atol=ATOL, msg=k)


def test_partial_checkpointing_checkpoints_a_share_of_the_blocks_and_keeps_gradients(tiny):
    cfg, tok, _, samples = tiny
    step = PackedStepCollator(tok.pad_token_id, cfg.data.tile_size)(samples[:4])
    results = []
    for parts in ("[]", "[vision_tower:0.5,language_model:0.34]"):
        model = build_model(compose_config(["model.attention=sdpa", f"model.gradient_checkpointing={parts}"]).model,
                            tok, seed=0)
        flags = {name: [b.gradient_checkpointing for b in blocks] for name, blocks in
                 (("vit", model.model.vision_tower.encoder.layer), ("llm", model.model.language_model.layers))}
        module = VLMTrainingModule(model, CrossEntropyObjective(PowerWeighting(0.5)), cfg.optim, cfg.stage)
        results.append(_loss_and_grads(module,
                                       step.micro_batches))
    n_vit, n_llm = len(flags["vit"]), len(flags["llm"])
    assert sum(flags["vit"]) == n_vit // 2 and flags["vit"][:2] == [False, True]  # every other layer
    assert sum(flags["llm"]) == int(n_llm * 0.34)
    (loss, grads), (ckpt_loss, ckpt_grads) = results
    torch.testing.assert_close(ckpt_loss, loss, rtol=RTOL, atol=ATOL)
    for k in grads:
        torch.testing.assert_close(ckpt_grads[k], grads[k], rtol=RTOL, atol=ATOL, msg=k)
    for bad, match in (("[vision_tower:0]", "fraction must be in"), ("[vision_tower:x]", "fraction must be in"),
                       ("[projector:0.5]", "cannot be checkpointed")):
        with pytest.raises(ValueError, match=match):
            build_model(compose_config([f"model.gradient_checkpointing={bad}"]).model, tok)


def test_unknown_checkpointing_part_fails_naming_the_key(tiny):
    cfg, tok, _, _ = tiny
    bad = compose_config(["model.gradient_checkpointing=[projector]"])
    with pytest.raises(ValueError, match="model.gradient_checkpointing"):
        build_model(bad.model, tok)


def test_unknown_attention_backend_fails_naming_the_key(tiny):
    cfg, tok, _, _ = tiny
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="model.attention"):  # at compose, naming the key
        build_model(compose_config(["model.attention=flash9"]).model, tok)


def test_auto_backend_skips_flash_kernels_for_float32(monkeypatch):
    """On a GPU with the flash kernels, a float32 run (hardware.precision=32-true) once failed in
    varlen_attn ("FlashAttention only support fp16 and bf16"): auto now picks the first backend that
    takes the dtype, and naming a flash backend for float32 is an error naming the key."""
    import dataclasses

    from vlmtrain.models import attention

    everywhere = {n: dataclasses.replace(b, available=lambda device: True) for n, b in attention.BACKENDS.items()}
    monkeypatch.setattr(attention, "BACKENDS", everywhere)
    monkeypatch.setattr(attention, "_AVAILABLE", {})
    monkeypatch.setattr(attention, "_AUTO", {})
    monkeypatch.setattr(attention, "_varlen_params", lambda: frozenset())
    cpu = torch.device("cpu")
    assert attention.resolve_backend("auto", cpu, torch.bfloat16).name == "flash_attn"
    assert attention.resolve_backend("auto", cpu, torch.float16).name == "flash_attn"
    assert attention.resolve_backend("auto", cpu, torch.float32).name == "flex"
    assert attention.resolve_backend("varlen", cpu, torch.bfloat16).name == "varlen"
    with pytest.raises(ValueError, match="model.attention='varlen' runs in float16/bfloat16 only"):
        attention.resolve_backend("varlen", cpu, torch.float32)


@pytest.mark.slow
def test_compiled_blocks_keep_loss_and_gradients(tiny):
    """model.compile (regional torch.compile, dynamic shapes): the same loss and gradients as eager
    on two buffers of different lengths and tile counts."""
    from torch._dynamo.utils import counters

    cfg, tok, _, samples = tiny
    steps = [PackedStepCollator(tok.pad_token_id, cfg.data.tile_size)(part) for part in (samples[:4], samples[4:7])]
    assert steps[0].micro_batches[0].input_ids.shape != steps[1].micro_batches[0].input_ids.shape
    results = {}
    torch._dynamo.reset()
    for parts in ((), ("vision_tower", "language_model")):
        model = build_model(compose_config(["model.attention=sdpa", f"model.compile=[{','.join(parts)}]"]).model,
                            tok, seed=0)
        module = VLMTrainingModule(model, CrossEntropyObjective(PowerWeighting(0.5)), cfg.optim, cfg.stage)
        results[parts] = [_loss_and_grads(module, step.micro_batches) for step in steps]
    assert counters["stats"]["unique_graphs"] >= 2  # the ViT block and the LLM block were compiled
    for (loss, grads), (compiled_loss, compiled_grads) in zip(*results.values()):
        torch.testing.assert_close(compiled_loss, loss, rtol=RTOL, atol=ATOL)
        for k in grads:
            scale = grads[k].abs().max().clamp(min=1.0)
            torch.testing.assert_close(compiled_grads[k] / scale, grads[k] / scale, rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.slow
def test_compiled_packed_decoder_compiles_once(tiny, monkeypatch):
    """Compiled decoder layers with packed attention: one graph serves every layer and the next step
    on the same buffer. The backend tables are filled at model build, outside traced code; filled on
    the first traced call, they made dynamo guard on them and compile the second layer again."""
    from torch._dynamo.utils import counters

    from vlmtrain.models import attention

    monkeypatch.setattr(attention, "_AVAILABLE", {})
    monkeypatch.setattr(attention, "_AUTO", {})
    cfg, tok, _, samples = tiny
    step = PackedStepCollator(tok.pad_token_id, cfg.data.tile_size)(samples[:4])
    torch._dynamo.reset()
    counters.clear()  # process-wide totals: earlier tests compiled too
    model = build_model(compose_config(["model.compile=[language_model]"]).model, tok, seed=0)
    module = VLMTrainingModule(model, CrossEntropyObjective(PowerWeighting(0.5)), cfg.optim, cfg.stage)
    for _ in range(2):
        _loss_and_grads(module, step.micro_batches)
        assert counters["stats"]["unique_graphs"] == 1


def test_unknown_compile_part_fails_naming_the_key(tiny):
    _, tok, _, _ = tiny
    with pytest.raises(ValueError, match="model.compile"):
        build_model(compose_config(["model.compile=[multi_modal_projector]"]).model, tok)


def test_packed_max_length_is_a_power_of_two_bound():
    from vlmtrain.models.attention import packed_kwargs

    cu = torch.tensor([0, 300, 1000], dtype=torch.int32)
    assert [packed_kwargs(cu, n)["max_length_q"] for n in (1, 2, 700, 1024, 1025)] == [1, 2, 1024, 1024, 2048]
