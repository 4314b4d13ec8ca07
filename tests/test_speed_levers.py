"""The opt-in speed levers (issue 21): each keeps the function it speeds up."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from conftest import compose_config
from vlmtrain.data.collate import pad_batch
from vlmtrain.data.encode import EncodedSample
from vlmtrain.models.build import apply_stage, build_model, load_tokenizer
from vlmtrain.training.loss import IGNORE_INDEX
from vlmtrain.training.master_weights import MasterWeightOptimizer
from vlmtrain.training.module import build_optimizer
from vlmtrain.training.objective import build_objective


def tiny_model(*overrides):
    cfg = compose_config(["stage=instruction_tuning", "stage.drop_path=0", *overrides])
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, seed=0)
    apply_stage(model, cfg.stage)
    return cfg, tok, model


def batch(tok, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    samples = []
    for tiles, n in ((1, 20), (2, 12)):
        ids = torch.cat([torch.randint(10, 1000, (3,), generator=g), torch.full((64 * tiles,), ctx),
                         torch.randint(10, 1000, (n,), generator=g)])
        labels = ids.clone()
        labels[: len(ids) - n // 2] = IGNORE_INDEX
        pix = torch.randint(0, 256, (tiles, 3, 224, 224), dtype=torch.uint8, generator=g)
        samples.append(EncodedSample(ids, labels, pix, [tiles], "t"))
    return pad_batch(samples, tok.pad_token_id, 224)


def loss_and_grads(cfg, model, mb):
    objective = build_objective(cfg.stage, cfg.loss)
    model.zero_grad(set_to_none=True)
    num = objective(model, copy.deepcopy(mb)).total
    num.backward()
    return num.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- bf16 compute weights, fp32 master copy ---------------------------------------------------------------


def test_master_weights_step_like_fp32_adamw_on_the_accumulated_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).to(torch.bfloat16)
    ref = [p.detach().float().clone().requires_grad_(True) for p in lin.parameters()]
    make = lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)  # noqa: E731
    opt = MasterWeightOptimizer([{"params": list(lin.parameters())}], make)
    ref_opt = make([{"params": ref}])
    for _ in range(3):
        total = [torch.zeros_like(r) for r in ref]
        for _mb in range(2):  # two micro-batches: the masters accumulate the bf16 gradients in fp32
            x = torch.randn(4, 16, dtype=torch.bfloat16)
            lin(x).float().pow(2).mean().backward()
            assert all(p.grad is None for p in lin.parameters())  # freed into the master
        # the reference gets the same fp32 sum of the bf16 gradients
        for (_, m), t in zip(opt.pairs, total):
            t.copy_(m.grad)
        for r, t in zip(ref, total):
            r.grad = t.clone()
        torch.nn.utils.clip_grad_norm_([m for _, m in opt.pairs], 1.0)
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for (p, m), r in zip(opt.pairs, ref):
            assert m.dtype == torch.float32 and torch.equal(m, r.detach())
            assert torch.equal(p, m.to(torch.bfloat16))
    # the state dict keeps the fp32 masters: a fresh optimizer resumes the exact values
    state = copy.deepcopy(opt.state_dict())
    lin2 = torch.nn.Linear(16, 8).to(torch.bfloat16)
    opt2 = MasterWeightOptimizer([{"params": list(lin2.parameters())}], make)
    opt2.load_state_dict(state)
    assert all(torch.equal(m2, m) for (_, m2), (_, m) in zip(opt2.pairs, opt.pairs))
    assert all(torch.equal(p2, p) for p2, p in zip(lin2.parameters(), lin.parameters()))


def test_compute_dtype_trains_bf16_weights_through_fp32_masters():
    cfg, tok, model = tiny_model("model.compute_dtype=bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    opt, sched = build_optimizer(model, cfg.optim, cfg.stage, 10)
    assert isinstance(opt, MasterWeightOptimizer)
    assert all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _ = loss_and_grads(cfg, model, batch(tok, cfg))
    assert torch.isfinite(loss)
    opt.step()
    sched.step()
    assert sum(not torch.equal(p, before[n]) for n, p in model.named_parameters()) > len(before) // 2
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in opt.pairs)


def test_compute_dtype_rejects_a_non_float_dtype_at_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        tiny_model("model.compute_dtype=int8")
    assert "model.compute_dtype" in str(e.value) + str(e.value.__cause__)


# -- fused ViT q/k/v ----------------------------------------------------------------------------------------


def test_fused_vit_qkv_computes_the_same_and_keeps_the_state_dict():
    cfg, tok, plain = tiny_model()
    _, _, fused = tiny_model("model.fuse_vit_qkv=true")
    attn = fused.model.vision_tower.encoder.layer[0].attention
    assert hasattr(attn, "qkv") and not hasattr(attn, "q_proj")
    sd_plain, sd_fused = plain.state_dict(), fused.state_dict()
    assert sd_plain.keys() == sd_fused.keys()
    assert all(torch.equal(sd_plain[k], sd_fused[k]) for k in sd_plain)
    mb = batch(tok, cfg)
    loss_p, grads_p = loss_and_grads(cfg, plain, mb)
    loss_f, grads_f = loss_and_grads(cfg, fused, mb)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    for i, layer in enumerate(plain.model.vision_tower.encoder.layer):
        a = fused.model.vision_tower.encoder.layer[i].attention
        split = a.qkv.weight.grad.chunk(3)
        for name, g in zip(("q_proj", "k_proj", "v_proj"), split):
            torch.testing.assert_close(g, getattr(layer.attention, name).weight.grad, rtol=1e-4, atol=1e-6)
    # an unfused state dict (a checkpoint, an export) loads into the fused model, strictly
    _, _, other = tiny_model("model.fuse_vit_qkv=true", "seed=1")
    other.load_state_dict(sd_plain, strict=True)
    assert all(torch.equal(v, sd_plain[k]) for k, v in other.state_dict().items())


def test_fused_vit_qkv_is_internvl_only_and_other_levers_serve_every_family():
    """fuse_vit_qkv replaces InternViT's attention forward: another family's ViT is refused in one
    line. Selective checkpointing (the family's blocks) and bf16 compute weights are generic."""
    from vlmtrain.errors import UserError

    with pytest.raises(UserError, match="fuse_vit_qkv=true: InternVL's ViT only; LlavaForConditionalGeneration"):
        tiny_model("model=llava_tiny", "model.fuse_vit_qkv=true")
    _, _, model = tiny_model("model=llava_tiny", "model.selective_checkpointing=[language_model]",
                             "model.compute_dtype=bfloat16")
    assert all(isinstance(b.forward, functools.partial) for b in model.model.language_model.layers)
    assert next(model.parameters()).dtype == torch.bfloat16


# -- selective activation checkpointing -------------------------------------------------------------------


def test_selective_checkpointing_recomputes_elementwise_work_and_keeps_the_gradients():
    cfg, tok, plain = tiny_model()
    _, _, sac = tiny_model("model.selective_checkpointing=[vision_tower,language_model]")
    mb = batch(tok, cfg)
    calls = {"plain": 0, "sac": 0}
    for name, m in (("plain", plain), ("sac", sac)):
        act = m.model.language_model.layers[0].mlp.act_fn

        def count(*_, name=name):
            calls[name] += 1

        act.register_forward_hook(count)
    loss_p, grads_p = loss_and_grads(cfg, plain, mb)
    loss_s, grads_s = loss_and_grads(cfg, sac, mb)
    assert calls == {"plain": 1, "sac": 2}  # the activation ran again in backward
    torch.testing.assert_close(loss_s, loss_p, rtol=0, atol=0)
    assert grads_p.keys() == grads_s.keys()
    for k in grads_p:
        torch.testing.assert_close(grads_s[k], grads_p[k], rtol=1e-5, atol=1e-7)


def test_selective_and_whole_block_checkpointing_of_one_part_is_an_error():
    from vlmtrain.errors import UserError

    with pytest.raises(UserError, match="both name"):
        tiny_model("model.selective_checkpointing=[vision_tower]", "model.gradient_checkpointing=[vision_tower]")
