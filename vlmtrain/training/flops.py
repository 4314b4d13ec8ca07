"""Model FLOPs of an InternVL-architecture model (ViT -> pixel shuffle -> MLP projector -> LLM).

Counts the matmuls of each part (2 FLOPs per multiply-add) plus attention's two score matmuls,
for the *useful* work of a step: real tokens only (padding is waste and shows as lower MFU),
causal attention over each sample's own tokens (n(n+1)/2 query-key pairs, as a varlen/flash
kernel computes it), and the LM head only at supervised positions (vlmtrain's loss never
computes logits elsewhere). Recomputation from activation checkpointing is not counted (this is
model FLOPs, not hardware FLOPs).

Training multiplies each part's forward FLOPs by the passes it takes: 3 when all its weights
train (forward, input gradient, weight gradient), 2 when gradients only flow through it (frozen,
but a trainable part lies before it, or only adapters train), 1 when nothing before or in it
trains (a frozen ViT in front of a trained projector runs forward only, under no_grad).

    from vlmtrain.training.flops import InternVLDims, training_flops
    dims = InternVLDims.from_hf_config(model.config)
    flops = training_flops(dims, tiles=26, tokens=16384, sum_sq_len=..., supervised=3000)
    mfu = flops / seconds / (peak_flops_per_device("NVIDIA H100 80GB HBM3") * world_size)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vlmtrain.config import PARTS

# transformers model types whose MLP has two matrices (up, down); every other LLM of the recipe
# (qwen2, llama, internlm2 as llama, phi3, mistral) has a gated MLP with three (gate, up, down)
UNGATED_MLP = frozenset({"gpt2", "gpt_neox", "gptj", "opt", "phi", "bloom", "falcon", "starcoder2"})

# dense bf16 tensor-core peak per device, matched in order against torch.cuda.get_device_name()
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),
)


def peak_flops_per_device(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its name; None when the name is not in the table."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


@dataclass(frozen=True)
class InternVLDims:
    """The sizes the FLOP count needs, named as in transformers' InternVL configs."""

    vit_hidden: int
    vit_layers: int
    vit_intermediate: int
    tile_size: int
    patch_size: int
    downsample_ratio: float
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    llm_intermediate: int
    vocab_size: int
    llm_mlp_matrices: int = 3

    @classmethod
    def from_hf_config(cls, config) -> InternVLDims:
        """From an ``InternVLConfig`` (``model.config`` of InternVLForConditionalGeneration)."""
        v, t = config.vision_config, config.text_config
        size = v.image_size[0] if isinstance(v.image_size, (list, tuple)) else v.image_size
        patch = v.patch_size[0] if isinstance(v.patch_size, (list, tuple)) else v.patch_size
        heads = t.num_attention_heads
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
        return cls(
            vit_hidden=v.hidden_size,
            vit_layers=v.num_hidden_layers,
            vit_intermediate=v.intermediate_size,
            tile_size=size,
            patch_size=patch,
            downsample_ratio=config.downsample_ratio,
            llm_hidden=t.hidden_size,
            llm_layers=t.num_hidden_layers,
            llm_heads=heads,
            llm_kv_heads=getattr(t, "num_key_value_heads", None) or heads,
            llm_head_dim=head_dim,
            llm_intermediate=t.intermediate_size,
            vocab_size=t.vocab_size,
            llm_mlp_matrices=2 if t.model_type in UNGATED_MLP else 3,
        )

    @property
    def patches_per_tile(self) -> int:
        return (self.tile_size // self.patch_size) ** 2

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per tile after pixel shuffle (256 for 448 px, patch 14, ratio 0.5)."""
        return int(round(self.patches_per_tile * self.downsample_ratio**2))


def vit_flops_per_tile(d: InternVLDims) -> float:
    """Forward FLOPs of the ViT on one tile: patch embedding, then per layer q/k/v/out
    projections, the MLP, and full (bidirectional) attention over patches + CLS."""
    p, c = d.patches_per_tile, d.vit_hidden
    n = p + 1  # + CLS
    embed = 2 * p * (3 * d.patch_size**2) * c
    matmuls = 2 * n * (4 * c * c + 2 * c * d.vit_intermediate)
    attention = 2 * 2 * n * n * c  # q @ k^T and softmax @ v
    return float(embed + d.vit_layers * (matmuls + attention))


def projector_flops_per_tile(d: InternVLDims) -> float:
    """Forward FLOPs of the MLP projector on one tile's pixel-shuffled features."""
    width_in = int(round(d.vit_hidden / d.downsample_ratio**2))
    return float(2 * d.tokens_per_tile * (width_in * d.llm_hidden + d.llm_hidden * d.llm_hidden))


def llm_matmul_flops_per_token(d: InternVLDims) -> float:
    """Forward FLOPs of the LLM's weight matmuls per token (attention projections + MLP)."""
    q = d.llm_heads * d.llm_head_dim
    kv = d.llm_kv_heads * d.llm_head_dim
    per_layer = d.llm_hidden * (2 * q + 2 * kv) + d.llm_mlp_matrices * d.llm_hidden * d.llm_intermediate
    return float(2 * d.llm_layers * per_layer)


def tile_cost_in_tokens(d: InternVLDims) -> float:
    """A tile's ViT + projector work in units of one LLM token's weight matmuls (its own LLM
    tokens not included): the per-tile weight of the ranks' cost balance (data.balance_ranks)."""
    return (vit_flops_per_tile(d) + projector_flops_per_tile(d)) / llm_matmul_flops_per_token(d)


def llm_flops(d: InternVLDims, tokens: float, sum_sq_len: float, supervised: float) -> float:
    """Forward FLOPs of the LLM over samples with ``tokens`` real tokens in all, whose lengths'
    squares sum to ``sum_sq_len`` (causal attention within each sample), and the LM head on
    ``supervised`` positions."""
    pairs = (sum_sq_len + tokens) / 2  # sum of n(n+1)/2 over samples
    attention = d.llm_layers * 2 * 2 * d.llm_heads * d.llm_head_dim * pairs
    head = 2 * d.llm_hidden * d.vocab_size * supervised
    return float(tokens * llm_matmul_flops_per_token(d) + attention + head)


def pass_factors(trainable: Mapping[str, str]) -> dict[str, int]:
    """Forward+backward passes per part from each part's state: ``full`` (all weights train),
    ``partial`` (some do, e.g. LoRA adapters) or ``frozen``."""
    factors, grad_upstream = {}, False
    for part in PARTS:
        state = trainable.get(part, "frozen")
        if state not in ("full", "partial", "frozen"):
            raise ValueError(f"{part}: trainable state must be full, partial or frozen, got {state!r}")
        if state == "full":
            factors[part] = 3
        elif state == "partial" or grad_upstream:
            factors[part] = 2
        else:
            factors[part] = 1
        grad_upstream = grad_upstream or state != "frozen"
    return factors


def training_flops(
    d: InternVLDims,
    tiles: float,
    tokens: float,
    sum_sq_len: float,
    supervised: float,
    trainable: Mapping[str, str] | None = None,
) -> float:
    """Model FLOPs of one training step (or any sum of steps: every input is a total).

    tiles: real image tiles (a text-only batch's zero-weight dummy tile is not useful work);
    tokens: real tokens entering the LLM (text + image context); sum_sq_len: sum over samples of
    length**2; supervised: positions the LM head and loss run on; trainable: part -> full |
    partial | frozen (default: everything trains, the x3 of instruction tuning).
    """
    factors = pass_factors(trainable or {p: "full" for p in PARTS})
    return (
        factors["vision_tower"] * tiles * vit_flops_per_tile(d)
        + factors["multi_modal_projector"] * tiles * projector_flops_per_tile(d)
        + factors["language_model"] * llm_flops(d, tokens, sum_sq_len, supervised)
    )


def trainable_states(model) -> dict[str, str]:
    """full / partial / frozen for each part of an InternVLForConditionalGeneration (or of a peft
    model wrapping one: its adapters make a part ``partial``)."""
    from vlmtrain.models.family import family_of

    part_of = family_of(model).part_of
    flags: dict[str, list[bool]] = {p: [] for p in family_of(model).parts}
    for name, param in model.named_parameters():
        flags[part_of(name.removeprefix("base_model.model."))].append(param.requires_grad)
    return {
        part: "full" if f and all(f) else "partial" if any(f) else "frozen" for part, f in flags.items()
    }
