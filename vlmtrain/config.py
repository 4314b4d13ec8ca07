"""Typed schemas for every config group.

The YAML files under conf/ are merged on top of these dataclasses (registered in Hydra's
ConfigStore as ``vlmtrain_schema``), so a misspelled key or a value of the wrong type fails at
compose time with the key's full name, before anything is built.

Every closed set of strings is an Enum (``Choice``), so ``data.on_error=rais`` fails at compose
naming the key and the allowed values; value ranges (``n_max >= 1``, ``stage.lr > 0``, ...) are
checked right after compose by ``check_values`` (each dataclass's ``__post_init__`` runs the same
checks when a config is converted to the dataclasses, ``OmegaConf.to_object``).

Groups whose options are whole components (optim, loss, logger, hardware.strategy, data.collate,
stage.objective) carry a ``_target_`` and are typed ``Any`` here: the option *file* picks the
component and ``hydra.utils.instantiate`` checks its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from vlmtrain.data.templates import TEMPLATES
from vlmtrain.errors import UserError

PARTS = ("vision_tower", "multi_modal_projector", "language_model")


class Choice(str, Enum):
    """A closed set of strings. Members are named by their values (OmegaConf converts a YAML or
    command-line string by member name) and are strings: ``OnError("skip") == "skip"``, f-strings and
    ``str()`` give the bare value, dictionaries keyed by the strings find them."""

    def __str__(self) -> str:
        return str.__str__(self)

    __format__ = str.__format__  # type: ignore[assignment]

    @classmethod
    def _missing_(cls, value):
        # OmegaConf looks an int up by value: `hardware.precision=32` is the member "32"
        return cls.__members__.get(str(value))


def choice(name: str, values, module: str = __name__) -> type[Choice]:
    """A Choice enum of ``values`` (any strings, ``32-true`` too: members are looked up by name),
    to be bound to the module-level ``name`` of ``module`` (so that it pickles)."""
    return Choice(name, {v: v for v in values}, module=module, qualname=name)  # type: ignore[call-overload]


def plain(value):
    """The bare string of a Choice (for libraries that want ``str``), anything else as it is."""
    return value.value if isinstance(value, Enum) else value


if TYPE_CHECKING:  # mypy cannot follow the functional API with computed members: the fields are strs
    Part = Choice
    NormType = Choice
    Attention = Choice
    DType = Choice
    Template = Choice
    DataFormat = Choice
    TooLong = Choice
    OnError = Choice
    LoraTarget = Choice
    Accelerator = Choice
    Precision = Choice
else:
    Part = choice("Part", (*PARTS, "visual_expert"))
    """The model's three parts (stage.trainable, model.compile), and the freeze groups a family adds
    (CogVLM's ``visual_expert``); ``Family.parts`` says which a model has (``apply_stage`` checks)."""
    NormType = choice("NormType", ["layer_norm", "rms_norm"])
    Attention = choice("Attention", ["auto", "flash_attn", "varlen", "flex", "sdpa"])
    """model.attention: ``auto`` or a backend of vlmtrain.models.attention.BACKENDS (a test keeps them equal)."""
    DType = choice("DType", ["bfloat16", "float16", "float32"])
    Template = choice("Template", TEMPLATES)
    """Chat templates: the names of vlmtrain.data.templates.TEMPLATES."""
    DataFormat = choice("DataFormat", ["internvl", "swift", "llava", "cogvlm", "wds", "preference", "meta"])
    """Annotation readers: vlmtrain.data.formats.FORMATS plus ``meta`` (a meta file of datasets);
    named here because formats imports this module (a test keeps them equal)."""
    TooLong = choice("TooLong", ["skip", "truncate_text"])
    OnError = choice("OnError", ["skip", "raise"])
    LoraTarget = choice("LoraTarget", ["llm_attention", "llm_mlp", "vit", "expert_attention", "expert_mlp"])
    """Named groups of linear layers: the keys of vlmtrain.models.lora.TARGETS (a test keeps them
    equal), plus CogVLM's visual-expert groups (``CogVLMFamily.lora_targets``)."""
    Accelerator = choice("Accelerator", ["cpu", "gpu", "cuda", "mps", "tpu", "auto"])
    """Lightning's accelerator names."""
    Precision = choice("Precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
                                     "transformer-engine", "transformer-engine-float16", "32", "16", "bf16", "64"])
    """Lightning's precision names (``lightning.fabric.connector._PRECISION_INPUT_STR``; a test keeps them equal)."""


# -- value ranges -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    ok: Callable[[Any], bool]
    says: str
    """What a good value is, as the error says it (``>= 1``)."""


AT_LEAST_1 = Range(lambda v: v >= 1, "an integer >= 1")
POSITIVE = Range(lambda v: math.isfinite(v) and v > 0, "a finite number > 0")

RANGES: dict[str, dict[str, Range]] = {
    "DatasetConfig": {"n_max": AT_LEAST_1, "min_tiles": AT_LEAST_1, "repeat": POSITIVE},
    "DataConfig": {"max_seq_len": AT_LEAST_1, "micro_batch_size": AT_LEAST_1,
                   "num_workers": Range(lambda v: v >= 0, "an integer >= 0")},
    "StageConfig": {"lr": POSITIVE, "global_batch_size": AT_LEAST_1},
    "LoraConfig": {"r": AT_LEAST_1},
    "HardwareConfig": {"num_nodes": AT_LEAST_1},
}
"""Per schema class: field -> its range. Checked after compose (``check_values``) and when a config
becomes the dataclass (``__post_init__``)."""


def range_errors(cls_name: str, get: Callable[[str], Any], prefix: str) -> list[str]:
    """One message per field of ``cls_name`` out of its range; ``get(field)`` reads the value (an
    exception there, e.g. an interpolation that resolves only later, skips the field)."""
    out = []
    for key, rule in RANGES.get(cls_name, {}).items():
        try:
            v = get(key)
        except Exception:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue  # unset (???) or not a number: OmegaConf's own type check reports that
        if not rule.ok(v):
            out.append(f"{prefix}{key}={v!r} must be {rule.says}")
    return out


class Checked:
    """A schema whose ``__post_init__`` checks its value ranges (``RANGES``), naming keys under
    ``KEY`` (e.g. ``data.``)."""

    KEY: ClassVar[str] = ""

    def __post_init__(self) -> None:
        errors = range_errors(type(self).__name__, lambda k: getattr(self, k), self.KEY)
        if errors:
            raise UserError("; ".join(errors))


def world_size(devices, num_nodes) -> int | None:
    """Ranks of a run from hardware.devices / num_nodes; None when only the machine knows (``auto``)."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        per_node = devices
    elif isinstance(devices, str) and devices.strip().isdigit():
        per_node = int(devices)
    elif isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        per_node = len(devices)
    else:
        return None
    return per_node * int(num_nodes) if per_node > 0 else None


def check_values(cfg) -> None:
    """The value ranges of a composed config (a DictConfig of any verb's schema), one line naming
    every bad key; also that stage.global_batch_size splits evenly over the ranks. Values that only
    resolve later (an interpolation into a part the command fills in) are checked when used."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def node(key: str):
        try:
            n = OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:
            return None
        return n if isinstance(n, DictConfig) else None

    errors: list[str] = []
    for key, cls in (("data", "DataConfig"), ("stage", "StageConfig"), ("stage.lora", "LoraConfig"),
                     ("hardware", "HardwareConfig")):
        n = node(key)
        if n is not None:
            errors += range_errors(cls, n.__getitem__, f"{key}.")
    datasets = node("data.datasets")
    for name in datasets or ():
        entry = datasets._get_node(name)
        if isinstance(entry, DictConfig) and not entry._is_none() and not entry._is_interpolation():
            try:  # keys, types and choices (datasets are untyped at compose); nothing is resolved
                OmegaConf.merge(OmegaConf.structured(DatasetConfig), entry)
            except OmegaConfBaseException as e:
                errors.append(f"data.datasets.{name}.{_omegaconf_error(e)}")
                continue
            errors += range_errors("DatasetConfig", entry.__getitem__, f"data.datasets.{name}.")
    for key in ("model.vision.hidden_act", "model.projector_hidden_act"):  # transformers' activations
        try:
            act = OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:
            continue
        if isinstance(act, str):
            from transformers.activations import ACT2FN

            if act not in ACT2FN:
                errors.append(f"{key}={act!r} is not one of transformers' activations [{', '.join(sorted(ACT2FN))}]")
    stage, hw = node("stage"), node("hardware")
    try:
        batch = stage.global_batch_size if stage is not None else None
        world = world_size(hw.devices, hw.num_nodes) if hw is not None else None
    except Exception:
        batch = world = None
    if isinstance(batch, int) and batch >= 1 and world and batch % world:
        errors.append(f"stage.global_batch_size={batch} must be divisible by the {world} ranks "
                      f"(hardware.devices x hardware.num_nodes)")
    if errors:
        raise UserError("; ".join(errors))


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
    norm_type: NormType = NormType("layer_norm")
    """``layer_norm`` (InternViT-300M) or ``rms_norm`` (InternViT-6B)."""
    use_qk_norm: bool = False
    attention_bias: bool = True
    layer_norm_eps: float = 1e-6
    layer_scale_init_value: float = 0.1
    hidden_act: str = "gelu"
    config: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments of the family's vision config (e.g. CLIP's ``projection_dim``)."""
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
    family: Any = None
    """The model family, a component (``_target_``, ``vlmtrain.models.family.Family``) with the
    family's own settings as keyword arguments; None: InternVL (``InternVLFamily``)."""
    path: str | None = None
    """A local InternVL checkpoint (HF-native or OpenGVLab layout). None: random init."""
    tokenizer: str | None = None
    """A local tokenizer directory. None: the checkpoint's, else the one vlmtrain ships."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    projector_path: str | None = None
    """Load the projector alone, over what ``path`` / ``vision.path`` / ``llm.path`` loaded: a file
    that holds only it, as LLaVA's pretrain stage writes (``mm_projector.bin``) and MiniGPT-4 releases
    (``pretrained_minigpt4*.pth``: ``llama_proj``); pickle files need ``allow_pickle``."""
    vision_select_layer: int = -1
    template: Template = Template("internvl2_5")
    image_mode: str = "tile"
    """How an image becomes tiles at inference (chat, eval) and, by default, in training
    (``data.image_mode``): tile, anyres, pad, crop, resize or random_crop (``vlmtrain.data.tiling.IMAGE_MODES``)."""
    image_token_id: int | None = None
    """``<IMG_CONTEXT>``'s id in the released tokenizer (151667 Qwen2.5, 92546 InternLM2); used
    when building without a tokenizer (``vlmtrain.plan``) and checked against a loaded one."""
    allow_pickle: bool = False
    """Permit loading pickle ``.bin`` weights (they can run code); safetensors never need it."""
    gradient_checkpointing: list[str] = field(default_factory=list)
    """Parts to run with activation checkpointing, e.g. [vision_tower, language_model]; ``part:f``
    checkpoints a fraction f of the part's blocks (``vision_tower:0.5``: every other layer)."""
    compile: list[Part] = field(default_factory=list)
    """Parts whose transformer blocks run through ``torch.compile`` (regional, dynamic shapes), e.g.
    [vision_tower, language_model]. Worth it on GPUs; the first steps pay the compilation."""
    init_dtype: DType | None = None
    """Round the initial weights to this dtype (``bfloat16``), as a bf16 checkpoint holds them.
    DeepSpeed's bf16 mode keeps bf16 weights and starts its fp32 master copy from them, FSDP2
    mixed precision starts from the fp32 weights: rounded, both start from the same values."""
    compute_dtype: DType | None = None
    """Keep the weights in this dtype (``bfloat16``) for compute, with fp32 master copies in the
    optimizer (``vlmtrain.training.master_weights``): no per-micro-batch weight casts, half the
    weight reads. One process only. None: fp32 weights (autocast casts them)."""
    fuse_vit_qkv: bool = False
    """One q/k/v matmul per ViT layer instead of three (``vlmtrain.models.speed``); the state dict
    keeps transformers' names."""
    selective_checkpointing: list[Part] = field(default_factory=list)
    """Parts whose blocks run with op-level selective activation checkpointing: matmul and attention
    outputs kept, element-wise work recomputed in backward (less memory, little recompute)."""
    attention: Attention = Attention("auto")
    """Packed attention backend of the language model: auto (flash_attn, else varlen, else flex,
    else sdpa, by availability), flash_attn, varlen, flex or sdpa (CPU). See vlmtrain.models.attention."""


@dataclass
class DatasetConfig(Checked):
    """One source of the mixture."""

    KEY: ClassVar[str] = ""

    path: str = MISSING
    """A jsonl/json annotation file, meta file or folder."""
    format: DataFormat | None = None
    """Reader name (internvl, swift, llava, cogvlm, wds); guessed from the path when None."""
    root: str | None = None
    """Folder that relative media paths are resolved against (default: the annotation's folder)."""
    n_max: int = 6
    """Max tiles per sample (split across the images of a multi-image sample)."""
    min_tiles: int = 1
    repeat: float = 1.0
    """r < 1: a seeded random subset of round(N*r) lines; r > 1: floor(r) copies plus a fraction."""
    jpeg_augment: bool | None = None
    """Random JPEG re-encoding in training; None: ``data.jpeg_augment``'s."""
    tile_cache: str | None = None
    """A folder of pre-tiled images (``vlmtrain.data.tile_cache.build_tile_cache``): their tiles are
    read from it instead of decoded and resized (the JPEG augmentation still runs per sample)."""
    template: Template | None = None
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
        raise UserError(f"data.datasets.{name}.{_omegaconf_error(e)}") from None
    if OmegaConf.is_missing(merged, "path") or merged.path is None:
        raise UserError(f"data.datasets.{name}.path is not set")
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except UserError as e:  # DatasetConfig.__post_init__: a value out of its range
        raise UserError(f"data.datasets.{name}.{e}") from None


def _omegaconf_error(e: Exception) -> str:
    """``key: message`` of an OmegaConf validation error, on one line."""
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or ""
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    return f"{key}: {msg}"


@dataclass
class DataConfig(Checked):
    KEY: ClassVar[str] = 'data.'

    datasets: dict[str, Any] = field(default_factory=dict)
    """name -> the fields of a DatasetConfig. Untyped here so that a dataset can be added from the
    command line (``+data.datasets.NAME.path=...``: OmegaConf cannot add an entry to a dict of
    dataclasses); ``dataset_config`` checks each entry against DatasetConfig when it is used."""
    template: Template = "${model.template}"  # type: ignore[assignment]
    system: str | None = None
    """System prompt; None: the template's default."""
    tile_size: int = "${model.vision.image_size}"  # type: ignore[assignment]
    use_thumbnail: bool = True
    jpeg_augment: bool | None = None
    """Random JPEG re-encoding (quality 75-100, training only) of datasets that do not set their
    own: None: images yes, video frames no (InternVL 2.5's recipe); false: none (the LLaVA,
    LLaVA-NeXT, MiniGPT-4 and CogVLM stage files set it: their recipes do not re-encode)."""
    image_mode: str | None = None
    """How an image becomes the ViT's tiles (``vlmtrain.data.tiling.IMAGE_MODES``); None: the
    model's (``model.image_mode``, carried by the family's ImageLayout). ``tile``
    (InternVL's dynamic tiling, n_max tiles + thumbnail), ``anyres`` (LLaVA-NeXT's grid at the
    best of the model's pinpoints + a whole-image tile first; n_max and min_tiles do not apply,
    videos are skipped as ``bad_media``), ``pad`` (LLaVA's pad to square with the
    mean colour, one tile), ``crop`` (CLIP's shortest side to the tile size, centre crop, one
    tile), ``resize`` (squashed to the tile, one tile: BLIP-2 / MiniGPT-4 at evaluation) or
    ``random_crop`` (MiniGPT-4's training: a random resized crop, scale 0.5-1; ``resize`` outside
    training)."""
    fast_resize: bool = False
    """Opt-in approximate pixels: decode JPEGs at the smallest DCT scale that covers the tile grid
    and resize with one torch bicubic call; faster on large photos, but up to tens of grey levels
    off the reference (README "Pixels"). False: within 2 levels of InternVL's PIL path."""
    max_seq_len: int = 16384
    too_long: TooLong = TooLong("skip")
    """What to do with a sample longer than max_seq_len: ``skip`` or ``truncate_text``."""
    on_error: OnError = OnError("skip")
    """Bad input: ``skip`` (counted per reason, reported) or ``raise`` (names file and line)."""
    media_outside_root: bool = False
    """Allow media paths that point outside their dataset's root (absolute paths, ``../``); by
    default such a line is a counted ``media_outside_root`` skip, so data cannot read (or
    ``vlmtrain shard`` copy) arbitrary files. Symlinks inside the root are followed either way."""
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
    format: DataFormat | None = None
    """Its format for ``data=single`` (guessed when None)."""


@dataclass
class LoraConfig(Checked):
    """Low-rank adapters (peft LoRA) on top of the frozen weights of some parts."""

    KEY: ClassVar[str] = 'stage.lora.'

    targets: list[LoraTarget] = field(default_factory=lambda: [LoraTarget("llm_attention")])
    """Which linear layers get adapters: any of llm_attention, llm_mlp, vit (see
    ``vlmtrain.models.lora.TARGETS``)."""
    target_modules: str | None = None
    """A regex over full module names; replaces ``targets`` when set."""
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05


@dataclass
class StageConfig(Checked):
    """One stage of the InternVL 2.5 recipe: what trains and with which hyperparameters."""

    KEY: ClassVar[str] = 'stage.'

    name: str = MISSING
    trainable: list[Part] = field(default_factory=list)
    """Parts that train fully: any of vision_tower, multi_modal_projector, language_model."""
    lr: float = MISSING
    weight_decay: float = 0.05
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Fraction of the run's optimizer steps used for warmup (used when warmup_steps is 0)."""
    min_lr_ratio: float = 0.0
    """Where the cosine ends, as a fraction of the peak lr (MiniGPT-4's min_lr / init_lr)."""
    drop_path: float = 0.0
    """Stochastic depth of the ViT, rising linearly over its layers to this value."""
    global_batch_size: int = 512
    """Samples per optimizer step over all ranks; gradient accumulation makes up the rest."""
    max_steps: int = -1
    max_epochs: int = 1
    lr_scale: dict[str, float] | None = None
    """Per-part lr multipliers the stage's recipe pins (CogVLM's SFT: ``{vision_tower: 0.1}``);
    ``optim.lr_scale`` defaults to it."""
    lora: LoraConfig | None = None
    """Adapters on frozen parts; ``trainable`` parts (e.g. the projector) still train fully."""
    objective: Any = None
    """The step's loss, a component (``_target_``, ``vlmtrain.training.objective``); None: SFT's
    cross-entropy, reweighted by the ``loss`` group."""
    reference: Any = None
    """Preference stages: where the reference model's log-probs come from (group ``stage/reference``:
    copy, adapter or precomputed; ``vlmtrain.training.preference``)."""


@dataclass
class HardwareConfig(Checked):
    KEY: ClassVar[str] = 'hardware.'

    accelerator: Accelerator = Accelerator("cpu")
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: Precision = Precision("32-true")


@dataclass
class TrainerConfig:
    log_every_n_steps: int = 1
    checkpoint_every_n_steps: int = 0
    """Also write ``last.ckpt`` every N optimizer steps (0: by time, ``checkpoint_every_minutes``)."""
    checkpoint_every_minutes: float = 30.0
    """When ``checkpoint_every_n_steps`` is 0: also write ``last.ckpt`` at the first step boundary
    after every this many minutes of training, so a crash or kill -9 loses at most that much
    (0: only at the end and on preemption)."""
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
    init_parts: list[Part] | None = None
    """Parts of the model that ``init_from`` loads (of vision_tower, multi_modal_projector,
    language_model; lm_head goes with language_model); None: all. The others keep their
    initialisation, so a ViT can move onto another LLM (the recipe's progressive scaling)."""
    resume: str | None = None
    """Continue an interrupted run exactly (weights, optimizer, scheduler, RNG, data position):
    ``auto`` = run_dir/checkpoints/last.ckpt if it exists (else start fresh), or a checkpoint path.
    The run continues with its own config.yaml (``vlmtrain.training.resume_config``)."""
    resume_changes: list[str] = field(default_factory=list)
    """Keys a resumed run may change on purpose (``resume_changes=[stage.max_steps]``); any other
    command-line key that differs from the run's config.yaml is refused, naming it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optim: Any = MISSING
    loss: Any = MISSING
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def components_as_nodes(obj) -> None:
    """In a config converted to the dataclasses, turn every untyped (``Any``) mapping back into a
    DictConfig, in place: the ``_target_`` components (optim, loss, logger, hardware.strategy,
    data.collate, stage.objective) stay instantiable and read by attribute. Typed dict fields
    (``data.datasets``, ``model.llm.config``) stay plain dicts."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            components_as_nodes(value)
        elif hints.get(f.name) is Any and isinstance(value, (dict, list)):
            setattr(obj, f.name, OmegaConf.create(value))


def typed(cfg, schema: type = None):  # type: ignore[assignment]
    """A composed config (a DictConfig on a schema, TrainConfig by default) as its dataclasses, once,
    at the entry point: every interpolation resolved, every choice an Enum, every range checked
    (``__post_init__``); ``_target_`` components stay DictConfig nodes (``components_as_nodes``).
    A dataclass passes through."""
    import dataclasses

    from omegaconf import MissingMandatoryValue, OmegaConf

    schema = schema or TrainConfig
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return cfg
    if OmegaConf.get_type(cfg) is not schema:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    try:
        out = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise UserError(f"{e.full_key} is required: add {e.full_key}=... to the command") from None
    components_as_nodes(out)
    return out


def schema_node(cls):
    """A schema dataclass as the node to store in Hydra's ConfigStore. Its ``data.datasets`` (if
    any) stays open: ``data.datasets.NAME.KEY=...`` may set any DatasetConfig field or add a dataset
    without ``+``, and dataset_config() checks every entry against DatasetConfig when it is used."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(cls)
    if "data" in schema and OmegaConf.is_config(schema.data) and "datasets" in schema.data:
        OmegaConf.set_struct(schema.data.datasets, False)
    return schema


def register_schemas() -> None:
    ConfigStore.instance().store(name="vlmtrain_schema", node=schema_node(TrainConfig))
