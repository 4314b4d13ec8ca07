"""The one start-up path of every vlmtrain command, and the registry of commands.

    vlmtrain <verb> [group=option ...] [key=value ...]     # the console script
    python -m vlmtrain <verb> ...                          # the same; no verb means train
    python -m vlmtrain.<verb> ...                          # the same (a shim module per verb)

Every verb composes a root config of the YAML tree in ``conf/`` (shipped inside the wheel as
``vlmtrain/conf``) on a typed schema, and starts the same way (``start``): the schemas and
vlmtrain's resolvers are registered, the command's defaults are added to the overrides the user
gave (the Hydra job name; for the data tools no output folder and no log files; for train
``hardware=gpu`` when a GPU is visible and no hardware was named), ``sys.argv`` is set (here and
nowhere else), and Hydra runs the command. A ``vlmtrain.errors.UserError`` or a required value
left unset (``ckpt: ???``) or a value out of its range (``vlmtrain.config.check_values``) ends in one line, ``<prog>: error: <message>``, with exit code 2;
``VLMTRAIN_DEBUG=1`` shows the traceback instead. Every other exception is a bug and keeps its
traceback.

Adding a verb: a module ``vlmtrain/cli/<verb>.py`` with its root schema, ``COMMAND =
Command(...)`` and ``main()``, plus its entry in ``VERBS`` (and a two-line shim
``vlmtrain/<verb>.py`` if ``python -m vlmtrain.<verb>`` should work too).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from vlmtrain.config import TrainConfig, check_values, register_schemas, schema_node
from vlmtrain.errors import UserError

VERBS = {
    "train": "vlmtrain.cli.train",
    "eval": "vlmtrain.cli.eval",
    "chat": "vlmtrain.cli.chat",
    "export": "vlmtrain.cli.export",
    "plan": "vlmtrain.cli.plan",
    "preview": "vlmtrain.cli.preview",
    "stats": "vlmtrain.cli.stats",
    "shard": "vlmtrain.cli.shard",
    "filter": "vlmtrain.cli.filter",
    "pairs": "vlmtrain.cli.pairs",
}
"""verb -> the module that defines its ``COMMAND``."""


def config_dir() -> Path:
    """The YAML config tree: the copy inside the installed package (a wheel), else the source
    checkout's ``conf/`` beside the package (an editable install, or ``PYTHONPATH``)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"vlmtrain's config tree is neither in {package / 'conf'} nor in {package.parent / 'conf'}: "
                       "the installation is incomplete")


CONFIG_DIR = config_dir()


@dataclass(frozen=True)
class Command:
    """What a verb runs and how it starts."""

    name: str
    run: Callable[[DictConfig], Any]
    """Called with the composed config (a DictConfig on ``schema``)."""
    config_name: str = "config"
    """The root config in conf/ (``config`` is training's; the data tools compose it too)."""
    schema: type = TrainConfig
    """The root schema (a dataclass), stored in the ConfigStore as ``schema_name``; the root
    config's defaults list names it first."""
    schema_name: str = "vlmtrain_schema"
    quiet: bool = False
    """Reads only: no Hydra output folder, no log files (the data tools)."""
    gpu_default: bool = False
    """A visible GPU makes ``hardware=gpu`` the default (when the overrides name no hardware)."""
    prog: str | None = None
    """The name in messages and the Hydra job name (default ``vlmtrain.<name>``)."""

    @property
    def program(self) -> str:
        return self.prog or f"vlmtrain.{self.name}"


QUIET_HYDRA = ("hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled",
               "hydra/hydra_logging=disabled")


# -- resolvers --------------------------------------------------------------------------------------


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


# -- registration -----------------------------------------------------------------------------------


def command(verb: str) -> Command:
    """The Command a verb's module defines."""
    return importlib.import_module(VERBS[verb]).COMMAND


def use_schema(cmd: Command) -> None:
    """Store ``cmd``'s root schema in the ConfigStore (a data tool's extended schema replaces the
    training one under ``vlmtrain_schema`` in this process)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=cmd.schema_name, node=schema_node(cmd.schema))


def register(*commands: Command) -> None:
    """vlmtrain's resolvers, the training schema, and the root schemas of ``commands`` (of every
    verb with a root config of its own when none are given). Idempotent."""
    register_schemas()
    OmegaConf.register_new_resolver("vlmtrain.demo_data", _demo_data, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("vlmtrain.demo_data_val", _demo_data_val, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("vlmtrain.wandb_offline", _wandb_offline, replace=True)
    if not commands:
        commands = tuple(c for c in map(command, VERBS) if c.schema_name != "vlmtrain_schema")
    for cmd in commands:
        use_schema(cmd)


# -- start-up ---------------------------------------------------------------------------------------


def _given(args: Sequence[str], key: str) -> bool:
    """Whether the overrides set ``key`` (``key=...``, ``+key=...``, ``++key=...``, ``~key``)."""
    return any(a.lstrip("+~").split("=", 1)[0] == key for a in args)


def command_defaults(cmd: Command, args: Sequence[str]) -> list[str]:
    """The overrides a command adds to the user's, for what the user did not set."""
    out = [] if _given(args, "hydra.job.name") else [f"hydra.job.name={cmd.program.replace('.', '_')}"]
    if cmd.quiet:
        out += [o for o in QUIET_HYDRA if not _given(args, o.split("=", 1)[0])]
    if cmd.gpu_default and not _given(args, "hardware"):
        import torch

        if torch.cuda.is_available():
            out.append("hardware=gpu")
    return out


def missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Full keys of the ``???`` values under ``node``, without resolving any interpolation
    (``OmegaConf.missing_keys`` resolves them, and some only resolve once the command has run)."""
    out = []
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            out.append(f"{prefix}{key!s}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_interpolation() and not child._is_none():
            out += missing_keys(child, f"{prefix}{key!s}.")
    return out


def check_required(cfg: DictConfig) -> None:
    """Fail before any work when a required value (``???``, e.g. ``ckpt``) is not set."""
    missing = missing_keys(cfg)
    if missing:
        raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: add "
                        + " ".join(f"{k}=..." for k in missing) + " to the command")


def error_message(e: BaseException) -> str:
    """The one line a user error is reported as."""
    if isinstance(e, MissingMandatoryValue):
        key = e.full_key or e.key
        return f"{key} is required: add {key}=... to the command"
    text = str(e)
    if "Original Traceback" in text:
        # raised in a DataLoader worker: torch re-raises it with the worker's traceback as message
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(f"{type(e).__module__}.{type(e).__qualname__}: ") else last
    return text


def start(cmd: Command, args: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Run ``cmd`` on the overrides ``args`` (default: the command line) through Hydra."""
    import hydra

    args = list(sys.argv[1:] if args is None else args)
    prog = prog or cmd.program
    register(cmd)
    # Hydra reads its overrides from sys.argv; argv[0] stays (W&B records it as the program)
    sys.argv = [sys.argv[0], *args, *command_defaults(cmd, args)]

    @hydra.main(config_path=str(CONFIG_DIR), config_name=cmd.config_name, version_base="1.3")
    def run(cfg: DictConfig) -> None:
        try:
            check_required(cfg)
            check_values(cfg)
            cmd.run(cfg)
        except (UserError, MissingMandatoryValue) as e:
            if os.environ.get("VLMTRAIN_DEBUG"):
                raise
            print(f"{prog}: error: {error_message(e)}", file=sys.stderr)
            sys.exit(2)

    run()


def main() -> None:
    """``vlmtrain [verb] [overrides]`` and ``python -m vlmtrain [verb] [overrides]``; no verb = train."""
    args = sys.argv[1:]
    if args and args[0] in VERBS:
        verb, args, prog = args[0], args[1:], f"vlmtrain {args[0]}"
    else:
        verb, prog = "train", None
    start(command(verb), args, prog)
