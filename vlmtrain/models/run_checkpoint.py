"""A training run's checkpoint, read without building a model: finding it, reading its weights
and its config, loading a state dict strictly, and telling LoRA adapters apart.

What ``init_from``, ``resume``, ``ckpt`` (eval, chat, export) and ``model.vision.path`` accept as
a vlmtrain checkpoint:

- a run directory (it holds ``checkpoints/``): its ``checkpoints/last.ckpt``;
- a Lightning ``.ckpt`` file, read with ``weights_only`` (no pickled code runs);
- the folder Lightning's DeepSpeed strategy writes (a ``latest`` file beside the ZeRO
  partitions), gathered into full fp32 weights;
- for ``resume=auto`` only: ``last.ckpt.old`` when a crash hit between the two renames that
  publish a checkpoint folder (``vlmtrain.training.checkpointing.publish``).

A LoRA run's weights come back with the adapters merged on the state dict, W + (alpha/r)·B@A,
with r and alpha from the run's ``config.yaml``: reading them never builds a model.

This module imports nothing from vlmtrain but ``errors`` and ``config``, so every layer (models,
training, inference) can use it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from omegaconf import DictConfig, OmegaConf

from vlmtrain.config import LoraConfig
from vlmtrain.errors import MissingPathError, UserError

LAST = "last.ckpt"
"""The checkpoint a run keeps (and resumes from) in ``<run_dir>/checkpoints/``."""

RUN_CONFIG = "config.yaml"
"""The resolved config a run writes into its directory."""

LIGHTNING_PREFIX = "model."
"""The LightningModule holds the HF model as ``self.model``: its weights are ``model.*``."""


# -- finding ----------------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "checkpoints").is_dir()


def is_checkpoint(path: Path) -> bool:
    """A Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder."""
    return (path.is_file() and path.suffix == ".ckpt") or (path.is_dir() and (path / "latest").is_file())


def find_checkpoint(path: str | Path, key: str) -> Path:
    """The checkpoint ``path`` names: a run directory's ``checkpoints/last.ckpt``, else ``path``
    itself (a ``.ckpt`` file or a checkpoint folder). ``key`` names the setting in errors."""
    p = Path(path).expanduser()
    if is_run_dir(p):
        p = p / "checkpoints" / LAST
    if not p.exists():
        raise MissingPathError(f"{key}: no checkpoint at {p}")
    if p.is_file():
        check_readable(p, key)
    return p


def check_readable(ckpt: Path, key: str) -> None:
    """A checkpoint file is a whole torch zip archive (an empty or cut-off file used to end in a
    bare ``EOFError`` deep inside the load)."""
    import zipfile

    if ckpt.stat().st_size == 0:
        raise UserError(f"{key}: {ckpt} is empty (a checkpoint whose write never finished?)")
    if not zipfile.is_zipfile(ckpt):
        raise UserError(f"{key}: {ckpt} is not a complete torch checkpoint (truncated, or not a checkpoint)")


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """``resume``: None (start fresh), ``auto`` (``run_dir/checkpoints/last.ckpt`` if there is one,
    or its ``.old`` fallback, else start fresh: what a requeued Slurm job uses) or a path to a
    checkpoint or run directory."""
    if not resume:
        return None
    if resume == "auto":
        ckpt_dir = Path(run_dir) / "checkpoints"
        for candidate in (ckpt_dir / LAST, ckpt_dir / (LAST + ".old")):
            if candidate.exists():
                if candidate.is_file():
                    check_readable(candidate, "resume")
                return candidate
        return None
    return find_checkpoint(resume, "resume")


def run_dir_of(ckpt: Path) -> Path | None:
    """The run directory a checkpoint belongs to (the one with ``config.yaml``), if any."""
    for run_dir in (ckpt.parent.parent, ckpt.parent):
        if (run_dir / RUN_CONFIG).is_file():
            return run_dir
    return None


@dataclass
class RunCheckpoint:
    run_dir: Path
    ckpt: Path


def find_run(path: str | Path, key: str = "ckpt") -> RunCheckpoint | None:
    """The run and checkpoint ``path`` names (a run directory or a checkpoint inside one); None
    when ``path`` is neither (e.g. an exported HF directory)."""
    p = Path(path).expanduser()
    if not (is_run_dir(p) or is_checkpoint(p)):
        return None
    ckpt = find_checkpoint(p, key)
    run_dir = run_dir_of(ckpt)
    if run_dir is None:
        raise MissingPathError(f"{key}: {ckpt}: no {RUN_CONFIG} in its run directory ({ckpt.parent.parent})")
    return RunCheckpoint(run_dir, ckpt)


# -- reading ----------------------------------------------------------------------------------------


def read_run_config(run_dir: Path) -> DictConfig:
    """A run's resolved ``config.yaml``."""
    f = Path(run_dir) / RUN_CONFIG
    if not f.is_file():
        raise MissingPathError(f"{run_dir}: no {RUN_CONFIG}")
    return cast(DictConfig, OmegaConf.load(f))


def lora_config_of(run_config: DictConfig) -> LoraConfig | None:
    """The run's ``stage.lora`` as a LoraConfig (None for a run without adapters)."""
    stage = run_config.get("stage") or {}
    if not stage.get("lora"):
        return None
    return cast(LoraConfig, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoraConfig), stage.lora)))


def read_model_state(ckpt: Path, key: str) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint as saved (keys without the LightningModule's ``model.``;
    a LoRA run's adapters unmerged)."""
    if ckpt.is_dir():
        if not (ckpt / "latest").is_file():
            raise UserError(f"{key}: {ckpt} is a folder but not a DeepSpeed checkpoint (no 'latest' file)")
        state = read_deepspeed_folder(ckpt, key)
    else:
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or "state_dict" not in obj:
            raise UserError(f"{key}: {ckpt} is not a Lightning checkpoint (no state_dict)")
        state = obj["state_dict"]
    return {k.removeprefix(LIGHTNING_PREFIX): v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}


def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed and Lightning put into a DeepSpeed folder's shards (enums,
    numpy RNG states), allowed to ``torch.load(weights_only=True)``: plain data, no code."""
    import numpy as np

    allowed: list = [np.ndarray, np.dtype, type(np.dtype("uint32")), type(np.dtype("float64")), type(np.dtype("int64"))]
    try:
        allowed.append(np.core.multiarray._reconstruct)  # type: ignore[attr-defined]
    except AttributeError:
        allowed.append(np._core.multiarray._reconstruct)  # type: ignore[attr-defined]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    try:  # plain attribute holders (scale, counters), rebuilt without calling their code
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    return allowed


@contextmanager
def deepspeed_weights_only(ckpt: Path, key: str) -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's ``zero_to_fp32`` and its engine's checkpoint loads, which
    pass ``weights_only=False``) reads with ``weights_only=True``, allowing only the plain types of
    ``_deepspeed_safe_globals``: a crafted shard runs no code, and one that needs more is refused
    naming ``key`` and the folder."""
    import pickle

    real_load = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    torch.load = load  # DeepSpeed calls torch.load by attribute: restored below
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{key}: {ckpt}: a shard of this DeepSpeed checkpoint holds objects that only an "
                        f"unrestricted pickle load could read (which can run code), refused: {first}") from None
    finally:
        torch.load = real_load


def read_deepspeed_folder(ckpt: Path, key: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights gathered from the ZeRO partitions of a DeepSpeed checkpoint folder, every
    shard read with ``weights_only`` (DeepSpeed's own ``zero_to_fp32`` would unpickle them)."""
    from deepspeed.utils import zero_to_fp32

    with deepspeed_weights_only(ckpt, key):
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt))


def read_weights(ckpt: Path, key: str) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, ready for a model without adapters: a LoRA run's
    adapters are merged into their base weights (r and alpha from the run's config.yaml)."""
    state = read_model_state(ckpt, key)
    if not any(is_lora_key(k) for k in state):
        return state
    run_dir = run_dir_of(ckpt)
    lora = lora_config_of(read_run_config(run_dir)) if run_dir is not None else None
    if lora is None:
        raise UserError(f"{key}: {ckpt} holds LoRA adapters, but no {RUN_CONFIG} with stage.lora "
                        "(their r and alpha) is in its run directory")
    return merge_lora_state(state, lora.alpha / lora.r)


# -- LoRA -------------------------------------------------------------------------------------------


def is_lora_key(name: str) -> bool:
    """Whether a parameter or state-dict name belongs to a LoRA adapter (peft names them
    ``<layer>.lora_A.<adapter>.weight``, ``lora_B``, ``lora_embedding_*``, ``lora_magnitude_vector``)."""
    return any(part.startswith("lora_") for part in name.split("."))


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict of in-place injected peft LoRA layers -> the plain layers' state dict, each
    adapted weight W + scaling·B@A (scaling = alpha / r), computed as peft's ``merge`` does."""
    out: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        parts = key.split(".")
        lora_at = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
        if lora_at is None:
            out[key.replace(".base_layer.", ".")] = value
            continue
        kind = parts[lora_at]
        if kind not in ("lora_A", "lora_B") or parts[-1] != "weight":
            raise UserError(f"{key}: only linear LoRA adapters (lora_A / lora_B) can be merged")
        adapters.setdefault(".".join(parts[:lora_at]), {})[kind] = value
    for layer, ab in adapters.items():
        base_key = f"{layer}.weight"
        if set(ab) != {"lora_A", "lora_B"} or base_key not in out:
            raise UserError(f"{layer}: incomplete LoRA layer (needs base_layer.weight, lora_A and lora_B)")
        base, a, b = out[base_key], ab["lora_A"], ab["lora_B"]
        to_fp32 = base.dtype in (torch.float16, torch.bfloat16)  # as peft does on the CPU
        delta = (b.float() @ a.float() if to_fp32 else b @ a) * scaling
        out[base_key] = base + delta.to(base.dtype)
    return out


# -- loading ----------------------------------------------------------------------------------------


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, prefixes=None) -> None:
    """Load ``state`` into the keys of ``model`` under ``prefixes`` (all keys when None), failing on
    the first key that is missing, unexpected or mis-shaped (a UserError naming ``source``)."""
    own = model.state_dict()
    wanted = [k for k in own if prefixes is None or k.startswith(tuple(prefixes))]
    for key in state:
        if key not in own or (prefixes is not None and not key.startswith(tuple(prefixes))):
            raise UserError(f"{source}: unexpected key {key!r} (not in the configured model)")
    for key in wanted:  # in the model's order, so "first" means first in the model
        if key in state and own[key].shape != state[key].shape:
            raise UserError(
                f"{source}: shape mismatch at {key!r}: checkpoint {tuple(state[key].shape)} vs "
                f"configured model {tuple(own[key].shape)}"
            )
    missing = [k for k in wanted if k not in state]
    if missing:
        raise UserError(f"{source}: missing key {missing[0]!r} (and {len(missing) - 1} more)")
    model.load_state_dict(state, strict=False)
