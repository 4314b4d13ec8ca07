"""What the training steps put through the model, turned into the numbers users watch.

``StepMeter.count`` runs every step and only adds a few device tensors (no host sync);
``StepMeter.collect`` runs on logging steps (every ``trainer.log_every_n_steps``): it merges the
window since the last log over all ranks (one object gather) and returns throughput, MFU, padding
share, per-dataset loss, skipped samples by reason and GPU memory. ``summary`` is the whole run.
Nothing here imports Lightning; the LightningModule passes in a gather function.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping

import torch

from vlmtrain.data.collate import Batch, Step
from vlmtrain.training.flops import InternVLDims, training_flops
from vlmtrain.training.loss import IGNORE_INDEX

COUNTS = ("samples", "tokens", "slots", "tiles", "sum_sq_len", "supervised")
"""Per-step totals: samples, real tokens, padded token slots, real image tiles, sum over samples
of length**2 (attention cost), supervised positions (LM head and loss)."""

Gather = Callable[[object], list]


def batch_counts(mb: Batch) -> torch.Tensor:
    """COUNTS of one micro-batch as a float64 tensor on its device (no host sync).

    Lengths come from ``sample_index`` over real tokens, so padded rows and packed rows (several
    samples per row) count the same way.
    """
    mask = mb.attention_mask.to(torch.float64)
    num_samples = len(mb.num_supervised)
    lengths = torch.zeros(num_samples, dtype=torch.float64, device=mask.device)
    # padding may carry any sample index (or -1): it adds zero either way
    lengths.index_add_(0, mb.sample_index.clamp(min=0).reshape(-1), mask.reshape(-1))
    tiles = 0 if mb.dummy_vision else mb.pixel_values.shape[0]
    supervised = (mb.labels[:, 1:] != IGNORE_INDEX).sum().to(torch.float64)
    fixed = torch.tensor([len(mb.datasets), 0, mb.attention_mask.numel(), tiles, 0, 0],
                         dtype=torch.float64, device=mask.device)
    fixed[1], fixed[4], fixed[5] = mask.sum(), (lengths * lengths).sum(), supervised
    return fixed


class DatasetLoss:
    """Per-dataset sums over one step: sum(w * CE), sum(w), sum(CE), supervised positions."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, datasets: list[str], per_sample: torch.Tensor) -> None:
        """per_sample: (num_samples, 4) rows from ``per_sample_loss_sums``, in ``datasets`` order."""
        for name, row in zip(datasets, per_sample.tolist()):
            acc = self.sums.setdefault(name, [0.0] * len(row))
            for i, v in enumerate(row):
                acc[i] += v


def merge_sums(parts: list[Mapping[str, list[float]]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for part in parts:
        for name, values in part.items():
            acc = out.setdefault(name, [0.0] * len(values))
            for i, v in enumerate(values):
                acc[i] += v
    return out


class StepMeter:
    def __init__(self, dims: InternVLDims, trainable: Mapping[str, str], world_size: int = 1,
                 peak_flops_per_device: float | None = None):
        self.dims, self.trainable = dims, dict(trainable)
        self.world_size, self.peak = world_size, peak_flops_per_device
        self._window: torch.Tensor | None = None
        self._t_window = None
        self._t_start = None
        self.totals = dict.fromkeys(COUNTS, 0.0)
        self.flops = 0.0
        self.steps = 0
        self.losses: list[tuple[int, float, float]] = []
        """(global step, loss, unweighted token CE) of each logging step."""
        self.dataset_losses: dict[str, float] = {}
        self.dataset_names: set[str] = set()
        self.skipped: dict[str, float] = {}
        self.max_memory_gib = 0.0
        self._skipped_before = Counter()  # restored from a checkpoint: counts before a resume
        self._seconds_before = 0.0

    def state_dict(self) -> dict:
        """Run totals for the checkpoint, so a resumed run's summary covers the whole run."""
        return {"totals": dict(self.totals), "flops": self.flops, "steps": self.steps, "losses": list(self.losses),
                "dataset_losses": dict(self.dataset_losses), "dataset_names": sorted(self.dataset_names),
                "skipped": dict(self.skipped), "max_memory_gib": self.max_memory_gib,
                "train_seconds": self._elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.totals.update(state["totals"])
        self.flops, self.steps = state["flops"], state["steps"]
        self.losses = [tuple(x) for x in state["losses"]]
        self.dataset_losses = dict(state["dataset_losses"])
        self.dataset_names = set(state["dataset_names"])
        self.skipped = dict(state["skipped"])
        self._skipped_before = Counter(state["skipped"])
        self.max_memory_gib = state["max_memory_gib"]
        self._seconds_before = state["train_seconds"]

    def _elapsed(self) -> float:
        now = self._t_window if self._t_window is not None else self._t_start
        return self._seconds_before + ((now - self._t_start) if self._t_start is not None else 0.0)

    def count(self, step: Step) -> None:
        if self._t_start is None:
            self._t_start = self._t_window = time.perf_counter()
        for mb in step.micro_batches:
            if mb.zero_weight:  # a filler micro-batch is no training data
                continue
            c = batch_counts(mb)
            self._window = c if self._window is None else self._window + c.to(self._window.device)
        self.steps += 1

    def flops_of(self, counts: Mapping[str, float]) -> float:
        return training_flops(self.dims, counts["tiles"], counts["tokens"], counts["sum_sq_len"],
                              counts["supervised"], self.trainable)

    def collect(self, gather: Gather, skipped: Counter, dataset_loss: DatasetLoss | None = None,
                loss: float | None = None, global_step: int = 0) -> dict[str, float]:
        """Merge this window over all ranks (every rank must call this on the same step)."""
        now = time.perf_counter()
        local = {
            "counts": [0.0] * len(COUNTS) if self._window is None else self._window.tolist(),
            "datasets": dataset_loss.sums if dataset_loss is not None else {},
            "skipped": dict(skipped),
            "memory": _gpu_memory_gib(),
        }
        parts = gather(local)
        counts = dict(zip(COUNTS, merge_sums([{"c": p["counts"]} for p in parts])["c"]))
        datasets = merge_sums([p["datasets"] for p in parts])
        skipped_all = Counter(self._skipped_before)
        for p in parts:
            skipped_all.update(p["skipped"])
        memory = [max(p["memory"][i] for p in parts) for i in range(2)] if parts[0]["memory"] else None

        dt = max(now - (self._t_window or now), 1e-9)
        flops = self.flops_of(counts)
        for k in COUNTS:
            self.totals[k] += counts[k]
        self.flops += flops
        self._window, self._t_window = None, now

        m = {
            "train/tokens_per_s": counts["tokens"] / dt,
            "train/tokens_per_s_per_gpu": counts["tokens"] / dt / self.world_size,  # the scaling figure
            "train/samples_per_s": counts["samples"] / dt,
            "train/tiles_per_s": counts["tiles"] / dt,
            "train/tflops_per_s_per_device": flops / dt / self.world_size / 1e12,
            "train/padding_share": 1.0 - counts["tokens"] / counts["slots"] if counts["slots"] else 0.0,
            "train/tokens_seen": self.totals["tokens"],
            "train/samples_seen": self.totals["samples"],
        }
        if self.peak:
            m["train/mfu"] = flops / dt / (self.peak * self.world_size)
        if len(parts) > 1:
            # the busiest rank's share over the mean: a step lasts as long as its busiest rank, so
            # 1.3 means the others idled ~23% of it (packing and sample sizes differ per rank)
            for k in ("tokens", "tiles"):
                per_rank = [p["counts"][COUNTS.index(k)] for p in parts]
                mean = sum(per_rank) / len(per_rank)
                if mean > 0:
                    m[f"train/rank_imbalance/{k}"] = max(per_rank) / mean
        if dataset_loss is not None:
            ce_sum = sum(v[2] for v in datasets.values())
            positions = sum(v[3] for v in datasets.values())
            if positions > 0:
                m["train/token_ce"] = ce_sum / positions  # unweighted: comparable across loss=...
            # a dataset seen before but absent from this step logs NaN (a gap), never a stale value
            self.dataset_names.update(name for name, v in datasets.items() if v[1] > 0)
            for name in sorted(self.dataset_names):
                num, weight = datasets.get(name, (0.0, 0.0))[:2]
                m[f"train/loss/{name}"] = num / weight if weight > 0 else float("nan")
                if weight > 0:
                    self.dataset_losses[name] = num / weight
        self.skipped = {r: float(c) for r, c in skipped_all.items()}
        for reason, count in sorted(self.skipped.items()):
            m[f"data/skipped/{reason}"] = count
        m["data/skipped_total"] = float(sum(self.skipped.values()))
        if memory:
            self.max_memory_gib = max(self.max_memory_gib, memory[0])
            m["gpu/max_allocated_gib"], m["gpu/reserved_gib"] = memory
        if loss is not None:
            self.losses.append((global_step, float(loss), m.get("train/token_ce", float("nan"))))
        return m

    def summary(self, last: int = 10) -> dict:
        """The whole run: totals, average throughput and MFU, final losses, skips, memory."""
        wall = self._elapsed()
        out: dict = {
            "steps": self.steps,
            "train_seconds": wall,
            "tokens": self.totals["tokens"],
            "samples": self.totals["samples"],
            "tiles": self.totals["tiles"],
            "padding_share": 1.0 - self.totals["tokens"] / self.totals["slots"] if self.totals["slots"] else 0.0,
            "model_flops": self.flops,
        }
        if wall > 0:
            out.update(tokens_per_s=self.totals["tokens"] / wall, samples_per_s=self.totals["samples"] / wall,
                       tiles_per_s=self.totals["tiles"] / wall,
                       tflops_per_s_per_device=self.flops / wall / self.world_size / 1e12)
            if self.peak:
                out["mfu"] = self.flops / wall / (self.peak * self.world_size)
        if self.losses:
            tail = self.losses[-last:]
            out["first_loss"] = self.losses[0][1]
            out["final_loss"] = sum(v[1] for v in tail) / len(tail)
            out["final_token_ce"] = sum(v[2] for v in tail) / len(tail)
            out["final_loss_steps"] = len(tail)
        out["final_loss_by_dataset"] = dict(sorted(self.dataset_losses.items()))
        out["skipped"] = dict(sorted(self.skipped.items()))
        if self.max_memory_gib:
            out["gpu_max_allocated_gib"] = self.max_memory_gib
        return out


def _gpu_memory_gib() -> list[float] | None:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return [torch.cuda.max_memory_allocated() / 2**30, torch.cuda.memory_reserved() / 2**30]
