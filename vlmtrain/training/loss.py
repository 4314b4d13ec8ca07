"""Loss reweighting and the weighted, chunked cross-entropy.

InternVL 2.5 weighs every supervised token of a sample with x supervised tokens by f(x):
token averaging f = 1, sample averaging f = 1/x, square averaging f = 1/sqrt(x). The loss of an
optimizer step is sum(w * CE) / sum(w) over every supervised token of the step (all micro-batches
of the accumulation window on all ranks), so this module returns the numerator and the weights
separately and the caller divides once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PowerWeighting:
    """f(x) = x ** -power: token 0, square 0.5, sample 1."""

    power: float

    def __call__(self, num_supervised: torch.Tensor) -> torch.Tensor:
        x = num_supervised.to(torch.float64).clamp(min=1)
        return (x ** -self.power).to(torch.float32)


def token_weights(weighting, num_supervised: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """Per-token weights from per-sample supervised counts; sample_index maps tokens to samples."""
    return weighting(num_supervised)[sample_index]


ALIGN = 8
"""Vocabulary rows are padded to a multiple of this for the head's matmul: with an odd vocabulary
(InternLM2's 92553) the rows of logits are not 16-byte aligned and cuBLAS falls back to a much
slower kernel (on H200 it took 7% of the 2b model's matmul time, for well under 1% of its FLOPs)."""


def _direct_weight(head) -> torch.Tensor | None:
    """The head's weight if it may be used outside the head's own forward: a bare tensor or a
    bias-free nn.Linear that no FSDP2 unit or ZeRO-3 partition manages."""
    if isinstance(head, torch.Tensor):
        return head
    from torch.distributed.fsdp import FSDPModule

    if type(head) is nn.Linear and head.bias is None and not isinstance(head, FSDPModule) \
            and not hasattr(head.weight, "ds_id"):
        return head.weight
    return None


def _logits(hidden: torch.Tensor, head) -> torch.Tensor:
    weight = _direct_weight(head)
    if weight is None:
        # a module head runs through its own forward, so sharded strategies (FSDP2, ZeRO-3) gather it
        return head(hidden).float()
    vocab = weight.shape[0]
    if vocab % ALIGN == 0:
        return F.linear(hidden, weight).float()
    # zero rows make the rows of logits aligned; a -inf bias keeps them out of the softmax (their
    # probability and gradient are exactly 0), so the loss and every gradient are unchanged
    pad = ALIGN - vocab % ALIGN
    bias = torch.zeros(vocab + pad, dtype=weight.dtype, device=weight.device)
    bias[vocab:] = float("-inf")
    return F.linear(hidden, F.pad(weight, (0, 0, 0, pad)), bias).float()


def _ce_sum(hidden: torch.Tensor, head, targets: torch.Tensor, w: torch.Tensor):
    return (F.cross_entropy(_logits(hidden, head), targets, reduction="none") * w).sum()


def _ce_sum_and_tokens(hidden, head, targets, w):
    ce = F.cross_entropy(_logits(hidden, head), targets, reduction="none")
    return (ce * w).sum(), ce.detach()


def _zero3_partitioned(head) -> bool:
    """DeepSpeed ZeRO-3 does not re-gather a module's weight when activation checkpointing
    recomputes it inside backward, so under ZeRO-3 the chunks keep their logits for backward
    (more memory: supervised tokens x vocab, instead of one chunk) and DeepSpeed's own hooks
    gather the head for forward and backward."""
    return isinstance(head, nn.Module) and hasattr(head.weight, "ds_id")


def weighted_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | nn.Module,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int = 4096,
    return_token_ce: bool = False,
):
    """sum(w * CE) over the given positions, never holding more than one chunk of logits.

    hidden: (N, D) hidden states of the supervised positions only; targets: (N,); weights: (N,).
    lm_head_weight: the (V, D) output matrix, or the LM head module itself (needed under FSDP2 and
    ZeRO-3, where its weight is only whole inside its forward).
    Each chunk's logits are recomputed in backward (activation checkpointing), so peak memory is
    one chunk of (chunk_size x vocab) floats instead of (N x vocab).
    With ``return_token_ce`` also the detached per-position CE (N,), for per-dataset metrics.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    fn = _ce_sum_and_tokens if return_token_ce else _ce_sum
    token_ce = []
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hidden[sl], lm_head_weight, targets[sl], weights[sl])
        head_grad = (any(p.requires_grad for p in lm_head_weight.parameters())
                     if isinstance(lm_head_weight, nn.Module) else lm_head_weight.requires_grad)
        if torch.is_grad_enabled() and (hidden.requires_grad or head_grad) and not _zero3_partitioned(lm_head_weight):
            out = checkpoint(fn, *args, use_reentrant=False)
        else:
            out = fn(*args)
        if return_token_ce:
            out, ce = out
            token_ce.append(ce)
        total = total + out
    if return_token_ce:
        return total, torch.cat(token_ce) if token_ce else hidden.new_zeros(0, dtype=torch.float32)
    return total


def per_sample_loss_sums(token_ce: torch.Tensor, weights: torch.Tensor, sample_ids: torch.Tensor,
                         num_samples: int) -> torch.Tensor:
    """(num_samples, 4) rows of (sum w * CE, sum w, sum CE, supervised positions) per sample.

    token_ce, weights, sample_ids: (N,) per supervised position. A dataset's loss is then the sum
    of its samples' first column / the sum of their second: sum(w * CE) / sum(w) restricted to
    its tokens, the same normalisation as the step loss. Columns 3 and 4 give the unweighted
    per-token CE, which compares runs with different reweightings.
    """
    out = torch.zeros(num_samples, 4, dtype=torch.float32, device=token_ce.device)
    out[:, 0].index_add_(0, sample_ids, (weights * token_ce).detach().float())
    out[:, 1].index_add_(0, sample_ids, weights.detach().float())
    out[:, 2].index_add_(0, sample_ids, token_ce.detach().float())
    out[:, 3].index_add_(0, sample_ids, torch.ones_like(token_ce, dtype=torch.float32))
    return out


def _ce_per_sample(hidden, head, targets, samples, num_samples: int):
    ce = F.cross_entropy(_logits(hidden, head), targets, reduction="none")
    return torch.zeros(num_samples, dtype=torch.float32, device=ce.device).index_add(0, samples, ce)


def per_sample_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | nn.Module,
    targets: torch.Tensor,
    sample_ids: torch.Tensor,
    num_samples: int,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """(num_samples,) sums of CE over each sample's given positions, differentiable (minus a
    sequence's log-probability: what preference losses compare), chunked and recomputed in backward
    as ``weighted_cross_entropy`` is, so no more than one chunk of logits is ever held."""
    total = hidden.new_zeros(num_samples, dtype=torch.float32)
    head_grad = (any(p.requires_grad for p in lm_head_weight.parameters())
                 if isinstance(lm_head_weight, nn.Module) else lm_head_weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hidden[sl], lm_head_weight, targets[sl], sample_ids[sl], num_samples)
        if torch.is_grad_enabled() and (hidden.requires_grad or head_grad) and not _zero3_partitioned(lm_head_weight):
            total = total + checkpoint(_ce_per_sample, *args, use_reentrant=False)
        else:
            total = total + _ce_per_sample(*args)
    return total
