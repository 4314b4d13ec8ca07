"""The training objective: what a micro-batch's forward adds to its optimizer step's loss.

The step's loss is a sum over every micro-batch of the step on every rank divided by one number,
the step's weight, which the objective knows from the data before any forward
(``Objective.step_weight``): the training step all-reduces it first and scales each
micro-batch's backward by it, so gradient accumulation, packing and data parallelism all give the
gradient of the one big batch. An objective is the component that says what the sum and the weight
are; the stage config picks it by file (``stage.objective: {_target_: ...}``; unset: SFT's
``CrossEntropyObjective`` with the ``loss`` group's reweighting). The LightningModule and the
benchmarks call it the same way:

    weight = objective.step_weight(step)                     # host, before any forward
    for mb in step.micro_batches:
        terms = objective(model, mb)                         # LossTerms
        (terms.total / weight_over_all_ranks).backward()
    objective.end_step(stats_over_all_ranks)                 # e.g. a running mean it keeps

Nothing here imports Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmtrain.data.collate import Batch, Step
from vlmtrain.errors import UserError
from vlmtrain.models.attention import packed_kwargs
from vlmtrain.models.family import family_of
from vlmtrain.training.loss import per_sample_loss_sums, weighted_cross_entropy


@dataclass
class LossTerms:
    """One micro-batch's share of its step's loss."""

    total: torch.Tensor
    """The numerator: this micro-batch's part of the step's sum (differentiable); the step's loss
    is the sum of ``total`` over its micro-batches and ranks / the step's weight."""
    per_sample: torch.Tensor | None = None
    """Detached (num_samples, 4) rows for the per-dataset loss (``per_sample_loss_sums``), when asked."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached sums for the objective's own metrics and state; the training step adds them over
    the step's micro-batches and ranks and hands them to ``Objective.metrics`` / ``end_step``."""


class Objective:
    """What every objective provides (SFT's is ``CrossEntropyObjective``; preference optimisation's
    is ``vlmtrain.training.preference.PreferenceObjective``)."""

    def setup(self, model) -> torch.nn.Module | None:
        """Called once with the policy before training. A module returned (e.g. a frozen reference
        model) is held by the training module: moved to the device, sharded and checkpointed with it."""
        return None

    def step_weight(self, step: Step) -> torch.Tensor:
        """This rank's share of the step's loss denominator, from the host copy of the data."""
        raise NotImplementedError

    def __call__(self, model, mb: Batch, per_sample: bool = False) -> LossTerms:
        raise NotImplementedError

    def metrics(self, stats: dict[str, torch.Tensor], weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logged values (names without the ``train/`` prefix) from the step's summed ``stats``."""
        return {}

    def end_step(self, stats: dict[str, torch.Tensor]) -> None:
        """After the optimizer step, with the step's stats summed over all ranks."""

    def state_dict(self) -> dict:
        """What a checkpoint must keep for an exact resume (empty: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def hidden_states(model, mb: Batch) -> torch.Tensor:
    """The language model's last hidden states for a micro-batch, (rows, length, hidden)."""
    fam = family_of(model)
    embeds = fam.multimodal_embeddings(model, mb.input_ids, mb.pixel_values, mb.dummy_vision, mb.tile_index,
                                       mb.image_sizes)
    # the data side's token types, for families that route by them (CogVLM's visual expert)
    types = {} if mb.token_type_ids is None else {"token_type_ids": mb.token_type_ids}
    if mb.packed:
        # one packed row: samples attend only to themselves through cu_seq_lens (packed attention)
        return fam.decoder(model)(
            inputs_embeds=embeds, position_ids=mb.position_ids, use_cache=False,
            **packed_kwargs(mb.cu_seq_lens, mb.max_length), **types,
        ).last_hidden_state
    return fam.decoder(model)(
        inputs_embeds=embeds, attention_mask=mb.attention_mask, position_ids=mb.position_ids, use_cache=False,
        **types,
    ).last_hidden_state


def supervised_hidden(model, mb: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states, targets, sample ids) at the supervised positions only: position t predicts
    token t + 1 of the same row."""
    hidden = hidden_states(model, mb)
    pos = mb.supervised_positions
    hidden = hidden.reshape(-1, hidden.shape[-1])[pos]
    targets = mb.labels.reshape(-1)[pos + 1]  # type: ignore[operator]  # collated batches carry positions
    samples = mb.sample_index.reshape(-1)[pos + 1]  # type: ignore[operator]
    return hidden, targets, samples


class CrossEntropyObjective(Objective):
    """SFT: sum(w * CE) / sum(w) over every supervised token of the step, w = weighting(x) for a
    sample with x supervised tokens (the ``loss`` group: token, sample or square averaging)."""

    def __init__(self, weighting):
        self.weighting = weighting

    def step_weight(self, step: Step) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32)
        for mb in step.micro_batches:
            counts = mb.num_supervised
            total += (self.weighting(counts) * counts.clamp(min=0)).sum().to(total.device, torch.float32)
        return total

    def __call__(self, model, mb: Batch, per_sample: bool = False) -> LossTerms:
        if mb.pairs is not None:
            raise UserError("preference data (chosen/rejected pairs) trains with a preference stage: "
                            "stage=mpo, stage=dpo or stage=mpo_lora")
        hidden, targets, samples = supervised_hidden(model, mb)
        w = self.weighting(mb.num_supervised)[samples]
        if per_sample:
            num, ce = weighted_cross_entropy(hidden, family_of(model).lm_head(model), targets, w, return_token_ce=True)
            return LossTerms(num, per_sample_loss_sums(ce, w, samples, len(mb.num_supervised)))
        return LossTerms(weighted_cross_entropy(hidden, family_of(model).lm_head(model), targets, w))


def build_objective(stage_cfg, loss_cfg) -> Objective:
    """The stage's objective (``stage.objective``), else SFT's cross-entropy with ``loss``'s weighting."""
    from hydra.utils import instantiate

    spec = stage_cfg.get("objective") if hasattr(stage_cfg, "get") else getattr(stage_cfg, "objective", None)
    if not spec:
        return CrossEntropyObjective(instantiate(loss_cfg))
    if "_target_" not in spec:
        raise ValueError(f"stage.objective needs a _target_ (got keys {sorted(spec)})")
    return instantiate(spec)
