"""Low-precision compute weights with an fp32 master copy (``model.compute_dtype: bfloat16``).

The model's weights live in bf16, so no forward casts them (under fp32 weights, autocast casts every
weight to bf16 in every micro-batch). The optimizer steps fp32 master copies: each bf16 gradient is
added into its master's fp32 gradient the moment backward finishes it (a post-accumulate hook, which
also frees the bf16 gradient), so accumulation over micro-batches happens in fp32; clipping sees the
fp32 gradients; after each step the masters are copied back into the bf16 weights. The masters start
from the bf16 weights (as DeepSpeed's bf16 mode starts from a bf16 checkpoint) and are part of the
optimizer's state dict, so a resumed run continues from the exact fp32 values.

One process only (no DDP / FSDP / DeepSpeed: each owns its gradients); the module checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class MasterWeightOptimizer(torch.optim.Optimizer):
    """``make(groups)``'s optimizer over fp32 masters of ``groups``' low-precision parameters
    (fp32 parameters are their own master). ``param_groups`` and ``state`` are the inner
    optimizer's, so schedulers and clipping act on the masters."""

    def __init__(self, groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer]):
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._hooks = []
        master_groups = []
        for g in groups:
            masters = []
            for p in g["params"]:
                if p.dtype == torch.float32:
                    masters.append(p)
                    continue
                m = p.detach().float().clone()
                self.pairs.append((p, m))
                self._hooks.append(p.register_post_accumulate_grad_hook(self._accumulate(m)))
                masters.append(m)
            master_groups.append({**g, "params": masters})
        self.inner = make(master_groups)
        super().__init__([m for g in master_groups for m in g["params"]], dict(self.inner.defaults))
        self.param_groups, self.state, self.defaults = self.inner.param_groups, self.inner.state, self.inner.defaults

    @staticmethod
    def _accumulate(master: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

        return hook

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.inner.step()
        if self.pairs:
            torch._foreach_copy_([p for p, _ in self.pairs], [m for _, m in self.pairs])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for p, _ in self.pairs:
            p.grad = None

    def state_dict(self) -> dict:
        state = self.inner.state_dict()
        state["master_weights"] = [m for _, m in self.pairs]
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        self.inner.load_state_dict(state_dict)
        if masters is not None:
            if len(masters) != len(self.pairs):
                raise ValueError(f"the checkpoint has {len(masters)} master weights, the model {len(self.pairs)}")
            for (p, m), saved in zip(self.pairs, masters):
                m.copy_(saved)
                p.copy_(m)
        self.param_groups, self.state = self.inner.param_groups, self.inner.state
