"""The export served as the ecosystem loads it (issue 21 item 7): transformers' ``AutoProcessor`` +
``AutoModelForImageTextToText`` on a ``vlmtrain export`` of a small random InternVL, against
vlmtrain's own chat path on the same image + prompt.

    python experiments/bench/processor_check.py --out processor_check.json   # needs torchvision

1. A run directory with the tiny InternVL (random weights, perturbed so that greedy answers are
   not all one token), exported with ``python -m vlmtrain export`` (the CLI, in a subprocess).
2. vlmtrain: ``vlmtrain.inference.engine.InferenceEngine`` (what ``vlmtrain chat`` runs) encodes the
   prompt with vlmtrain's renderer and tiling, and decodes greedily; ``python -m vlmtrain chat`` is
   also run once on the same query, for its printed answer.
3. transformers: the exported processor renders the chat template and tiles the image; the model
   loads through ``AutoModelForImageTextToText`` and decodes greedily.

It compares the input ids, the pixel values and the generated token ids, and prints one JSON
object whose ``result`` is PASS or FAIL (exit code 0 / 1). fp32 on the GPU, TF32 off, so a
mismatch is not rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

QUERY = "Describe the picture in detail."


def make_run(run_dir: Path, seed: int = 0, noise: float = 0.05) -> None:
    """The tiny model as a run directory (config.yaml, checkpoints/last.ckpt, tokenizer/)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vlmtrain.cli import CONFIG_DIR, register
    from vlmtrain.models.build import apply_stage, build_model, load_tokenizer

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny", "hardware=cpu", f"run_dir={run_dir}"])
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, seed)
    apply_stage(model, cfg.stage)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}},
               run_dir / "checkpoints" / "last.ckpt")
    tok.save_pretrained(run_dir / "tokenizer")


def make_image(path: Path, size=(700, 460), seed: int = 0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (12, 18, 3), dtype=torch.uint8, generator=g).numpy()
    img = Image.fromarray(small).resize(size, Image.BICUBIC)
    img.save(path, quality=95)
    return Image.open(path).convert("RGB")


def first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-tiles", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    work = Path(args.work or tempfile.mkdtemp(prefix="vlmtrain-processor-check-"))
    report: dict = {"device": args.device, "torch": torch.__version__}
    try:
        import transformers

        report["transformers"] = transformers.__version__
        make_run(work / "run")
        exported = work / "hf"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        subprocess.run([sys.executable, "-m", "vlmtrain", "export", f"ckpt={work / 'run'}", f"out={exported}",
                        f"max_tiles={args.max_tiles}"], check=True, env=env, cwd=work)
        img_path = work / "image.jpg"
        img = make_image(img_path)

        # vlmtrain: the chat engine (renderer, tiling, greedy decoding)
        from vlmtrain.data.prompt import Prompt
        from vlmtrain.inference.engine import GenerationConfig, InferenceEngine
        from vlmtrain.models.checkpoint import load_trained

        engine = InferenceEngine(load_trained(exported), max_tiles=args.max_tiles, device=args.device)
        engine.model.eval()
        prompt = Prompt("<image>\n" + QUERY, [img])
        ids, px = engine.encode(prompt)
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
        with torch.no_grad():
            inputs = engine._inputs([prompt])
            out = engine.model.generate(**inputs, **engine._generate_kwargs(gen))
        v_tokens = out[0, inputs["input_ids"].shape[1]:].tolist()

        # the CLI's own answer (vlmtrain chat), decoded text
        chat = subprocess.run([sys.executable, "-m", "vlmtrain", "chat", f"ckpt={exported}", f"chat.query='{QUERY}'",
                               f"chat.images=[{img_path}]", f"chat.max_tiles={args.max_tiles}", f"device={args.device}",
                               f"generation.max_new_tokens={args.max_new_tokens}"],
                              env=env, cwd=work, capture_output=True, text=True)
        tok = engine.tokenizer
        report.update({"vlmtrain_tokens": v_tokens, "vlmtrain_text": tok.decode(v_tokens, skip_special_tokens=True).strip(),
                       "prompt_tokens_vlmtrain": len(ids), "tiles_vlmtrain": int(px.shape[0]),
                       "chat_cli_rc": chat.returncode, "chat_cli_stdout_tail": chat.stdout.strip()[-300:],
                       "chat_cli_stderr_tail": chat.stderr.strip()[-300:] if chat.returncode else ""})

        # transformers: AutoProcessor + AutoModelForImageTextToText on the export
        from transformers import AutoModelForImageTextToText, AutoProcessor

        proc = AutoProcessor.from_pretrained(str(exported), local_files_only=True)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUERY}]}]
        try:  # the processor's own template, as users call it; else the tokenizer's (the export ships it there)
            text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            report["template_from"] = "processor"
        except (ValueError, AttributeError) as e:
            text = proc.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            report["template_from"] = f"tokenizer ({type(e).__name__}: {str(e)[:100]})"
        batch = proc(images=[img], text=[text], return_tensors="pt")
        hf = AutoModelForImageTextToText.from_pretrained(str(exported), local_files_only=True).to(args.device).eval()
        hf_ids = batch["input_ids"][0].tolist()
        with torch.no_grad():
            hf_out = hf.generate(**{k: v.to(args.device) for k, v in batch.items()}, max_new_tokens=args.max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None)
        hf_tokens = hf_out[0, batch["input_ids"].shape[1]:].tolist()

        hf_pixels = batch["pixel_values"]
        pixel_diff = float((hf_pixels.float() - px.float()).abs().max()) if hf_pixels.shape == px.shape else None
        report.update({
            "input_ids_equal": hf_ids == ids, "input_ids_first_difference": first_difference(hf_ids, ids),
            "prompt_tokens": [len(ids), len(hf_ids)],
            "tiles": [int(px.shape[0]), int(hf_pixels.shape[0])], "pixel_max_abs_diff": pixel_diff,
            "tokens_equal": hf_tokens == v_tokens, "tokens_first_difference": first_difference(hf_tokens, v_tokens),
            "transformers_tokens": hf_tokens,
            "transformers_text": proc.decode(hf_tokens, skip_special_tokens=True).strip(),
        })
        ok = (report["input_ids_equal"] and report["tokens_equal"] and pixel_diff is not None and pixel_diff < 1e-3
              and chat.returncode == 0 and report["vlmtrain_text"] in chat.stdout)
        report["result"] = "PASS" if ok else "FAIL"
    except Exception as e:  # a check: every failure is reported, as FAIL with its cause
        report.update(result="FAIL", error=f"{type(e).__name__}: {e}"[:2000])
    text = json.dumps(report, indent=1)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
