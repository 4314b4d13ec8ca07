"""Opt-in speed levers of the model (issue 21): fused ViT q/k/v projections and op-level selective
activation checkpointing. Each keeps the model's function and its state-dict layout (checkpoints and
exports are the same with and without it); ``configure_training`` applies them from the config."""

from __future__ import annotations

import functools
from types import MethodType

import torch
from torch import nn
from transformers.models.internvl.modeling_internvl import (
    ALL_ATTENTION_FUNCTIONS,
    InternVLForConditionalGeneration,
    eager_attention_forward,
)

from vlmtrain.errors import UserError

# -- fused ViT q/k/v -----------------------------------------------------------------------------------


def fuse_vit_qkv(model) -> int:
    """One (3d x d) matmul per ViT layer for q, k and v instead of three: each attention's
    ``q_proj``/``k_proj``/``v_proj`` become one ``qkv`` Linear. The state dict keeps the three
    names (split on save, fused on load), so checkpoints, exports and LoRA-free loading are
    unchanged. InternViT only (its attention's forward is the one replaced): other families' ViTs
    (CLIP, EVA, EVA2-CLIP) are refused. Returns the number of layers fused."""
    if not isinstance(model, InternVLForConditionalGeneration):
        raise UserError(f"model.fuse_vit_qkv=true: InternVL's ViT only; {type(model).__name__} keeps its q/k/v "
                        "(set model.fuse_vit_qkv=false)")
    n = 0
    for layer in model.model.vision_tower.encoder.layer:
        attn = layer.attention
        if hasattr(attn, "qkv"):
            continue
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        qkv = nn.Linear(q.in_features, q.out_features + k.out_features + v.out_features, bias=q.bias is not None,
                        device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if q.bias is not None:
                qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        qkv.weight.requires_grad_(q.weight.requires_grad)
        if qkv.bias is not None:
            qkv.bias.requires_grad_(q.bias.requires_grad)
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.qkv = qkv
        attn.forward = MethodType(_fused_attention_forward, attn)
        attn.register_state_dict_post_hook(_split_qkv_keys)
        attn.register_load_state_dict_pre_hook(_fuse_qkv_keys)
        n += 1
    return n


def _fused_attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    """transformers' ``InternVLVisionAttention.forward`` with the three projections as one."""
    b, s, _ = hidden_states.size()
    q, k, v = self.qkv(hidden_states).split(self.embed_dim, dim=-1)
    q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scale, is_causal=False, **kwargs)
    out = self.projection_dropout(self.projection_layer(out.reshape(b, s, self.embed_dim)))
    return out, weights


def _split_qkv_keys(module, state_dict, prefix, local_metadata):
    for kind in ("weight", "bias"):
        key = f"{prefix}qkv.{kind}"
        if key in state_dict:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), state_dict.pop(key).chunk(3)):
                state_dict[f"{prefix}{name}.{kind}"] = part


def _fuse_qkv_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for kind in ("weight", "bias"):
        names = [f"{prefix}{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj")]
        if all(n in state_dict for n in names):
            state_dict[f"{prefix}qkv.{kind}"] = torch.cat([state_dict.pop(n) for n in names])


# -- selective activation checkpointing ---------------------------------------------------------------


@functools.cache
def _saved_ops() -> frozenset:
    """Ops whose outputs selective checkpointing keeps: the matmuls and the attention kernels
    (costly to recompute); everything else (norms, activations, residual adds, casts: cheap and
    memory-heavy) is recomputed in backward."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_flash_attention_forward", "_efficient_attention_forward", "_scaled_dot_product_flash_attention_for_cpu")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_forward(forward, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _policy), **kwargs)


def set_selective_checkpointing(model, parts, blocks: dict, full: list) -> int:
    """Op-level selective activation checkpointing of every block of the named parts: in backward
    the block's element-wise work is recomputed, its matmul and attention outputs are kept (less
    memory than no checkpointing, far less recompute than whole-block checkpointing). ``full``:
    the ``model.gradient_checkpointing`` entries (a part cannot be in both). Returns the blocks wrapped."""
    unknown = set(parts) - set(blocks)
    if unknown:
        raise UserError(f"model.selective_checkpointing: {sorted(unknown)} cannot be checkpointed; "
                        f"choose from {sorted(blocks)}")
    both = set(parts) & {str(e).partition(":")[0] for e in full}
    if both:
        raise UserError(f"model.selective_checkpointing and model.gradient_checkpointing both name {sorted(both)}")
    n = 0
    for part in parts:
        for block in blocks[part]:
            block.forward = functools.partial(_selective_forward, block.forward)
            n += 1
    return n
