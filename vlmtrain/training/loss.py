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


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, w: torch.Tensor):
    logits = F.linear(hidden, weight).float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (ce * w).sum()


def _ce_sum_and_tokens(hidden, weight, targets, w):
    ce = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    return (ce * w).sum(), ce.detach()


def weighted_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int = 4096,
    return_token_ce: bool = False,
):
    """sum(w * CE) over the given positions, never holding more than one chunk of logits.

    hidden: (N, D) hidden states of the supervised positions only; targets: (N,); weights: (N,).
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
        if torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad):
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
