"""Training throughput of vlmtrain vs the plain-transformers baseline, on one GPU, random weights.

    python experiments/bench/throughput.py experiment=bench_internvl2_5_1b --steps 8
    python experiments/bench/throughput.py experiment=bench_internvl2_5_2b --out results.json
    python experiments/bench/throughput.py model.gradient_checkpointing=[vision_tower] ...  # any vlmtrain override
    python experiments/bench/throughput.py experiment=bench_internvl2_5_1b model.compile=[vision_tower] --profile
    python experiments/bench/throughput.py --device cpu --samples-per-step 4 --steps 2   # tiny model, smoke test

Both runs train on the same samples: a realistic mixture of 1..13 tiles and 50..1500 text tokens per
sample (a third prompt, the rest supervised answer), bf16 autocast over fp32 weights, AdamW. Each
step's samples are collated (packed or padded) and pinned before the clock starts, as the trainer's
loader workers do ahead of the GPU; the timed loop copies them to the GPU and trains.

- vlmtrain: the step's samples packed (data.collate: 16384 tokens / 48 tiles per buffer), packed
  varlen attention (model.attention), the loss on supervised positions only (chunked, no full
  logits), whole-step normalisation, fused AdamW: the stage's objective (``vlmtrain.training.objective``) exactly as training.
- baseline: what a user writes by hand: transformers' ``InternVLForConditionalGeneration`` with SDPA,
  padded micro-batches of ``--baseline-batch`` samples, ``model(..., labels=...)`` (full logits),
  loss / micro-batches, ``torch.optim.AdamW`` defaults.

tokens/s counts every token entering the LLM (image + text, no padding). Model FLOPs are the
useful work, the same formula for both runs (see ``sample_flops``): ViT, projector and LLM matmuls
plus attention (causal halves the LLM's), the LM head only at supervised positions, x3 for training
(all parts train in instruction_tuning). MFU = TFLOP/s / ``--peak-tflops`` (H100/H200 bf16 dense: 989).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from vlmtrain.cli import CONFIG_DIR, register  # noqa: E402
from vlmtrain.data.collate import Step, pad_batch  # noqa: E402
from vlmtrain.data.encode import EncodedSample  # noqa: E402
from vlmtrain.data.images import normalize_pixels  # noqa: E402
from vlmtrain.models.build import build_model, load_tokenizer  # noqa: E402
from vlmtrain.models.internvl import build_from_config, tokens_per_tile  # noqa: E402
from vlmtrain.training.loss import IGNORE_INDEX  # noqa: E402
from vlmtrain.training.module import VLMTrainingModule  # noqa: E402
from vlmtrain.training.objective import build_objective  # noqa: E402


def make_samples(n, rng, tile, tpt, img_start, img_end, img_ctx, vocab, max_tiles=13, text=(50, 1500)):
    """n random samples: tiles ~ U{1..max_tiles}, text tokens ~ U{text}; the prompt is a third."""
    specials = {img_start, img_end, img_ctx}
    text_ids = [i for i in range(vocab) if i not in specials]
    out = []
    for _ in range(n):
        tiles = rng.randint(1, max_tiles)
        t = rng.randint(*text)
        prompt, answer = t // 3, t - t // 3
        before = prompt // 2
        ids = ([rng.choice(text_ids) for _ in range(before)] + [img_start] + [img_ctx] * (tpt * tiles) + [img_end]
               + [rng.choice(text_ids) for _ in range(prompt - before)])
        n_prompt = len(ids)
        ids += [rng.choice(text_ids) for _ in range(answer)]
        ids = torch.tensor(ids)
        labels = ids.clone()
        labels[:n_prompt] = IGNORE_INDEX
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        pix = torch.randint(0, 256, (tiles, 3, tile, tile), dtype=torch.uint8, generator=g)  # as the loader ships tiles
        out.append(EncodedSample(ids, labels, pix, [tiles], "bench"))
    return out


def sample_flops(s: EncodedSample, cfg) -> float:
    """Training FLOPs of one sample (fwd + bwd = 3 x fwd), the useful work only."""
    v, t = cfg.model.vision, cfg.model.llm.config
    tiles = s.pixel_values.shape[0]
    # ViT: patch embedding, per layer qkv + proj (4 d^2) and MLP (2 d m), attention 4 T^2 d (not causal)
    patches = (v.image_size // v.patch_size) ** 2
    T, d, m = patches + 1, v.hidden_size, v.intermediate_size
    vit = 2 * patches * (3 * v.patch_size**2 * d) + v.num_hidden_layers * (2 * T * (4 * d * d + 2 * d * m) + 4 * T * T * d)
    # projector: LayerNorm -> Linear(4d, D) -> GELU -> Linear(D, D) on every output token
    D = t["hidden_size"]
    tpt = tokens_per_tile(v.image_size, v.patch_size, cfg.model.downsample_ratio)
    proj = 2 * tpt * (4 * d * D + D * D)
    # LLM: q, k, v, o projections, gated MLP (3 D I) per token; causal attention 2 s^2 (h*hd) per layer
    heads, kv = t["num_attention_heads"], t.get("num_key_value_heads", t["num_attention_heads"])
    hd = t.get("head_dim") or D // heads
    s_len, L, inter = len(s), t["num_hidden_layers"], t["intermediate_size"]
    per_token = 2 * L * (D * heads * hd * 2 + 2 * D * kv * hd + 3 * D * inter)
    attn = L * 2 * s_len * s_len * heads * hd
    head = 2 * D * t["vocab_size"] * s.num_supervised
    return 3.0 * (tiles * (vit + proj) + s_len * per_token + attn + head)


def pinned(batch, device):
    """A collated micro-batch in pinned host memory, as the trainer's loader (pin_memory) hands it over."""
    return batch.pin_memory() if device.type == "cuda" else batch


def run_vlmtrain(cfg, tokenizer, steps, device, warmup, profile=False):
    model = build_model(cfg.model, tokenizer, cfg.seed).to(device).train()
    module = VLMTrainingModule(model, build_objective(cfg.stage, cfg.loss), cfg.optim, cfg.stage)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    collate = instantiate(cfg.data.collate, pad_id=tokenizer.pad_token_id, tile_size=cfg.data.tile_size)
    rows = []

    def prepare(samples):  # loader-worker side: pack and pin
        packed = collate(samples)
        assert not packed.skipped, packed.skipped
        return [pinned(mb, device) for mb in packed.micro_batches]

    def step(mbs):
        # from the host copy of the counts, as training does
        w_total = module.objective.step_weight(Step(micro_batches=list(mbs))).to(device, non_blocking=True)
        mbs = [mb.to(device) for mb in mbs]
        for mb in mbs:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                num = module.objective(model, mb).total
            (num / w_total).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append(max(mb.input_ids.shape[1] for mb in mbs))
        return len(mbs)

    stats = timed(step, prepare, steps, device, warmup, profile)
    stats["max_tokens_per_micro_batch"] = max(rows)
    stats["attention_backend"] = model.config.text_config._attn_implementation
    del model, module, opt
    return stats


def run_baseline(cfg, tokenizer, steps, device, warmup, batch):
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    model = build_from_config(cfg.model, image_token_id, cfg.seed)
    model.set_attn_implementation("sdpa")
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = []

    def prepare(samples):  # loader-worker side: pad and pin
        chunks = [samples[i:i + batch] for i in range(0, len(samples), batch)]
        return [pinned(pad_batch(chunk, tokenizer.pad_token_id, cfg.data.tile_size), device) for chunk in chunks]

    def step(chunks):
        for mb in chunks:
            mb = mb.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(input_ids=mb.input_ids, pixel_values=normalize_pixels(mb.pixel_values),
                            attention_mask=mb.attention_mask, labels=mb.labels)
            (out.loss / len(chunks)).backward()
            rows.append(mb.input_ids.numel())
        opt.step()
        opt.zero_grad(set_to_none=True)
        return len(chunks)

    stats = timed(step, prepare, steps, device, warmup)
    stats["max_tokens_per_micro_batch"] = max(rows)
    del model, opt
    return stats


STEP_SAMPLES: list = []


def timed(step, prepare, steps, device, warmup, profile=False):
    """Warm-up steps (compilation, allocator), then ``steps`` timed steps. The steps' batches are
    prepared (collated, pinned) before the clock starts: in training, loader workers do that
    ahead of the GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = [prepare(samples) for samples in STEP_SAMPLES]
    graphs = graphs_compiled()
    for i in range(warmup):
        step(batches[i % len(batches)])
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm_graphs = graphs_compiled()
    t0 = time.perf_counter()
    micro = 0
    for i in range(steps):
        micro += step(batches[(warmup + i) % len(batches)])
    sync()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    stats = {"seconds": dt, "micro_batches": micro, "peak_mem_gib": peak,
             "graphs_compiled_in_warmup": warm_graphs - graphs,
             "graphs_compiled_while_timed": graphs_compiled() - warm_graphs}
    if stats["graphs_compiled_while_timed"]:
        print(f"warning: {stats['graphs_compiled_while_timed']} graphs compiled inside the timed steps: "
              "the figure includes their compilation; give more --warmup steps", flush=True)
    if profile:
        stats["profile"] = profile_step(step, batches[warmup % len(batches)], device)
    return stats


def graphs_compiled() -> int:
    """dynamo's running count of graphs compiled (a frame that hits the recompile limit runs
    uncompiled from then on; dynamo logs a warning for it)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


KERNEL_KINDS = [  # (kind, substrings of the kernel name), first match wins
    ("attention", ("flash", "fmha", "attention", "varlen")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "splitk")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("loss", ("cross_entropy", "log_softmax", "softmax", "nll")),
    ("norm", ("layer_norm", "layernorm", "rms", "norm")),
    ("copy", ("copy", "memcpy", "memset", "cat", "index", "scatter", "gather")),
    ("compiled (triton)", ("triton",)),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "reduce", "fill")),
]


def profile_step(step, batch, device) -> dict:
    """GPU time per kernel kind for one step (torch.profiler), and its share of the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step(batch)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kinds: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us <= 0:
            continue
        name = e.key.lower()
        kind = next((k for k, subs in KERNEL_KINDS if any(s in name for s in subs)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3
        kernels.append((us / 1e3, e.count, kind, e.key[:110]))
    busy = sum(kinds.values())
    print(f"profile: one step {wall * 1e3:.0f} ms wall, GPU kernels {busy:.0f} ms", flush=True)
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:18s} {ms:8.1f} ms  {100 * ms / busy:5.1f}%", flush=True)
    kernels.sort(reverse=True)
    for ms, n, kind, name in kernels[:20]:
        print(f"  {ms:8.1f} ms x{n:<5d} {kind:12s} {name}", flush=True)
    return {"wall_ms": wall * 1e3, "kernel_ms": busy, "by_kind_ms": kinds,
            "top_kernels": [{"ms": ms, "count": n, "kind": k, "name": nm} for ms, n, k, nm in kernels[:40]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=10,
                    help="untimed steps first: compilation (one graph per range of packed length) and the allocator")
    ap.add_argument("--samples-per-step", type=int, default=16)
    ap.add_argument("--baseline-batch", type=int, default=4)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--max-tiles", type=int, help="tiles per sample up to this (default 13; 3 on CPU)")
    ap.add_argument("--text", type=int, nargs=2,
                    help="text tokens per sample in this range (default 50 1500; 20 200 on CPU)")
    ap.add_argument("--profile", action="store_true", help="after timing, profile one vlmtrain step (GPU time by kernel kind)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args, overrides = ap.parse_known_args()

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data/collate=packed", *overrides])
    device = torch.device(args.device)
    tokenizer = load_tokenizer(cfg.model)
    v = cfg.model.vision
    tpt = tokens_per_tile(v.image_size, v.patch_size, cfg.model.downsample_ratio)
    ids = tokenizer.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"])
    small = args.device == "cpu"
    rng = random.Random(0)
    n_steps = args.steps + args.warmup
    pool = make_samples(args.samples_per_step * n_steps, rng, v.image_size, tpt, *ids, vocab=len(tokenizer) - 16,
                        max_tiles=args.max_tiles or (3 if small else 13),
                        text=tuple(args.text or ((20, 200) if small else (50, 1500))))
    STEP_SAMPLES[:] = [pool[i * args.samples_per_step:(i + 1) * args.samples_per_step] for i in range(n_steps)]
    timed_samples = [s for st in STEP_SAMPLES[args.warmup:] for s in st]
    tokens = sum(len(s) for s in timed_samples)
    flops = sum(sample_flops(s, cfg) for s in timed_samples)

    results = {"model": cfg.model.name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "samples_per_step": args.samples_per_step, "steps": args.steps,
               "tokens_timed": tokens, "overrides": overrides, "compile": list(cfg.model.compile)}
    runs = [("vlmtrain", lambda: run_vlmtrain(cfg, tokenizer, args.steps, device, args.warmup, args.profile))]
    if not args.skip_baseline:
        runs.append(("baseline", lambda: run_baseline(cfg, tokenizer, args.steps, device, args.warmup,
                                                      args.baseline_batch)))
    for name, fn in runs:
        stats = fn()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        stats["tokens_per_s"] = tokens / stats["seconds"]
        stats["samples_per_s"] = len(timed_samples) / stats["seconds"]
        stats["tflops"] = flops / stats["seconds"] / 1e12
        stats["mfu"] = stats["tflops"] / args.peak_tflops
        results[name] = stats
        print(f"{cfg.model.name} {name}: {stats['tokens_per_s']:.0f} tok/s, {stats['samples_per_s']:.2f} samples/s, "
              f"{stats['tflops']:.1f} TFLOP/s, MFU {100 * stats['mfu']:.1f}%, peak {stats['peak_mem_gib']:.1f} GiB, "
              f"{stats['max_tokens_per_micro_batch']} tokens/micro-batch max", flush=True)
        if args.out:  # after each run, so a later failure keeps what was measured
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if "baseline" in results:
        results["speedup"] = results["vlmtrain"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
        print(f"{cfg.model.name} speedup: {results['speedup']:.2f}x", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
