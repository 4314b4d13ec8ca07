"""What a data config holds, per dataset, before spending GPU hours on it: what `vlmtrain stats`
prints (``vlmtrain.cli.stats``; ``python -m vlmtrain.stats`` is the same).

    vlmtrain stats data=single data.path=train.jsonl
    vlmtrain stats data=single data.path=meta.json stats.plot=stats.png

Per dataset: lines, lines after the repeat factor and share of the mixture, a histogram of tiles
per sample, token-length percentiles, supervised tokens, and rejected lines by reason. Every line
is converted, tiled and tokenised as training would, but image sizes come from file headers and
video lengths from frame counts: no pixel is decoded, so a large mixture takes minutes, not hours.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from vlmtrain.data.mixture import Skipped

PERCENTILES = (50, 90, 99)


@dataclass
class StatsOptions:
    plot: str | None = None
    """Save a figure of tile and token-length distributions to this .png."""
    max_lines: int | None = None
    """Look at only the first N lines of each dataset (None: all)."""


@dataclass
class DatasetStats:
    name: str
    format: str
    lines: int
    lines_after_repeat: int
    measured: int = 0
    tiles: Counter = field(default_factory=Counter)
    lengths: list = field(default_factory=list)
    supervised: list = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    truncated: int = 0
    examples: dict = field(default_factory=dict)
    """reason -> the first rejected line's location and message."""


def collect(dataset, max_lines: int | None = None) -> list[DatasetStats]:
    out = []
    for source in dataset.sources:
        st = DatasetStats(source.name, source.format, len(source.records), len(source.indices))
        n = len(source.records) if max_lines is None else min(max_lines, len(source.records))
        for line in range(n):
            s = dataset.load_line(source, line, random.Random(f"stats:{line}"), pixels=False)
            st.measured += 1
            if isinstance(s, Skipped):
                st.rejected[s.reason] += 1
                st.examples.setdefault(s.reason, f"{s.where}: {s.message}")
                continue
            st.tiles[sum(s.num_tiles)] += 1
            st.lengths.append(len(s))
            st.supervised.append(s.num_supervised)
            st.truncated += int(s.truncated)
        out.append(st)
    return out


def report(stats: list[DatasetStats]) -> str:
    total = sum(s.lines_after_repeat for s in stats) or 1
    lines = []
    for s in stats:
        lines.append(f"== {s.name} ({s.format})")
        lines.append(f"  lines: {s.lines}   after repeat: {s.lines_after_repeat}   "
                     f"share of mixture: {100 * s.lines_after_repeat / total:.1f}%"
                     + (f"   (measured the first {s.measured})" if s.measured < s.lines else ""))
        if s.lengths:
            pct = np.percentile(s.lengths, PERCENTILES)
            lines.append("  tokens: " + "  ".join(f"p{p} {v:.0f}" for p, v in zip(PERCENTILES, pct))
                         + f"  max {max(s.lengths)}  mean {np.mean(s.lengths):.1f}")
            lines.append(f"  supervised tokens: mean {np.mean(s.supervised):.1f}  min {min(s.supervised)}  "
                         f"max {max(s.supervised)}")
            lines.append("  tiles per sample: " + "  ".join(f"{k}:{v}" for k, v in sorted(s.tiles.items())))
        if s.truncated:
            lines.append(f"  truncated to max_seq_len (text turns dropped): {s.truncated}")
        good = s.measured - sum(s.rejected.values())
        lines.append(f"  usable: {good}   rejected: {sum(s.rejected.values())}")
        for reason, count in s.rejected.most_common():
            lines.append(f"    {reason}: {count}   e.g. {s.examples[reason]}")
    return "\n".join(lines)


def plot(stats: list[DatasetStats], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(stats))
    for i, s in enumerate(stats):
        ks = sorted(s.tiles)
        ax_t.bar([k + i * width for k in ks], [s.tiles[k] for k in ks], width=width, label=s.name)
        if s.lengths:
            ax_l.hist(s.lengths, bins=40, alpha=0.6, label=s.name)
    ax_t.set(title="tiles per sample", xlabel="tiles", ylabel="lines")
    ax_l.set(title="tokens per sample", xlabel="tokens", ylabel="lines")
    ax_t.legend(fontsize=8)
    ax_l.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
