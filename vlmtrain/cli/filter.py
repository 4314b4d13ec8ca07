"""`vlmtrain filter data=<data config> out=DIR [filter=llm]`: the recipe's data filtering
(``vlmtrain.filtering``).

    vlmtrain filter data=single data.path=train.jsonl out=filtered/
    vlmtrain filter data=demo out=filtered/ filter=llm filter.scorer.path=/ckpt/Qwen2.5-7B-Instruct
    vlmtrain filter data=single data.path=meta.json out=filtered/ filter.slice=3/8   # one slice of 8
    vlmtrain filter data=single data.path=meta.json out=filtered/ filter.merge=only filter.slice=0/8
    python -m vlmtrain hydra.searchpath=[file://$PWD/filtered] data=filtered     # train on what was kept

The data config means what it means for training (the same config tree, readers and meta-file
expansion). Each dataset gets ``DIR/<dataset>/kept.jsonl`` and ``rejected.jsonl``; ``DIR/data/
filtered.yaml`` and ``DIR/meta.json`` point at the kept data with the datasets' settings;
``DIR/report.md`` shows counts, score distributions and examples. ``python -m vlmtrain.filter``
is the same command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from vlmtrain.cli import Command, start
from vlmtrain.config import Choice, TrainConfig, choice
from vlmtrain.filtering.pipeline import run

if TYPE_CHECKING:
    Merge = Choice
else:
    Merge = choice("Merge", ["auto", "only", "never"], __name__)


@dataclass
class FilterOptions:
    rules: dict[str, Any] = field(default_factory=dict)
    """name -> a rule component (``_target_`` and its parameters); null switches one off."""
    scorer: Any | None = None
    """The LLM behind the LLM rules (``filter=llm``): ``vlmtrain.filtering.llm.Scorer`` settings."""
    academic: list[str] = field(default_factory=list)
    """Dataset names (fnmatch patterns) exempt from repetition detection (the report exempts
    academic, high-quality sets); the repetition rules' ``exempt`` lists default to this."""
    slice: str | None = None
    """``i/n``: filter only the i-th of n equal parts of the records (None: all, as 0/1)."""
    merge: Merge = Merge("auto")
    """auto: merge once every slice of n is done (the last slice to finish does it); only: just
    merge (slices already done); never: leave it to a later ``merge=only``."""
    score_rejected: bool = False
    """Ask the LLM about records a heuristic rule already rejected too (costs LLM time)."""
    examples: int = 3
    """Examples of each rule in report.md."""
    progress: bool = True
    """A progress bar with the running rule counts (on stderr)."""


@dataclass
class FilterAppConfig(TrainConfig):
    out: str = MISSING
    """Folder the kept/rejected data, data config, report and slices go to."""
    filter: FilterOptions = field(default_factory=FilterOptions)


COMMAND = Command("filter", run, config_name="filter", schema=FilterAppConfig, quiet=True)


def main() -> None:
    start(COMMAND)
