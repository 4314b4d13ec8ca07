"""Preference optimisation after SFT: InternVL2.5-MPO's mixed loss, with DPO as its special case.

For a pair (x, y_c, y_r), with log-ratios r_c = log pi(y_c|x) - log pi_ref(y_c|x) (sums over the
answer's tokens, its end marker included) and r_r likewise:

    L_DPO = -log sigmoid(beta * (r_c - r_r))                                   (DPO, sigmoid)
    L_BCO = -log sigmoid(beta * r_c - delta) - log sigmoid(-(beta * r_r - delta))
    L_gen = -log pi(y_c|x) / |y_c|                      (the chosen answer's NLL per token)
    L     = w_p * L_DPO + w_q * L_BCO + w_g * L_gen     (MPO: w_p 0.8, w_q 0.2, w_g 1; beta 0.1)

averaged over the step's pairs on every rank (``step_weight`` = pairs). ``stage=dpo`` is the
same objective with w_q = w_g = 0. delta is BCO's reward shift: the running mean, over the optimizer
steps so far, of each step's mean reward beta * r (chosen and rejected together) — TRL's
``bco_pair`` keeps the same running mean of batch means (its ``RunningMoments``); here it is
updated after each step from that step's rewards summed over all ranks and micro-batches, so a step
uses the mean of the steps before it (0 at the first step) and gradient accumulation or the number
of ranks do not change it. It is objective state, kept in the checkpoint (exact resume).

The reference pi_ref is a component (``stage/reference`` group, picked by file):
``CopyReference`` (a frozen copy of the starting policy), ``AdapterReference`` (a LoRA run's base
model: the policy with its adapters off, no copy) or ``PrecomputedReference`` (log-probs computed in
a first pass and stored beside the data, no second model). The data side encodes a pair's images
once (``Batch.tile_index``): the vision tower runs once per micro-batch for both answers.

Logged (names as TRL's DPOTrainer logs them): rewards/chosen, rewards/rejected (beta * r),
rewards/accuracies (share of pairs with r_c > r_r), rewards/margins, logps/chosen, logps/rejected,
and each term, loss/dpo, loss/bco, loss/sft, plus bco/delta.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from vlmtrain.data.collate import Batch, Step
from vlmtrain.errors import UserError
from vlmtrain.models.family import family_of
from vlmtrain.training.loss import per_sample_cross_entropy
from vlmtrain.training.objective import LossTerms, Objective, supervised_hidden


def sample_logps(model, mb: Batch) -> torch.Tensor:
    """(num_samples,) log-probability of each sample's supervised tokens (its answer) under ``model``."""
    hidden, targets, samples = supervised_hidden(model, mb)
    head = family_of(model).lm_head(model)
    return -per_sample_cross_entropy(hidden, head, targets, samples, len(mb.num_supervised))


def pair_logps(logps: torch.Tensor, mb: Batch) -> torch.Tensor:
    """(num_pairs, 2) (chosen, rejected) of per-sample values."""
    return logps[mb.pairs] if mb.pairs is not None else logps.new_zeros(0, 2)


def dpo_sigmoid(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss (sigmoid): -log sigmoid(beta * (r_c - r_r))."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def bco_pair(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
             delta: float | torch.Tensor) -> torch.Tensor:
    """Per-pair BCO loss: -log sigmoid(beta * r_c - delta) - log sigmoid(-(beta * r_r - delta))."""
    return -F.logsigmoid(beta * chosen_logratios - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))


# -- references ---------------------------------------------------------------------------------------


class Reference:
    """Where pi_ref's log-probs come from."""

    def setup(self, model) -> torch.nn.Module | None:
        """Called once with the policy before training; returns a module to hold (a frozen copy)."""
        return None

    def __call__(self, model, mb: Batch) -> torch.Tensor:
        """(num_pairs, 2) detached reference log-probs of (chosen, rejected)."""
        raise NotImplementedError


class CopyReference(Reference):
    """A frozen copy of the policy as training starts (``init_from``'s weights): no gradients, no
    optimizer state. The training module holds it as a submodule, so it moves to the device, is
    sharded like the policy (FSDP2 shards it in ``configure_model``, ZeRO-3 partitions it with the
    module) and its weights are in the checkpoint (a resumed run keeps the same reference)."""

    def __init__(self):
        self.module = None

    def setup(self, model):
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        return self.module

    def __call__(self, model, mb: Batch) -> torch.Tensor:
        if self.module is None:
            raise RuntimeError("CopyReference.setup was not called")
        with torch.no_grad():
            return pair_logps(sample_logps(self.module, mb), mb).detach()


class AdapterReference(Reference):
    """Under LoRA: the policy's base model, its adapters switched off for the reference forward (no
    copy, no extra memory). Exact only when nothing but adapters trains (``stage.trainable: []``):
    a fully trained part would move the reference too, so that is refused."""

    def setup(self, model):
        from vlmtrain.models.lora import has_lora
        from vlmtrain.models.run_checkpoint import is_lora_key

        if not has_lora(model):
            raise UserError("stage/reference=adapter needs a LoRA stage (stage.lora set), e.g. stage=mpo_lora")
        trained = sorted({n.split(".")[1] if n.startswith("model.") else n.split(".")[0]
                          for n, p in model.named_parameters() if p.requires_grad and not is_lora_key(n)})
        if trained:
            raise UserError(f"stage/reference=adapter: parts {trained} train fully, so the base model is no fixed "
                            "reference; set stage.trainable=[] or use stage/reference=copy")
        return None

    def __call__(self, model, mb: Batch) -> torch.Tensor:
        from vlmtrain.models.lora import adapters_disabled

        with torch.no_grad(), adapters_disabled(model):
            return pair_logps(sample_logps(model, mb), mb).detach()


class PrecomputedReference(Reference):
    """Log-probs computed once by the reference checkpoint and stored beside the data
    (``<data>.ref.jsonl``, written by ``vlmtrain pairs ... pairs.mode=reference``): no second model
    and no reference forward in training. The inputs must be those of the first pass: turn JPEG
    re-encoding off (``jpeg_augment: false``) and keep the template and tiling."""

    def __call__(self, model, mb: Batch) -> torch.Tensor:
        if mb.pairs is None or not len(mb.pairs):
            return torch.zeros(0, 2, device=mb.input_ids.device)
        if mb.ref_logps is None:
            raise UserError("stage/reference=precomputed: a pair has no precomputed reference log-probs beside its "
                            "data (<data>.ref.jsonl): run `vlmtrain pairs ckpt=<reference run> data=... "
                            "pairs.mode=reference` first")
        return mb.ref_logps.to(mb.input_ids.device, torch.float32)


# -- the objective ------------------------------------------------------------------------------------


STATS = ("pairs", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
         "logps/chosen", "logps/rejected", "loss/dpo", "loss/bco", "loss/sft")


class PreferenceObjective(Objective):
    def __init__(self, reference: Reference, beta: float = 0.1, dpo_weight: float = 0.8, bco_weight: float = 0.2,
                 sft_weight: float = 1.0):
        if beta <= 0:
            raise UserError(f"stage.objective.beta must be > 0, got {beta}")
        if min(dpo_weight, bco_weight, sft_weight) < 0 or dpo_weight + bco_weight + sft_weight <= 0:
            raise UserError("stage.objective: the loss weights must be >= 0, and not all 0")
        self.reference = reference
        self.beta = float(beta)
        self.weights = {"dpo": float(dpo_weight), "bco": float(bco_weight), "sft": float(sft_weight)}
        self.delta = torch.zeros((), dtype=torch.float64)
        """BCO's reward shift: the running mean of the steps' mean rewards."""
        self.delta_steps = torch.zeros((), dtype=torch.int64)

    def setup(self, model):
        return self.reference.setup(model)

    def step_weight(self, step: Step) -> torch.Tensor:
        pairs = sum(0 if mb.pairs is None or mb.zero_weight else len(mb.pairs) for mb in step.micro_batches)
        return torch.tensor(float(pairs))

    def __call__(self, model, mb: Batch, per_sample: bool = False) -> LossTerms:
        if mb.pairs is None and not mb.zero_weight:
            raise UserError("a preference stage (stage=mpo, dpo, mpo_lora) needs preference data: jsonl lines with "
                            "chosen and rejected (format preference); see `vlmtrain pairs`")
        ref = self.reference(model, mb)  # before the policy: the adapter reference toggles the model
        logps = sample_logps(model, mb)
        policy = pair_logps(logps, mb)
        dev = logps.device
        if not len(policy):  # a filler micro-batch: the graph runs, nothing counts
            return LossTerms(logps.sum() * 0.0, stats={k: torch.zeros((), device=dev) for k in STATS})
        assert mb.pairs is not None
        counts = mb.num_supervised.to(dev)[mb.pairs[:, 0]].clamp(min=1).float()
        ratios = policy - ref
        dpo = dpo_sigmoid(ratios[:, 0], ratios[:, 1], self.beta)
        bco = bco_pair(ratios[:, 0], ratios[:, 1], self.beta, self.delta.to(dev, torch.float32))
        sft = -policy[:, 0] / counts
        w = self.weights
        total = (w["dpo"] * dpo + w["bco"] * bco + w["sft"] * sft).sum()
        rewards = self.beta * ratios.detach()
        stats = {
            "pairs": torch.tensor(float(len(policy)), device=dev),
            "rewards/chosen": rewards[:, 0].sum(),
            "rewards/rejected": rewards[:, 1].sum(),
            "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).float().sum(),
            "rewards/margins": (rewards[:, 0] - rewards[:, 1]).sum(),
            "logps/chosen": policy[:, 0].detach().sum(),
            "logps/rejected": policy[:, 1].detach().sum(),
            "loss/dpo": dpo.detach().sum(),
            "loss/bco": bco.detach().sum(),
            "loss/sft": sft.detach().sum(),
        }
        return LossTerms(total, stats=stats)

    def metrics(self, stats, weight):
        n = stats["pairs"].clamp(min=1)
        out = {k: stats[k] / n for k in STATS if k != "pairs"}
        out["bco/delta"] = self.delta.float()
        return out

    def end_step(self, stats) -> None:
        """delta <- the running mean of the steps' mean rewards, this step's included."""
        pairs = float(stats["pairs"])
        if pairs <= 0:
            return
        mean = (float(stats["rewards/chosen"]) + float(stats["rewards/rejected"])) / (2 * pairs)
        n = int(self.delta_steps)
        self.delta = (self.delta * n + mean) / (n + 1)
        self.delta_steps = self.delta_steps + 1

    def state_dict(self) -> dict:
        return {"bco_delta": self.delta.clone(), "bco_steps": self.delta_steps.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.delta = torch.as_tensor(state["bco_delta"], dtype=torch.float64).clone()
        self.delta_steps = torch.as_tensor(state["bco_steps"], dtype=torch.int64).clone()
