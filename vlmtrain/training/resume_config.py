"""A resumed run continues with its own config: ``resume=auto`` (or ``resume=<path>``) in a run
directory that holds ``config.yaml`` and a checkpoint restores the keys the command line did not
name from that file, and refuses keys the command line names that would change the run, naming
them, unless ``resume_changes`` lists them (a deliberate change, e.g. ``resume_changes=[stage.max_steps]``
to train longer). Keys that do not change what is trained may always differ (``MAY_DIFFER``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from vlmtrain.errors import UserError
from vlmtrain.training.tracking import REDACTED, resolved_config

log = logging.getLogger("vlmtrain")

MAY_DIFFER = ("resume", "resume_changes", "run_dir", "init_from", "init_parts", "logger", "trainer.enable_progress_bar",
              "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps", "trainer.checkpoint_every_minutes",
              "trainer.max_time", "trainer.peak_tflops", "data.num_workers", "data.prefetch_factor",
              "data.persistent_workers")
"""Keys (and key prefixes) a resumed run may change: where and how it logs, saves and loads, not
what it trains (init_from is ignored on resume: the checkpoint holds the weights)."""


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def command_line_keys() -> list[str] | None:
    """Keys (or groups) the command line names, from Hydra; None outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except Exception:  # not under @hydra.main (tests compose directly)
        return None
    return [o.lstrip("+~").split("=", 1)[0] for o in overrides]


def restore_run_config(composed: DictConfig, run_dir: Path, named: list[str] | None = None) -> DictConfig:
    """``composed`` with the run's own values restored (see the module docstring); raises a
    UserError naming the command-line keys that would change the run."""
    saved_file = Path(run_dir) / "config.yaml"
    if not saved_file.is_file():
        return composed
    saved = _flat(OmegaConf.to_container(OmegaConf.load(saved_file), resolve=False))
    new = _flat(resolved_config(composed))
    allowed = [*MAY_DIFFER, *(composed.get("resume_changes") or [])]
    named = command_line_keys() if named is None else named
    changed = {k: (saved.get(k), new.get(k)) for k in sorted(set(saved) | set(new))
               if saved.get(k) != new.get(k) and not _under(k, allowed)
               and REDACTED not in (saved.get(k), new.get(k)) and not k.startswith("hydra")}
    if not changed:
        return composed
    refused = {k: v for k, v in changed.items() if named is None or _under(k, named)}
    if refused:
        listing = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(refused.items())[:8])
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise UserError(f"resume: {run_dir} continues with its own config ({saved_file}); these would change "
                        f"the run: {listing}{more}. Drop them, or change them on purpose with "
                        f"resume_changes=[{','.join(list(refused)[:8])}]")
    restored = composed.copy()
    with open_dict(restored):
        for k, (old, _new) in changed.items():
            OmegaConf.update(restored, k, old, merge=False, force_add=True)
    log.info("resume: the run's own config restored for %s", ", ".join(changed))
    print(f"[vlmtrain] resume: continuing with {saved_file} (restored: {', '.join(list(changed)[:8])}"
          f"{' ...' if len(changed) > 8 else ''})", flush=True)
    return restored
