"""Packed (variable-length) causal attention for the language model, plugged in through transformers'
``AttentionInterface``.

A packed row holds several samples back to back; each attends only to itself. The training step
passes ``cu_seq_lens_q/k`` (cumulative sample lengths, int32, like flash-attn) and
``max_length_q/k`` as keyword arguments of the language model's forward; transformers hands such
keyword arguments through every decoder layer to the attention function, so a function registered
under a name of our own and selected with ``set_attn_implementation`` sees them. No library code
is patched.

Backends, in the order ``auto`` tries them:

| name        | kernel                                                  | needs            |
|-------------|---------------------------------------------------------|------------------|
| flash_attn  | ``flash_attn.flash_attn_varlen_func``                   | flash-attn, CUDA |
| varlen      | ``torch.nn.attention.varlen.varlen_attn`` (flash)       | torch >= 2.9, CUDA |
| flex        | ``flex_attention`` (compiled) with a document mask      | CUDA             |
| sdpa        | ``scaled_dot_product_attention`` with a dense block-diagonal causal mask | any (CPU tests) |

The flash kernels take float16/bfloat16 only; ``auto`` passes over them when the attention runs in
float32 (``hardware.precision=32-true`` on a GPU).

Rows without ``cu_seq_lens`` (padded batches, generation) go to transformers' own SDPA function
with the usual padding mask, so a model set to a packed implementation still runs everything else.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmtrain.errors import UserError

PREFIX = "packed_"


@dataclass(frozen=True)
class Backend:
    name: str
    available: Callable[[torch.device], bool]
    run: Callable
    """(q, k, v, cu_seq_lens, max_length, scale) with q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    half_only: bool = False
    """The kernel takes float16/bfloat16 only (flash): ``auto`` skips it for float32 runs."""


HALF = (torch.float16, torch.bfloat16)


# -- flash-attn ------------------------------------------------------------------------------------
def _cuda_and_importable(module: str, name: str | None = None) -> Callable[[torch.device], bool]:
    """An availability check: a CUDA device and ``module`` (with ``name`` in it) importable."""

    def available(device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        try:
            mod = importlib.import_module(module)
        except ImportError:
            return False
        return name is None or hasattr(mod, name)

    return available


_flash_attn_available = _cuda_and_importable("flash_attn")


def _flash_attn(q, k, v, cu, max_len, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True)


# -- torch.nn.attention.varlen ---------------------------------------------------------------------
_torch_varlen_available = _cuda_and_importable("torch.nn.attention.varlen", "varlen_attn")


_VARLEN_PARAMS: list[frozenset] = []


def _varlen_params() -> frozenset:
    if not _VARLEN_PARAMS:
        from torch.nn.attention.varlen import varlen_attn

        _VARLEN_PARAMS.append(frozenset(inspect.signature(varlen_attn).parameters))
    return _VARLEN_PARAMS[0]


def _torch_varlen(q, k, v, cu, max_len, scale):
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kwargs = {"scale": scale}
    # torch 2.9/2.10 take is_causal; later versions express causality as a (-1, 0) window
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


# -- flex_attention ----------------------------------------------------------------------------------
_flex_available = _cuda_and_importable("torch.nn.attention.flex_attention", "flex_attention")


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


class _BlockMaskCache:
    """Every layer of one forward sees the same cu_seq_lens tensor: build its block mask once."""

    def __init__(self):
        self.key, self.mask = None, None

    def get(self, cu: torch.Tensor, total: int):
        from torch.nn.attention.flex_attention import create_block_mask

        key = (cu.data_ptr(), cu.numel(), total, cu._version)
        if key != self.key:
            doc = document_ids(cu, total)

            def causal_document(b, h, q_idx, kv_idx):
                return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

            self.mask = create_block_mask(causal_document, None, None, total, total, device=cu.device)
            self.key = key
        return self.mask


_block_masks = _BlockMaskCache()


def _flex(q, k, v, cu, max_len, scale):
    total = q.shape[0]
    block_mask = _block_masks.get(cu, total)
    out = _compiled_flex()(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)


# -- dense masked SDPA (CPU, tests) ------------------------------------------------------------------
def document_ids(cu_seq_lens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) index of the packed sample each position belongs to."""
    positions = torch.arange(total, device=cu_seq_lens.device)
    return torch.searchsorted(cu_seq_lens[1:].to(positions.dtype), positions, right=True)


def _sdpa(q, k, v, cu, max_len, scale):
    total = q.shape[0]
    doc = document_ids(cu, total)
    pos = torch.arange(total, device=q.device)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("flash_attn", _flash_attn_available, _flash_attn, half_only=True),
        Backend("varlen", _torch_varlen_available, _torch_varlen, half_only=True),
        Backend("flex", _flex_available, _flex),
        Backend("sdpa", lambda device: True, _sdpa),
    )
}


_AVAILABLE: dict[str, tuple[str, ...]] = {}
"""Device type -> names of the backends available there. Filled outside compiled code (by
``register_packed_attention`` at model build, or the first eager call), so a compiled decoder
layer reads a dict instead of tracing imports and signature inspection (graph breaks)."""

_AUTO: dict[tuple[str, bool], str] = {}
"""(device type, half precision) -> the backend ``auto`` picks, filled with ``_AVAILABLE``."""


def available_backends(device_type: str) -> tuple[str, ...]:
    if device_type not in _AVAILABLE:
        device = torch.device(device_type)
        names = tuple(b.name for b in BACKENDS.values() if b.available(device))
        _AVAILABLE[device_type] = names
        _AUTO[device_type, True] = names[0]
        _AUTO[device_type, False] = next(n for n in names if not BACKENDS[n].half_only)
        if "varlen" in names:
            _varlen_params()
    return _AVAILABLE[device_type]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """The backend ``name`` names (``auto``: the first one available on ``device`` that takes
    ``dtype``: a float32 run on CUDA skips the flash kernels)."""
    available = available_backends(device.type)
    if name == "auto":
        return BACKENDS[_AUTO[device.type, dtype is None or dtype in HALF]]
    if name not in BACKENDS:
        raise UserError(f"model.attention={name!r}: choose auto or one of {sorted(BACKENDS)}")
    if name not in available:
        raise UserError(f"model.attention={name!r} is not available on {device} (not installed or no CUDA)")
    if BACKENDS[name].half_only and dtype is not None and dtype not in HALF:
        raise UserError(f"model.attention={name!r} runs in float16/bfloat16 only, and this run's attention is "
                         f"{dtype} (hardware.precision): use auto, flex or sdpa")
    return BACKENDS[name]


def varlen_causal_attention(q, k, v, cu_seq_lens, max_length, scale=None, backend: str = "auto"):
    """Causal attention within each packed sample. q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    return resolve_backend(backend, q.device, q.dtype).run(q, k, v, cu_seq_lens, max_length, scale)


def _attention_function(backend: str):
    def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                 sliding_window=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, sliding_window=sliding_window, **kwargs)
        if query.shape[0] != 1:
            raise ValueError(f"packed attention takes one packed row per forward, got a batch of {query.shape[0]}")
        if sliding_window is not None:
            raise UserError("packed attention does not implement sliding-window layers")
        if dropout and module.training:
            raise UserError("packed attention does not implement attention dropout")
        # transformers hands (1, H, T, D); the varlen kernels take (T, H, D)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        device = q.device.type
        if torch.is_autocast_enabled(device):
            # RoPE in fp32 can lift q/k out of the autocast dtype; flash kernels take half precision only
            dtype = torch.get_autocast_dtype(device)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = varlen_causal_attention(q, k, v, cu, int(kwargs["max_length_q"]), scaling, backend)
        return out.unsqueeze(0), None  # (1, T, H, D), as transformers' attention functions return

    packed_attention_forward.__name__ = f"{PREFIX}{backend}_attention_forward"
    return packed_attention_forward


def _padding_only_mask(*args, attention_mask=None, **kwargs):
    """Packed rows need no mask (cu_seq_lens carries the structure); padded rows get SDPA's mask."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_packed_attention() -> list[str]:
    """Register ``packed_<backend>`` for every backend (and ``packed_auto``) with transformers."""
    from transformers import AttentionInterface, AttentionMaskInterface

    # filled here, outside compiled code: filling them on a compiled decoder layer's first call makes
    # dynamo guard on the empty dicts and compile the layer a second time
    available_backends("cpu")
    if torch.cuda.is_available():
        available_backends("cuda")
    names = []
    for backend in ("auto", *BACKENDS):
        name = PREFIX + backend
        AttentionInterface.register(name, _attention_function(backend))
        AttentionMaskInterface.register(name, _padding_only_mask)
        names.append(name)
    return names


def use_packed_attention(model, backend: str = "auto") -> str:
    """Set the language model of an InternVL model to packed attention with ``backend``.

    The vision tower keeps SDPA: a tile is one sequence, so per-tile isolation is the batch
    dimension.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise UserError(f"model.attention={backend!r}: choose auto or one of {sorted(BACKENDS)}")
    register_packed_attention()
    name = PREFIX + backend
    model.set_attn_implementation({"text_config": name, "vision_config": "sdpa"})
    return name


def packed_kwargs(cu_seq_lens: torch.Tensor, max_length: int) -> dict:
    """Keyword arguments that carry the packing structure to the attention function.

    ``max_length`` goes up to a power of two: the kernels need only an upper bound on a sample's
    length, and a handful of distinct values lets compiled blocks (``model.compile``) specialise
    on it without recompiling for every packed buffer."""
    bound = 1 << max(0, int(max_length) - 1).bit_length()
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": bound, "max_length_k": bound}
