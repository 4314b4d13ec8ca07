"""Training throughput of the product (``python -m vlmtrain``'s own objects) against a strong and a
naive transformers baseline, on one device, random weights, the same samples for every row.

    python experiments/bench/throughput.py experiment=bench_internvl2_5_1b --out t1b.json --md t1b.md
    python experiments/bench/throughput.py experiment=bench_internvl2_5_2b --rows trainer,loop --steps 6
    python experiments/bench/throughput.py --device cpu --steps 2 --warmup 1 --samples-per-step 4   # tiny model

Any other argument is a vlmtrain override (``model.gradient_checkpointing=[vision_tower]`` ...). The
bench first writes a synthetic mixture to disk (JPEG images whose tile grids give 1..13 tiles per
sample, 50..1500 text tokens, a third prompt and the rest supervised answer: an InternVL jsonl), then
reads it through the configured data module (``vlmtrain.training.run.build_parts``), so every row
trains on the same encoded samples, in the same steps, in the order the trainer's sampler gives.

Rows (``--rows``, in this order):

- ``trainer``: Lightning ``fit`` of the module ``python -m vlmtrain`` builds (its training step,
  optimizer, clipping, scheduler; compiled as ``model.compile`` says), the loader's workers reading
  the JPEG files and collating in the loop. Whole-step rate over the timed steps, from CUDA events
  (host clock on a CPU), and how much of that time the device waited on the host between steps
  (the gap between one step's last queued work finishing and the next step being queued).
- ``loop``: the same module's step without Lightning (``bench_step``: the objective, the configured
  optimizer, clipping and scheduler, bf16 autocast when the hardware says bf16-mixed) on the same
  steps collated and pinned before the clock: the upper bound the trainer should reach.
- ``hf_strong``: what a careful transformers user writes: ``InternVLForConditionalGeneration``,
  padding-free flattened micro-batches (``transformers.DataCollatorWithFlattening``: one row,
  position ids restart per sample) within the config's packing budget, the best
  ``attn_implementation`` on the host (flash_attention_3 / 2 when installed, else sdpa; ``--hf-attn``),
  chunked cross-entropy on supervised positions only (logits recomputed per chunk in backward),
  loss over the step's supervised tokens, fused AdamW, regional ``torch.compile`` of every block.
- ``hf_naive``: padded micro-batches of ``--baseline-batch`` samples, sdpa, ``model(labels=...)``
  (full logits), loss / micro-batches, ``torch.optim.AdamW`` defaults, eager.

tokens/s counts every token entering the LLM (image + text, no padding). MFU: the project's model
FLOPs (``vlmtrain.training.flops.training_flops``, the same count for every row) / time / the
device's dense bf16 peak (``--peak-tflops``, else looked up from the GPU's name; none on a CPU).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from vlmtrain.cli import CONFIG_DIR, register  # noqa: E402
from vlmtrain.data.collate import Step  # noqa: E402
from vlmtrain.data.encode import EncodedSample  # noqa: E402
from vlmtrain.data.images import normalize_pixels  # noqa: E402
from vlmtrain.models.internvl import build_from_config, internvl_config, tokens_per_tile  # noqa: E402
from vlmtrain.training.flops import InternVLDims, peak_flops_per_device, training_flops  # noqa: E402
from vlmtrain.training.loss import IGNORE_INDEX  # noqa: E402

ROWS = ("trainer", "loop", "hf_strong", "hf_naive")
EXTRA_ROWS = ("hf_strong_flex",)
"""Not in the default set: ``hf_strong`` with transformers' flex_attention (block-sparse packed mask;
CUDA only: flex has no backward on a CPU)."""
SAC = "model.selective_checkpointing=[vision_tower,language_model]"
ABLATION = {  # --ablation: the bench loop with each speed lever of issue 21 alone and together
    "none": [],
    "bf16_master": ["model.compute_dtype=bfloat16"],
    "fused_vit_qkv": ["model.fuse_vit_qkv=true"],
    "selective_ckpt": [SAC],
    "all": ["model.compute_dtype=bfloat16", "model.fuse_vit_qkv=true", SAC],
    "all_16k_buffers": ["model.compute_dtype=bfloat16", "model.fuse_vit_qkv=true", SAC,
                        "data.collate.max_tokens=16384", "data.collate.max_tiles=48"],
}
WORDS = ("the of and to in is that for it as with was on be by at this from or an are which have "
         "image shows red blue green large small left right top bottom near far object colour shape "
         "count number two three four five person car tree house sky water road light dark").split()


# -- the synthetic mixture, on disk ------------------------------------------------------------------------


def grid_for(tiles: int, rng: random.Random) -> tuple[int, int]:
    """(rows, cols) with rows * cols == tiles, picked at random among the factor pairs."""
    pairs = [(r, tiles // r) for r in range(1, tiles + 1) if tiles % r == 0]
    return rng.choice(pairs)


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def write_mixture(root: Path, n: int, tile: int, max_grid: int, text: tuple[int, int], seed: int = 0) -> Path:
    """``n`` InternVL jsonl lines with one JPEG each under ``root``; return the jsonl's path.

    A sample's image is exactly a (rows x cols) grid of tiles, rows * cols ~ U{1..max_grid}, so
    dynamic tiling (n_max = max_grid) cuts it into that grid plus a thumbnail (1 tile: none): 1,
    3..max_grid+1 tiles. Pixels are smooth random fields (upscaled noise) saved at quality 90, so
    decoding costs what a photo of that size costs. Text: ~U{text} words, a third in the prompt."""
    from PIL import Image

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rows, cols = grid_for(rng.randint(1, max_grid), rng)
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        small = torch.randint(0, 256, (rows * 8, cols * 8, 3), dtype=torch.uint8, generator=g).numpy()
        img = Image.fromarray(small).resize((cols * tile, rows * tile), Image.BICUBIC)
        rel = f"images/{i:05d}.jpg"
        img.save(root / rel, quality=90)
        t = rng.randint(*text)
        prompt, answer = max(1, t // 3), max(1, t - t // 3)
        lines.append({"id": f"bench-{i:05d}", "image": rel, "width": img.width, "height": img.height,
                      "conversations": [{"from": "human", "value": "<image>\n" + words(prompt, rng)},
                                        {"from": "gpt", "value": words(answer, rng)}]})
    path = root / "annotations.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# -- config -----------------------------------------------------------------------------------------------


def compose_cfg(overrides: list[str]):
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def bench_overrides(args, data_path: Path, run_dir: Path) -> list[str]:
    """What the bench sets on top of the user's overrides: its data, steps and quiet logging."""
    return [
        "data=single", f"data.path={data_path}", f"data.datasets.single.n_max={args.max_grid}",
        f"stage.global_batch_size={args.samples_per_step}", f"stage.max_steps={args.warmup + args.steps}",
        "stage.max_epochs=1", f"run_dir={run_dir}", "trainer.checkpoint=false",
        "trainer.enable_progress_bar=false", f"trainer.log_every_n_steps={args.log_every}",
    ]


# -- timing -----------------------------------------------------------------------------------------------


class Clock:
    """Device-side time stamps (CUDA events; host clock on a CPU) and a synchronize."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1e3
        return b - a

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def graphs_compiled() -> int:
    """dynamo's running count of graphs compiled."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def free_memory(device):
    """Between rows: each row compiles from a clean dynamo cache (the models of several rows share
    block classes; their graphs would pile up towards dynamo's recompile limit), memory released."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_loop(step_fn, batches: list, warmup: int, device) -> dict:
    """``warmup`` untimed steps, then one timed step per remaining batch; device time."""
    clock = Clock(device)
    for b in batches[:warmup]:
        step_fn(b)
    clock.sync()
    reset_peak(device)
    g0 = graphs_compiled()
    start = clock.mark()
    micro = sum(step_fn(b) for b in batches[warmup:])
    end = clock.mark()
    clock.sync()
    return {"seconds": clock.seconds(start, end), "micro_batches": micro, "peak_mem_gib": peak_gib(device),
            "graphs_compiled_while_timed": graphs_compiled() - g0}


# -- row (a): the trainer ---------------------------------------------------------------------------------


def step_tokens(step: Step) -> int:
    """Real tokens of a step (host copies: called before the step moves its micro-batches)."""
    return sum(int(mb.attention_mask.sum()) for mb in step.micro_batches if not mb.zero_weight)


class SyncRecorder:
    """The synchronising CUDA calls of one step and where they come from (``torch.cuda.set_sync_debug_mode``):
    each makes the host wait for the GPU, so the GPU idles while the host queues what follows. The
    trainer row's device-idle figure counts only the gaps between steps; these are the ones inside."""

    def __init__(self):
        self.sites: dict[str, int] = {}
        self.on = False

    def start(self):
        import traceback
        import warnings

        self._show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename][-4:]
            site = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
            self.sites[site] = self.sites.get(site, 0) + 1

        warnings.showwarning = show
        self._filters = warnings.filters[:]
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        self.on = True
        return self

    def stop(self):
        import warnings

        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show
        warnings.filters[:] = self._filters
        self.on = False


def make_step_clock(warmup: int, device):
    """A Lightning callback timing the trainer's steps (built here: the bench imports Lightning only
    for the trainer row)."""
    import lightning.pytorch as pl

    class StepClock(pl.Callback):
        def __init__(self):
            self.clock = Clock(device)
            self.starts, self.ends, self.tokens, self.micro = [], [], [], []
            self.graphs = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if len(self.starts) == warmup:
                reset_peak(device)
                self.graphs = graphs_compiled()
            self.tokens.append(step_tokens(batch))
            self.micro.append(len(batch.micro_batches))
            if self.clock.cuda and len(self.starts) == warmup - 1:
                self.syncs = SyncRecorder().start()  # the last warm-up step: where the host waits for the GPU
            self.starts.append(self.clock.mark())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if getattr(self, "syncs", None) is not None and self.syncs.on:
                self.syncs.stop()
            self.ends.append(self.clock.mark())

        def result(self) -> dict:
            self.clock.sync()
            n = len(self.ends)
            if n <= warmup:
                raise RuntimeError(f"the trainer ran {n} steps, not more than the {warmup} warm-up steps")
            window = self.clock.seconds(self.ends[warmup - 1], self.ends[-1]) if warmup else \
                self.clock.seconds(self.starts[0], self.ends[-1])
            waits = [max(0.0, self.clock.seconds(self.ends[i - 1], self.starts[i])) for i in range(max(1, warmup), n)]
            return {"seconds": window, "micro_batches": sum(self.micro[warmup:]), "peak_mem_gib": peak_gib(device),
                    "graphs_compiled_while_timed": graphs_compiled() - (self.graphs or 0),
                    "tokens_seen": sum(self.tokens[warmup:]),
                    "host_wait_seconds": sum(waits), "host_wait_share": sum(waits) / window,
                    "host_wait_max_ms": 1e3 * max(waits, default=0.0),
                    "host_syncs_in_a_warmup_step": self.syncs.sites if getattr(self, "syncs", None) else None}

    return StepClock()


def run_trainer(cfg, args, device) -> dict:
    import lightning.pytorch as pl

    from vlmtrain.config import typed
    from vlmtrain.training.run import build_parts, build_trainer

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    cfg = typed(cfg)  # as `vlmtrain train` passes it below its entry point
    tokenizer, model, data, module = build_parts(cfg)
    clock = make_step_clock(args.warmup, device)
    trainer = build_trainer(cfg, Path(cfg.run_dir), callbacks=[clock])
    trainer.fit(module, datamodule=data)
    stats = clock.result()
    stats["attention_backend"] = model.config.text_config._attn_implementation
    del trainer, module, model, data
    return stats


# -- row (b): the module's step without Lightning ---------------------------------------------------------


def bench_step(model, objective, optimizer, scheduler, grad_clip, autocast_dtype, device):
    """One optimizer step as ``VLMTrainingModule.training_step`` takes it on one device: the step's
    weight from the host copy of the counts, each micro-batch's objective scaled by it, clipping,
    the optimizer and the scheduler."""
    from vlmtrain.training.strategies import clip_grad_norm

    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(s: Step) -> int:
        w_total = objective.step_weight(s).to(device, non_blocking=True).clamp(min=1e-12)
        for mb in s.micro_batches:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                num = objective(model, mb.to(device)).total
            (num / w_total).backward()
        clip_grad_norm(None, params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return len(s.micro_batches)

    return step


def autocast_dtype(cfg):
    return torch.bfloat16 if str(cfg.hardware.precision).startswith("bf16") else None


def run_loop(cfg, args, device, pool) -> dict:
    from vlmtrain.config import typed
    from vlmtrain.training.module import build_optimizer
    from vlmtrain.training.run import build_parts

    torch.manual_seed(cfg.seed)
    cfg = typed(cfg)
    tokenizer, model, data, module = build_parts(cfg)
    model.to(device).train()
    module.train()  # frozen parts in eval mode, as under Lightning
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.stage, args.warmup + args.steps)
    collate = data.collator(tokenizer.pad_token_id)
    batches = [pinned(collate(samples), device) for samples in pool]
    step = bench_step(model, module.objective, optimizer, scheduler, cfg.optim.grad_clip, autocast_dtype(cfg), device)
    stats = time_loop(step, batches, args.warmup, device)
    stats["attention_backend"] = model.config.text_config._attn_implementation
    return stats


def pinned(x, device):
    return x.pin_memory() if device.type == "cuda" else x


# -- rows (c), (d): transformers baselines ----------------------------------------------------------------


@dataclass
class HFBatch:
    """A baseline's micro-batch: model inputs, and the supervised positions for a chunked loss."""

    inputs: dict
    positions: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def pin_memory(self):
        for k, v in self.inputs.items():
            if isinstance(v, torch.Tensor):
                self.inputs[k] = v.pin_memory()
        if self.positions is not None:
            self.positions, self.targets = self.positions.pin_memory(), self.targets.pin_memory()
        return self

    def to(self, device) -> HFBatch:
        move = lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return HFBatch({k: move(v) for k, v in self.inputs.items()}, move(self.positions), move(self.targets))


def best_hf_attention(device: torch.device, choice: str) -> str:
    """The fastest ``attn_implementation`` transformers has on this host for padding-free batches."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        if importlib.util.find_spec("flash_attn_interface") is not None:
            return "flash_attention_3"
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def flatten_groups(samples: list[EncodedSample], max_tokens: int, max_tiles: int) -> list[list[EncodedSample]]:
    """Consecutive samples filled into micro-batches of at most max_tokens tokens / max_tiles tiles
    (the user's token-budget batching; the same budget as vlmtrain's packing)."""
    groups, cur, tok, til = [], [], 0, 0
    for s in samples:
        n, t = len(s), s.pixel_values.shape[0] if s.pixel_values is not None else 0
        if cur and (tok + n > max_tokens or til + t > max_tiles):
            groups.append(cur)
            cur, tok, til = [], 0, 0
        cur.append(s)
        tok, til = tok + n, til + t
    return groups + ([cur] if cur else [])


def flattened_batch(samples: list[EncodedSample], flash: bool) -> HFBatch:
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=flash,
                                          return_tensors="pt")
    feats = [{"input_ids": s.input_ids.tolist(), "labels": s.labels.tolist()} for s in samples]
    b = collator(feats)
    labels = b.pop("labels")
    # position t predicts token t + 1 (the collator's separator keeps a sample from predicting the next's first)
    positions = (labels[0, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
    b["pixel_values"] = torch.cat([s.pixel_values for s in samples if s.pixel_values is not None])
    return HFBatch(dict(b), positions, labels[0, 1:][positions])


def padded_batch(samples: list[EncodedSample], pad_id: int) -> HFBatch:
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for r, s in enumerate(samples):
        ids[r, :len(s)], labels[r, :len(s)], mask[r, :len(s)] = s.input_ids, s.labels, 1
    pix = torch.cat([s.pixel_values for s in samples if s.pixel_values is not None])
    return HFBatch({"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pix})


def chunked_ce_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum of cross-entropy over rows of ``hidden``, ``chunk`` rows of logits at a time, each chunk's
    logits recomputed in backward instead of stored."""
    from torch.utils.checkpoint import checkpoint

    def part(h, y):
        return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(part, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
    return total


def hf_model(cfg, tokenizer, attn: str, device):
    model = build_from_config(cfg.model, tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), cfg.seed)
    model.set_attn_implementation(attn)
    model.config.use_cache = False
    return model.to(device).train()


def compile_hf_blocks(model) -> None:
    """Regional compilation, as transformers' docs recommend for training: every ViT and decoder
    layer, dynamic shapes."""
    for layer in [*model.model.vision_tower.encoder.layer, *model.model.language_model.layers]:
        layer.compile(dynamic=True)


def run_hf_strong(cfg, args, device, pool, tokenizer, attn: str | None = None) -> dict:
    attn = attn or best_hf_attention(device, args.hf_attn)
    model = hf_model(cfg, tokenizer, attn, device)
    compiled = args.hf_compile == "yes" or (args.hf_compile == "auto" and bool(cfg.model.compile))
    if compiled:
        compile_hf_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.optim.lr), betas=tuple(cfg.optim.optimizer.betas),
                            eps=float(cfg.optim.optimizer.eps), weight_decay=float(cfg.optim.optimizer.weight_decay),
                            fused=True)
    collate = OmegaConf.to_container(cfg.data.collate) or {}
    max_tokens, max_tiles = int(collate.get("max_tokens", 16384)), int(collate.get("max_tiles", 48))
    flash = attn.startswith("flash")
    batches = [[pinned(flattened_batch(g, flash), device) for g in flatten_groups(samples, max_tokens, max_tiles)]
               for samples in pool]
    dtype = autocast_dtype(cfg)
    grad_clip = float(cfg.optim.grad_clip or 0)

    def step(mbs: list[HFBatch]) -> int:
        n_items = sum(int(mb.targets.numel()) for mb in mbs)  # the step's supervised tokens (host count)
        for mb in mbs:
            mb = mb.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                # tiles travel as uint8; the model takes normalised floats
                inputs = dict(mb.inputs, pixel_values=normalize_pixels(mb.inputs["pixel_values"]))
                hidden = model.model(**inputs, use_cache=False).last_hidden_state[0]
                loss = chunked_ce_sum(hidden[mb.positions], model.lm_head, mb.targets, args.ce_chunk)
            (loss / max(1, n_items)).backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return len(mbs)

    stats = time_loop(step, batches, args.warmup, device)
    stats["attention_backend"] = attn
    stats["compiled"] = compiled
    return stats


def run_hf_naive(cfg, args, device, pool, tokenizer) -> dict:
    model = hf_model(cfg, tokenizer, "sdpa", device)
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.optim.lr))
    m = args.baseline_batch
    batches = [[pinned(padded_batch(samples[i:i + m], tokenizer.pad_token_id), device)
                for i in range(0, len(samples), m)] for samples in pool]
    dtype = autocast_dtype(cfg)

    def step(mbs: list[HFBatch]) -> int:
        for mb in mbs:
            mb = mb.to(device)
            inputs = dict(mb.inputs, pixel_values=normalize_pixels(mb.inputs["pixel_values"]))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(**inputs, use_cache=False)
            (out.loss / len(mbs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return len(mbs)

    stats = time_loop(step, batches, args.warmup, device)
    stats["attention_backend"] = "sdpa"
    return stats


# -- the samples every row trains on -----------------------------------------------------------------------


def load_pool(cfg, args) -> tuple[object, list[list[EncodedSample]]]:
    """The tokenizer and each step's encoded samples, read from disk through the configured data
    module and its sampler's order (loader workers, collation left to each row)."""
    from torch.utils.data import DataLoader

    from vlmtrain.models.build import load_tokenizer
    from vlmtrain.training.datamodule import VLMDataModule

    tokenizer = load_tokenizer(cfg.model)
    v = cfg.model.vision
    data = VLMDataModule(cfg.data, tokenizer, tokens_per_tile(v.image_size, v.patch_size, cfg.model.downsample_ratio),
                         cfg.stage.global_batch_size, cfg.seed)
    data.setup()
    loader = DataLoader(data.dataset, batch_sampler=data.sampler, collate_fn=list,
                        num_workers=cfg.data.num_workers)
    pool = []
    for items in loader:
        bad = [x for x in items if not isinstance(x, EncodedSample)]
        if bad:
            raise RuntimeError(f"the bench's own samples were skipped: {bad[:3]}")
        pool.append(items)
    return tokenizer, pool[:args.warmup + args.steps]


def pool_stats(pool: list[list[EncodedSample]], cfg, tokenizer, warmup: int) -> dict:
    timed = [s for step in pool[warmup:] for s in step]
    dims = InternVLDims.from_hf_config(internvl_config(cfg.model, tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")))
    tiles = sum(s.pixel_values.shape[0] for s in timed if s.pixel_values is not None)
    tokens = sum(len(s) for s in timed)
    flops = training_flops(dims, tiles=tiles, tokens=tokens, sum_sq_len=sum(len(s) ** 2 for s in timed),
                           supervised=sum(s.num_supervised for s in timed))
    every = [s for step in pool for s in step]
    return {"samples_timed": len(timed), "tokens_timed": tokens, "tiles_timed": tiles, "model_flops_timed": flops,
            "tiles_per_sample": [min(s.pixel_values.shape[0] for s in every), max(s.pixel_values.shape[0] for s in every)],
            "tokens_per_sample": [min(len(s) for s in every), max(len(s) for s in every)]}


# -- report -----------------------------------------------------------------------------------------------

LABELS = {
    "trainer": "vlmtrain trainer (Lightning fit, loader workers reading JPEGs)",
    "loop": "vlmtrain bench loop (same module step, pre-collated)",
    "hf_strong": "transformers strong (flattened, best attention, chunked CE, fused AdamW, compiled)",
    "hf_naive": "transformers naive (padded, sdpa, full logits, AdamW, eager)",
    "hf_strong_flex": "transformers strong with flex_attention",
}


def finish_row(stats: dict, pool: dict, peak_flops: float | None) -> dict:
    s = stats["seconds"]
    stats["tokens_per_s"] = pool["tokens_timed"] / s
    stats["samples_per_s"] = pool["samples_timed"] / s
    stats["step_seconds"] = s / pool["steps_timed"]
    stats["tflops"] = pool["model_flops_timed"] / s / 1e12
    stats["mfu"] = pool["model_flops_timed"] / s / peak_flops if peak_flops else None
    return stats


def markdown(results: dict) -> str:
    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    out = [f"### {results['model']} on {results['device']} ({results['date']})", "",
           f"{results['pool']['steps_timed']} timed steps of {results['samples_per_step']} samples "
           f"({results['pool']['tokens_timed']} tokens) after {results['warmup']} warm-up steps; "
           f"torch {results['torch']}, transformers {results['transformers']}."]
    if results["rows"]:
        out += ["", "| row | tokens/s | step (s) | TFLOP/s | MFU | peak mem (GiB) | device idle between steps | vs best strong | "
                "graphs while timed |",
                "|---|---|---|---|---|---|---|---|---|"]
    # against the faster of the strong rows: the best transformers offers on the host
    strong = max((results["rows"].get(k, {}).get("tokens_per_s") or 0 for k in ("hf_strong", "hf_strong_flex")),
                 default=0) or None
    for name in ROWS + EXTRA_ROWS:
        r = results["rows"].get(name)
        if r is None:
            continue
        if "error" in r or "skipped" in r:
            out.append(f"| {LABELS[name]} | {r.get('error') or r.get('skipped')} | | | | | | | |")
            continue
        wait = f"{100 * r['host_wait_share']:.1f}%" if "host_wait_share" in r else ""
        ratio = f"{r['tokens_per_s'] / strong:.2f}x" if strong else ""
        out.append(f"| {LABELS[name]} | {r['tokens_per_s']:.0f} | {r['step_seconds']:.3f} | {r['tflops']:.2f} | "
                   f"{f(r['mfu'] and 100 * r['mfu'], '.1f')}% | {f(r['peak_mem_gib'], '.1f')} | {wait} | {ratio} | "
                   f"{r['graphs_compiled_while_timed']} |")
    if results.get("ablation"):
        out += ["", "Ablation (bench loop row, same samples):", "",
                "| levers | overrides | tokens/s | MFU | peak mem (GiB) | vs none |", "|---|---|---|---|---|---|"]
        base = results["ablation"].get("none", {}).get("tokens_per_s")
        for name, r in results["ablation"].items():
            over = " ".join(ABLATION[name]) or "(config as is)"
            if "tokens_per_s" not in r:
                out.append(f"| {name} | {over} | {r.get('error') or r.get('skipped')} | | | |")
                continue
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
            out.append(f"| {name} | `{over}` | {r['tokens_per_s']:.0f} | {f(r['mfu'] and 100 * r['mfu'], '.1f')}% | "
                       f"{f(r['peak_mem_gib'], '.1f')} | {ratio} |")
    if "trainer_over_loop" in results:
        out += ["", f"trainer / bench loop: {100 * results['trainer_over_loop']:.1f}%"]
    return "\n".join(out) + "\n"


def write(results: dict, args) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(results))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {','.join(ROWS)}")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per row")
    ap.add_argument("--warmup", type=int, default=8,
                    help="untimed steps first (compilation: one graph per range of packed length; the allocator)")
    ap.add_argument("--samples-per-step", type=int, default=16)
    ap.add_argument("--baseline-batch", type=int, default=4, help="samples per padded micro-batch (hf_naive)")
    ap.add_argument("--hf-attn", default="auto", help="hf_strong's attn_implementation (auto: the best installed)")
    ap.add_argument("--hf-compile", choices=("auto", "yes", "no"), default="auto",
                    help="hf_strong: regional torch.compile (auto: when the config compiles vlmtrain's blocks)")
    ap.add_argument("--ce-chunk", type=int, default=4096, help="hf_strong: supervised positions per CE chunk")
    ap.add_argument("--peak-tflops", type=float, help="dense peak per device (default: from the GPU's name)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (the tiny model, a smoke test)")
    ap.add_argument("--max-grid", type=int, help="tiles per image grid up to this (default 12; 2 on CPU)")
    ap.add_argument("--text", type=int, nargs=2, help="words per sample (default 50 1500; 20 120 on CPU)")
    ap.add_argument("--log-every", type=int, default=50, help="trainer.log_every_n_steps for the trainer row")
    ap.add_argument("--data-dir", help="where to write the synthetic mixture (default: a temporary folder)")
    ap.add_argument("--ablation", action="store_true",
                    help=f"instead of --rows: the bench loop once per lever set ({', '.join(ABLATION)})")
    ap.add_argument("--deadline", type=float, help="unix time: rows that would start after it minus 45 s are skipped")
    ap.add_argument("--out", help="write the results as JSON here (after every row)")
    ap.add_argument("--md", help="write the markdown table here (after every row)")
    return ap.parse_known_args(argv)


def main(argv=None) -> dict:
    import transformers

    args, overrides = parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS) - set(EXTRA_ROWS)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; rows are {list(ROWS + EXTRA_ROWS)}")
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if cpu:
        overrides = ["hardware=cpu", "data/collate=packed", "data.collate.max_tokens=2048", "data.collate.max_tiles=8",
                     *overrides]
    args.max_grid = args.max_grid or (2 if cpu else 12)
    text = tuple(args.text or ((20, 120) if cpu else (50, 1500)))
    work = Path(args.data_dir or tempfile.mkdtemp(prefix="vlmtrain-bench-"))
    first = compose_cfg(overrides + ["data=single", "data.path=/dev/null"])
    n = args.samples_per_step * (args.warmup + args.steps)
    t0 = time.perf_counter()
    data_path = write_mixture(work / "data", n, int(first.model.vision.image_size), args.max_grid, text, seed=first.seed)
    print(f"wrote {n} samples to {data_path} in {time.perf_counter() - t0:.1f}s", flush=True)
    cfg = compose_cfg([*overrides, *bench_overrides(args, data_path, work / "run")])
    tokenizer, pool = load_pool(cfg, args)
    stats = pool_stats(pool, cfg, tokenizer, args.warmup)
    stats["steps_timed"] = len(pool) - args.warmup
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (
        peak_flops_per_device(torch.cuda.get_device_name()) if device.type == "cuda" else None)
    results = {"model": cfg.model.name, "device": torch.cuda.get_device_name() if not cpu else "cpu",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
               "transformers": transformers.__version__, "samples_per_step": args.samples_per_step,
               "warmup": args.warmup, "overrides": overrides, "compile": list(cfg.model.compile),
               "optimizer": OmegaConf.to_container(cfg.optim.optimizer), "peak_flops": peak, "pool": stats, "rows": {}}
    runs = {"trainer": lambda: run_trainer(cfg, args, device),
            "loop": lambda: run_loop(cfg, args, device, pool),
            "hf_strong": lambda: run_hf_strong(cfg, args, device, pool, tokenizer),
            "hf_naive": lambda: run_hf_naive(cfg, args, device, pool, tokenizer),
            "hf_strong_flex": lambda: run_hf_strong(cfg, args, device, pool, tokenizer, "flex_attention")}
    if args.ablation:
        base = [*overrides, *bench_overrides(args, data_path, work / "run")]
        jobs = [(f"ablation/{k}", lambda v=v: run_loop(compose_cfg([*base, *v]), args, device, pool)) for k, v in ABLATION.items()]
    else:
        jobs = [(name, runs[name]) for name in rows]
    for name, fn in jobs:
        where, key = (results.setdefault("ablation", {}), name.split("/", 1)[1]) if "/" in name else (results["rows"], name)
        if args.deadline and time.time() > args.deadline - 45:
            where[key] = {"skipped": "out of time"}
            print(f"{cfg.model.name} {name}: skipped, out of time", flush=True)
            continue
        t = time.perf_counter()
        try:
            row = finish_row(fn(), stats, peak)
        except torch.OutOfMemoryError as e:
            row = {"error": f"out of memory: {str(e).splitlines()[0][:120]}"}
        except Exception as e:  # one row's failure must not cost the others of the call
            import traceback

            traceback.print_exc()
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        row["row_wall_seconds"] = time.perf_counter() - t
        free_memory(device)
        where[key] = row
        if "error" in row:
            print(f"{cfg.model.name} {name}: {row['error']}", flush=True)
        else:
            wait = f", host wait {100 * row['host_wait_share']:.1f}%" if "host_wait_share" in row else ""
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] else ""
            mem = f", peak {row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] is not None else ""
            print(f"{cfg.model.name} {name}: {row['tokens_per_s']:.0f} tok/s, {row['step_seconds']:.3f} s/step"
                  f"{mfu}{mem}{wait} ({row['row_wall_seconds']:.0f}s wall)", flush=True)
        rs = results["rows"]
        if "tokens_per_s" in rs.get("trainer", {}) and "tokens_per_s" in rs.get("loop", {}):
            results["trainer_over_loop"] = rs["trainer"]["tokens_per_s"] / rs["loop"]["tokens_per_s"]
        write(results, args)
    print(markdown(results), flush=True)
    return results


if __name__ == "__main__":
    main()
