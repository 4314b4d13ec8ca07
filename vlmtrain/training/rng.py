"""Random-number-generator state of a process, in a form a checkpoint can hold and restore.

Generator states are kept as plain bytes / lists (not tensors), so they pass through
``all_gather_object`` and any checkpoint format unchanged.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


def _bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


def _tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def rng_state() -> dict:
    """Python, NumPy, torch CPU and (when in use) the current CUDA device's generator."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)),  # type: ignore[attr-defined]
        "torch": _bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _bytes(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor(state["cuda"]))


def gather_rng_states() -> list[dict]:
    """Every rank's state, indexed by global rank (a collective: call it on all ranks)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states
