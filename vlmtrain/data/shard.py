"""A data config's datasets as webdataset tar shards (sample json + original media bytes): what
`vlmtrain shard` writes (``vlmtrain.cli.shard``; ``python -m vlmtrain.shard`` is the same).

    vlmtrain shard data=single data.path=train.jsonl out=shards/
    vlmtrain shard data=single data.path=meta.json out=shards/ shard.max_size=500000000

Each dataset goes to ``{out}/{name}/shard-NNNNNN.tar`` (a shard closes before it passes
``shard.max_size`` bytes or ``shard.max_count`` samples), lines in source order, repeat factors
not applied (they are applied when reading). ``{out}/data/shards.yaml`` is a data config for the
shards with every dataset's settings (n_max, repeat, jpeg_augment, template, ...):

    python -m vlmtrain hydra.searchpath=[file://$PWD/shards] data=shards

Bad lines are skipped and counted per reason (``data.on_error=raise`` stops at the first, naming
file and line), so a shard set holds only samples that convert.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf

from vlmtrain.data.conversation import SampleError
from vlmtrain.data.mixture import SourceDataset, dataset_configs, unreadable
from vlmtrain.errors import UserError


@dataclass
class ShardOptions:
    max_size: int = 1 << 30
    """Bytes per shard at most (a sample larger than this gets a shard of its own)."""
    max_count: int = 100_000
    """Samples per shard at most."""


def write_shards(cfg_data, out: str | Path, max_size: int = 1 << 30, max_count: int = 100_000,
                 log=print) -> dict:
    """Shard every dataset of ``cfg_data``; returns {name: {"shards": [...], "samples": n, "skipped": Counter}}."""
    import webdataset as wds

    from vlmtrain.data.formats.wds import to_sample

    out = Path(out).expanduser()
    result, configs = {}, {}
    for name, d in dataset_configs(cfg_data.datasets).items():
        source = SourceDataset(name, d, seed=0)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("shard-*.tar"):
            old.unlink()  # a re-run must not leave shards of an earlier, longer run behind
        skipped, n = Counter(), 0
        with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxsize=max_size, maxcount=max_count,
                             verbose=0) as sink:
            for record in source.records:
                try:
                    try:
                        conv = source.reader.to_conversation(record.parse(), source.root)
                        conv.check()
                        source.confine(conv, bool(getattr(cfg_data, "media_outside_root", False)))
                        # keys are sample numbers: a .json list or a folder would repeat line numbers
                        sample = to_sample(conv, f"{n:09d}", record.where())
                    except (SampleError, UserError):
                        raise
                    except Exception as e:  # as in training: one record never stops the tool
                        raise unreadable(record, e) from e
                except SampleError as e:
                    if cfg_data.on_error == "raise":
                        raise UserError(f"{record.where()}: {e}") from None
                    skipped[e.reason] += 1
                    continue
                sink.write(sample)
                n += 1
        shards = sorted(folder.glob("shard-*.tar"))
        result[name] = {"shards": [str(p) for p in shards], "samples": n, "skipped": skipped}
        log(f"{name}: {n} samples in {len(shards)} shards under {folder}"
            + (f"; skipped {sum(skipped.values())} ({', '.join(f'{r}: {c}' for r, c in skipped.items())})"
               if skipped else ""))
        entry = {k: v for k, v in asdict(d).items() if v is not None}
        entry.update(path=str(folder.resolve()), format="wds")  # the same wherever it is trained from
        entry.pop("root", None)
        configs[name] = entry
    conf = out / "data" / "shards.yaml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    body = OmegaConf.to_yaml({"datasets": configs})
    conf.write_text(
        f"# Shards written by `python -m vlmtrain.shard`: `python -m vlmtrain hydra.searchpath=[file://{out}] data=shards`.\n"
        + body
    )
    return result
