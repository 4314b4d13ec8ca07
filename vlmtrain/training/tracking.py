"""Experiment tracking: the resolved config (secrets scrubbed) to every logger, a W&B run that a
requeued or resumed run continues, and a run summary at the end.

Secrets never reach a file: a config value is replaced by ``<redacted>`` when its key looks like a
credential (``api_key``, ``hf_token``, ``password``, ``client_secret``...) or when it contains the
value of an environment variable whose name looks like one (``WANDB_API_KEY``, ``HF_TOKEN``...).
The same scrub rewrites Hydra's own records (``.hydra/*.yaml``, ``multirun.yaml``) when a secret was
passed on the command line.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("vlmtrain")

REDACTED = "<redacted>"
RUN_ID_FILE = "wandb_run_id"

# the last word of a key (split on _ - . and camelCase) names a credential; special-token keys of
# tokenizers (pad_token, image_token...) hold token strings, not credentials
_SECRET_WORDS = r"(api[_-]?key|apikey|access[_-]?key|secret[_-]?key|private[_-]?key|key|token|secret|" \
                r"password|passwd|passphrase|credentials?|auth)"
SECRET_KEY = re.compile(rf"(^|[_\-.]){_SECRET_WORDS}$", re.IGNORECASE)
NOT_SECRET_KEY = re.compile(r"(^|[_\-.])(pad|bos|eos|unk|sep|cls|mask|image|video|img|context|start|end)_token$",
                            re.IGNORECASE)
FLAG_VALUES = {"", "0", "1", "true", "false", "yes", "no", "on", "off", "none", "null"}
"""Values of credential-named variables that are switches, not credentials (``WANDB_API_KEY=0``)."""
LONG_SECRET = 8
"""A value this long is redacted wherever it appears; a shorter one only as a whole word (a short
key like ``abc1`` is still redacted in ``logger.api_key=abc1`` and in a directory name, but not
inside ``abc123``)."""


def is_secret_key(key: str) -> bool:
    key = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", str(key))  # hfToken -> hf_Token
    return bool(SECRET_KEY.search(key)) and not NOT_SECRET_KEY.search(key)


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look like credentials, longest first."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_key(k) and v.strip().lower() not in FLAG_VALUES}
    return sorted(values, key=len, reverse=True)


def scrub_text(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if len(s) >= LONG_SECRET:
            text = text.replace(s, REDACTED)
        else:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])", REDACTED, text)
    return text


def scrub_secrets(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a plain container (dicts, lists, scalars) with credentials redacted."""
    secrets = secret_env_values() if secrets is None else secrets
    if isinstance(obj, Mapping):
        return {k: REDACTED if is_secret_key(k) and obj[k] not in (None, "") else scrub_secrets(v, secrets)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_secrets(v, secrets) for v in obj]
    if isinstance(obj, str):
        return scrub_override(scrub_text(obj, secrets))
    return obj


def scrub_override(text: str) -> str:
    """``logger.api_key=abc`` (a Hydra override, also inside ``a=1,b=2`` dir names) -> redacted."""
    def one(item: str) -> str:
        key, eq, _ = item.partition("=")
        return f"{key}={REDACTED}" if eq and " " not in key and is_secret_key(key.lstrip("+~")) else item

    if "=" not in text or "\n" in text:
        return text
    return ",".join(one(part) for part in text.split(","))


def resolved_config(cfg) -> dict:
    """The fully resolved config (a DictConfig, or the dataclasses of ``vlmtrain.config``) as plain
    containers of plain values (choices as their strings), credentials redacted."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    return scrub_secrets(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def save_config(cfg, path: Path) -> dict:
    """Write the resolved, scrubbed config as YAML (rank zero only); returns it."""
    container = resolved_config(cfg)
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]  # Lightning sets the attribute at import
        OmegaConf.save(OmegaConf.create(container), path)
    return container


@rank_zero_only
def scrub_hydra_records(run_dir: Path) -> None:
    """Rewrite Hydra's records of this job (and of its multirun sweep) if they hold a secret."""
    run_dir = Path(run_dir)
    files = list((run_dir / ".hydra").glob("*.yaml")) + [run_dir.parent / "multirun.yaml"]
    secrets = secret_env_values()
    for f in files:
        if not f.is_file():
            continue
        original = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
        scrubbed = scrub_secrets(original, secrets)
        if scrubbed != original:
            OmegaConf.save(OmegaConf.create(scrubbed), f)
            log.info("redacted secrets in %s", f)


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        self._kept: list[dict] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                reader = csv.DictReader(f)
                self._kept = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        if self._kept is not None and self.metrics:
            # the steps logged now replace any logged before the restart (a crash resumes from the
            # last checkpoint, so the steps after it run and log again)
            first = min(m["step"] for m in self.metrics)
            keep = [r for r in self._kept if r.get("step") not in (None, "") and int(float(r["step"])) < first]
            self._record_new_keys()
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(keep)
            self._kept = None
        super().save()


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger for a run directory that may be restarted (Slurm requeue,
    ``resume=auto``): the metrics of the steps before the restart stay in metrics.csv (Lightning's
    own logger deletes the file when its folder is not empty)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]  # our writer subclasses Lightning's


def wandb_run_id(save_dir: str | os.PathLike, id: str | None = None) -> str:
    """The W&B run id for this run directory: an explicit id, else the agent's (WANDB_RUN_ID, set by
    `wandb agent`), else the one stored by an earlier start of this run (requeue, resume), else a
    new one. It is stored in <save_dir>/wandb_run_id so the next start continues the same run."""
    path = Path(save_dir) / RUN_ID_FILE
    stored = path.read_text().strip() if path.is_file() else None
    run_id = id or os.environ.get("WANDB_RUN_ID") or stored or uuid.uuid4().hex[:12]
    if run_id != stored and rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(run_id + "\n")
        tmp.replace(path)
    return run_id


def wandb_logger(save_dir: str, id: str | None = None, **kwargs):
    """Lightning's WandbLogger, continuing this run directory's W&B run (``resume="allow"``)."""
    import sys

    from lightning.pytorch.loggers import WandbLogger

    # W&B records the command line (sys.argv) with the run: redact credentials passed as overrides
    secrets = secret_env_values()
    sys.argv[1:] = [scrub_override(scrub_text(a, secrets)) for a in sys.argv[1:]]
    if os.environ.get("WANDB_SWEEP_ID"):  # under `wandb agent`: the sweep's project and entity
        kwargs["project"] = os.environ.get("WANDB_PROJECT") or kwargs.get("project")
        kwargs["entity"] = os.environ.get("WANDB_ENTITY") or kwargs.get("entity")
    return WandbLogger(save_dir=save_dir, id=wandb_run_id(save_dir, id), resume="allow", **kwargs)


def _wandb_run(logger):
    from lightning.pytorch.loggers import WandbLogger

    return logger.experiment if isinstance(logger, WandbLogger) else None


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


class RunTracking(pl.Callback):
    """Logs the resolved config (scrubbed) to every logger at the start, and at the end writes
    <run_dir>/summary.json and the W&B run summary, then closes the W&B run (so a multirun's next
    job starts its own)."""

    def __init__(self, config: DictConfig | Mapping, run_dir: str | os.PathLike):
        self.config = config
        self.run_dir = Path(run_dir)

    def _params(self) -> dict:
        cfg = self.config
        if isinstance(cfg, Mapping) and not isinstance(cfg, DictConfig):
            return scrub_secrets(dict(cfg))
        return resolved_config(cfg)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._params()
        for logger in trainer.loggers:
            logger.log_hyperparams(params)  # loggers write on rank zero only

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = pl_module.run_summary() if hasattr(pl_module, "run_summary") else {}  # type: ignore[operator]  # all ranks
        if trainer.global_rank != 0:
            return
        summary = {"global_step": trainer.global_step, "epochs": trainer.current_epoch, **summary}
        for logger in trainer.loggers:
            run = _wandb_run(logger)
            if run is not None:
                summary["wandb_run_id"] = run.id
                run.summary.update({f"summary/{k}": v for k, v in summary.items()})
        path = self.run_dir / "summary.json"
        # strict JSON: a value that is not a number (a NaN mean of no steps) is written as null
        path.write_text(json.dumps(finite_or_null(scrub_secrets(summary)), indent=2, sort_keys=True, allow_nan=False) + "\n")
        log.info("run summary: %s", path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish_wandb(trainer, 0)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish_wandb(trainer, 1)

    @staticmethod
    def _finish_wandb(trainer: pl.Trainer, exit_code: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if trainer.global_rank != 0 or not any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
            return
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
