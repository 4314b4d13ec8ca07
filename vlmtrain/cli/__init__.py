"""Where the YAML config tree lives and the pieces Hydra needs before composing it."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from vlmtrain.config import register_schemas

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def _demo_data() -> str:
    from vlmtrain.data.synthetic import ensure_demo_dataset

    return str(ensure_demo_dataset())


def _demo_data_val() -> str:
    from vlmtrain.data.synthetic import annotation_path, ensure_demo_dataset

    return str(annotation_path(ensure_demo_dataset().parent, "val"))


def _wandb_offline() -> bool:
    """Offline unless W&B can log in: WANDB_API_KEY, a run under `wandb agent` (WANDB_SWEEP_ID), or
    a `wandb login` entry in ~/.netrc. WANDB_MODE=offline/disabled always wins."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_SWEEP_ID"):
        return False
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is None
    except (OSError, netrc.NetrcParseError):
        return True


def register() -> None:
    """Schemas in the ConfigStore and vlmtrain's resolvers (idempotent)."""
    register_schemas()
    OmegaConf.register_new_resolver("vlmtrain.demo_data", _demo_data, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("vlmtrain.demo_data_val", _demo_data_val, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("vlmtrain.wandb_offline", _wandb_offline, replace=True)


def command(config_name: str, prog: str):
    """Make ``fn(cfg)`` a console entry point on the root config ``config_name``.

    Bad input (a missing file, a wrong value) ends in one line naming it, ``prog: error: ...``,
    and exit code 2; ``VLMTRAIN_DEBUG=1`` shows the traceback instead.
    """
    import sys

    import hydra

    def wrap(fn):
        @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
        def run(cfg) -> None:
            try:
                fn(cfg)
            except (FileNotFoundError, ValueError) as e:
                if os.environ.get("VLMTRAIN_DEBUG"):
                    raise
                print(f"{prog}: error: {e}", file=sys.stderr)
                sys.exit(2)

        def main() -> None:
            register()
            # the job (and its log file) is named after the command, not this wrapper's module
            if not any(a.startswith("hydra.job.name=") for a in sys.argv[1:]):
                sys.argv.append(f"hydra.job.name={prog.replace('.', '_')}")
            run()

        return main

    return wrap
