"""Typed schemas for every config group.

The YAML files under conf/ are merged on top of these dataclasses (registered in Hydra's
ConfigStore as ``vlmtrain_schema``), so a misspelled key or a value of the wrong type fails at
compose time with the key's full name, before anything is built.

Groups whose options are whole components (optim, loss, logger, hardware.strategy) carry a
``_target_`` and are typed ``Any`` here: the option *file* picks the component and
``hydra.utils.instantiate`` checks its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from vlmtrain.errors import UserError

PARTS = ("vision_tower", "multi_modal_projector", "language_model")


@dataclass
class VisionConfig:
    """InternViT settings (transformers' InternVLVisionConfig names)."""

    hidden_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    intermediate_size: int = MISSING
    image_size: int = 448
    """Tile side in pixels; tiles are cut at this size and the ViT sees exactly one tile."""
    patch_size: int = 14
    norm_type: str = "layer_norm"
    """``layer_norm`` (InternViT-300M) or ``rms_norm`` (InternViT-6B)."""
    use_qk_norm: bool = False
    attention_bias: bool = True
    layer_norm_eps: float = 1e-6
    layer_scale_init_value: float = 0.1
    hidden_act: str = "gelu"
    sincos_position_init: bool = False
    """Random init only: start the learned position embeddings at fixed 2D sin-cos values (as MAE
    does) instead of transformers' zeros, so a ViT trained from scratch knows where each patch is
    from its first step. A loaded checkpoint overwrites them either way."""
    path: str | None = None
    """Load the vision tower from a local ViT or whole-VLM checkpoint (progressive scaling)."""


@dataclass
class LLMConfig:
    config: dict[str, Any] = field(default_factory=dict)
    """Any transformers causal-LM config as keyword arguments; ``model_type`` picks the class."""
    path: str | None = None
    """Load the language model from a local causal-LM checkpoint."""


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str | None = None
    """A local InternVL checkpoint (HF-native or OpenGVLab layout). None: random init."""
    tokenizer: str | None = None
    """A local tokenizer directory. None: the checkpoint's, else the one vlmtrain ships."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    vision_select_layer: int = -1
    template: str = "internvl2_5"
    image_token_id: int | None = None
    """``<IMG_CONTEXT>``'s id in the released tokenizer (151667 Qwen2.5, 92546 InternLM2); used
    when building without a tokenizer (``vlmtrain.plan``) and checked against a loaded one."""
    allow_pickle: bool = False
    """Permit loading pickle ``.bin`` weights (they can run code); safetensors never need it."""
    gradient_checkpointing: list[str] = field(default_factory=list)
    """Parts to run with activation checkpointing, e.g. [vision_tower, language_model]; ``part:f``
    checkpoints a fraction f of the part's blocks (``vision_tower:0.5``: every other layer)."""
    compile: list[str] = field(default_factory=list)
    """Parts whose transformer blocks run through ``torch.compile`` (regional, dynamic shapes), e.g.
    [vision_tower, language_model]. Worth it on GPUs; the first steps pay the compilation."""
    init_dtype: str | None = None
    """Round the initial weights to this dtype (``bfloat16``), as a bf16 checkpoint holds them.
    DeepSpeed's bf16 mode keeps bf16 weights and starts its fp32 master copy from them, FSDP2
    mixed precision starts from the fp32 weights: rounded, both start from the same values."""
    compute_dtype: str | None = None
    """Keep the weights in this dtype (``bfloat16``) for compute, with fp32 master copies in the
    optimizer (``vlmtrain.training.master_weights``): no per-micro-batch weight casts, half the
    weight reads. One process only. None: fp32 weights (autocast casts them)."""
    fuse_vit_qkv: bool = False
    """One q/k/v matmul per ViT layer instead of three (``vlmtrain.models.speed``); the state dict
    keeps transformers' names."""
    selective_checkpointing: list[str] = field(default_factory=list)
    """Parts whose blocks run with op-level selective activation checkpointing: matmul and attention
    outputs kept, element-wise work recomputed in backward (less memory, little recompute)."""
    attention: str = "auto"
    """Packed attention backend of the language model: auto (flash_attn, else varlen, else flex,
    else sdpa, by availability), flash_attn, varlen, flex or sdpa (CPU). See vlmtrain.models.attention."""


@dataclass
class DatasetConfig:
    """One source of the mixture."""

    path: str = MISSING
    """A jsonl/json annotation file, meta file or folder."""
    format: str | None = None
    """Reader name (internvl, swift, llava, cogvlm, wds); guessed from the path when None."""
    root: str | None = None
    """Folder that relative media paths are resolved against (default: the annotation's folder)."""
    n_max: int = 6
    """Max tiles per sample (split across the images of a multi-image sample)."""
    min_tiles: int = 1
    repeat: float = 1.0
    """r < 1: a seeded random subset of round(N*r) lines; r > 1: floor(r) copies plus a fraction."""
    jpeg_augment: bool | None = None
    """Random JPEG re-encoding; None: on for image datasets, off for video."""
    template: str | None = None
    system: str | None = None
    min_frames: int | None = None
    """Video frames drawn per video in training (None: data.min_frames)."""
    max_frames: int | None = None
    """Upper bound of that draw, and the frame count at evaluation (None: data.max_frames)."""


def dataset_config(name: str, entry) -> DatasetConfig:
    """One entry of ``data.datasets`` as a DatasetConfig (defaults filled in); an unknown key, a
    wrong type or a missing path is a ValueError naming ``data.datasets.<name>.<key>``."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(entry, DatasetConfig):
        return entry
    if entry is None or not isinstance(entry, (dict, DictConfig)):
        raise UserError(f"data.datasets.{name} must be a mapping of dataset settings, got {entry!r}")
    if isinstance(entry, DictConfig):
        entry = OmegaConf.to_container(entry, resolve=True)  # interpolations resolve against the root
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DatasetConfig), entry)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or ""
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise UserError(f"data.datasets.{name}.{key}: {msg}") from None
    if OmegaConf.is_missing(merged, "path") or merged.path is None:
        raise UserError(f"data.datasets.{name}.path is not set")
    return OmegaConf.to_object(merged)


@dataclass
class DataConfig:
    datasets: dict[str, Any] = field(default_factory=dict)
    """name -> the fields of a DatasetConfig. Untyped here so that a dataset can be added from the
    command line (``+data.datasets.NAME.path=...``: OmegaConf cannot add an entry to a dict of
    dataclasses); ``dataset_config`` checks each entry against DatasetConfig when it is used."""
    template: str = "${model.template}"
    system: str | None = None
    """System prompt; None: the template's default."""
    tile_size: int = "${model.vision.image_size}"  # type: ignore[assignment]
    use_thumbnail: bool = True
    fast_resize: bool = False
    """Opt-in approximate pixels: decode JPEGs at the smallest DCT scale that covers the tile grid
    and resize with one torch bicubic call; faster on large photos, but up to tens of grey levels
    off the reference (README "Pixels"). False: within 2 levels of InternVL's PIL path."""
    max_seq_len: int = 16384
    too_long: str = "skip"
    """What to do with a sample longer than max_seq_len: ``skip`` or ``truncate_text``."""
    on_error: str = "skip"
    """Bad input: ``skip`` (counted per reason, reported) or ``raise`` (names file and line)."""
    micro_batch_size: int = 1
    collate: Any = None
    """How a step's samples become micro-batches (group ``data/collate``): ``padded`` (rows of
    micro_batch_size samples) or ``packed`` (buffers of max_tokens / max_tiles, one row each).
    None: padded."""
    num_workers: int = 2
    persistent_workers: bool = False
    """Keep the loader's worker processes between epochs (only with num_workers > 0): saves their
    start-up and first step at every epoch of a many-epoch run."""
    prefetch_factor: int | None = None
    """Steps each worker builds ahead (None: PyTorch's default, 2; only with num_workers > 0)."""
    balance_ranks: bool = False
    """With several ranks: split each optimizer step's samples over the ranks by estimated compute
    (LLM tokens, plus each tile's ViT work in LLM-token units) instead of round robin, so no rank
    waits for a busier one. The costs are measured once at start-up: image headers are read and
    text is tokenized, no pixel is decoded, and each rank measures 1/world of the data."""
    min_frames: int = 8
    max_frames: int = 32
    path: str | None = None
    """One-off dataset for ``data=single`` (a jsonl, json, meta.json, folder or shard pattern)."""
    format: str | None = None
    """Its format for ``data=single`` (guessed when None)."""


@dataclass
class LoraConfig:
    """Low-rank adapters (peft LoRA) on top of the frozen weights of some parts."""

    targets: list[str] = field(default_factory=lambda: ["llm_attention"])
    """Which linear layers get adapters: any of llm_attention, llm_mlp, vit (see
    ``vlmtrain.models.lora.TARGETS``)."""
    target_modules: str | None = None
    """A regex over full module names; replaces ``targets`` when set."""
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05


@dataclass
class StageConfig:
    """One stage of the InternVL 2.5 recipe: what trains and with which hyperparameters."""

    name: str = MISSING
    trainable: list[str] = field(default_factory=list)
    """Parts that train fully: any of vision_tower, multi_modal_projector, language_model."""
    lr: float = MISSING
    weight_decay: float = 0.05
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Fraction of the run's optimizer steps used for warmup (used when warmup_steps is 0)."""
    drop_path: float = 0.0
    """Stochastic depth of the ViT, rising linearly over its layers to this value."""
    global_batch_size: int = 512
    """Samples per optimizer step over all ranks; gradient accumulation makes up the rest."""
    max_steps: int = -1
    max_epochs: int = 1
    lora: LoraConfig | None = None
    """Adapters on frozen parts; ``trainable`` parts (e.g. the projector) still train fully."""
    objective: Any = None
    """The step's loss, a component (``_target_``, ``vlmtrain.training.objective``); None: SFT's
    cross-entropy, reweighted by the ``loss`` group."""


@dataclass
class HardwareConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: str = "32-true"


@dataclass
class TrainerConfig:
    log_every_n_steps: int = 1
    checkpoint_every_n_steps: int = 0
    """Also write a checkpoint every N optimizer steps (0: only at the end)."""
    checkpoint: bool = True
    """False: write no checkpoint at all (benchmarks; preemption then cannot save either)."""
    enable_progress_bar: bool = True
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device, for the logged MFU estimate. None: looked up from the GPU's
    name (bf16 dense peak; vlmtrain.training.flops.PEAK_BF16_FLOPS); no MFU on a CPU unless set."""
    max_time: str | None = None
    """Stop training after this wall time (Lightning's ``DD:HH:MM:SS``), then save and return as at
    the end of the run: a safety limit for time-boxed runs. None: no limit."""


@dataclass
class TrainConfig:
    seed: int = 0
    run_dir: str = "${hydra:runtime.output_dir}"
    init_from: str | None = None
    """A previous run's directory or .ckpt: start from its weights (stage chaining)."""
    resume: str | None = None
    """Continue an interrupted run exactly (weights, optimizer, scheduler, RNG, data position):
    ``auto`` = run_dir/checkpoints/last.ckpt if it exists (else start fresh), or a checkpoint path."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optim: Any = MISSING
    loss: Any = MISSING
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def schema_node(cls):
    """A schema dataclass as the node to store in Hydra's ConfigStore. Its ``data.datasets`` (if
    any) stays open: ``data.datasets.NAME.KEY=...`` may set any DatasetConfig field or add a dataset
    without ``+``, and dataset_config() checks every entry against DatasetConfig when it is used."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(cls)
    if "data" in schema:
        OmegaConf.set_struct(schema.data.datasets, False)
    return schema


def register_schemas() -> None:
    ConfigStore.instance().store(name="vlmtrain_schema", node=schema_node(TrainConfig))
