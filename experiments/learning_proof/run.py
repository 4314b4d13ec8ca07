"""Learning proof: train a small InternVL-architecture model from scratch on the generated
coloured-shapes task through all three stages, then measure exact match on a held-out split.

    python experiments/learning_proof/run.py --out runs/learning_proof            # one GPU, < 10 min
    python experiments/learning_proof/run.py --train 400 --heldout 40 --epochs 1 1 1 hardware=cpu  # CPU smoke

Data: ``vlmtrain.data.synthetic.make_shapes_dataset`` (train split, and a held-out split whose
images are never seen in training). Model and data settings: conf/experiment/learning_proof.yaml;
the per-stage learning rates and epochs below (larger than the recipe's, which fine-tunes
pretrained weights: here everything starts from random init).

Evaluation: greedy decoding of the first answer of every held-out line (max 8 tokens, stops at
``<|im_end|>``), exact match of the generated token ids with the reference answer + ``<|im_end|>``.
Reported per question type: image questions (single- and two-image) and text-only arithmetic/facts.
(``python -m vlmtrain.eval`` was not on this branch when this ran: the loop below does the same job.)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from vlmtrain.conf import CONFIG_DIR, register  # noqa: E402
from vlmtrain.data.mixture import MixtureDataset  # noqa: E402
from vlmtrain.data.synthetic import make_shapes_dataset  # noqa: E402
from vlmtrain.models.build import build_model, load_tokenizer  # noqa: E402
from vlmtrain.models.internvl import multimodal_embeddings, tokens_per_tile  # noqa: E402
from vlmtrain.train import init_weights_from, train  # noqa: E402
from vlmtrain.training.loss import IGNORE_INDEX  # noqa: E402

STAGES = {
    # from random init, stages 1 and 1.5 (frozen random LLM) teach little: short, to chain the recipe
    "mlp_warmup": ["stage.lr=1e-3", "stage.max_steps=60"],
    "vit_incremental": ["stage.lr=5e-4", "stage.max_steps=60"],
    "instruction_tuning": ["stage.lr=5e-4"],
}


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["experiment=learning_proof", *overrides])


@torch.no_grad()
def evaluate(cfg, run_dir: Path, data_dir: Path, device, max_new: int = 8):
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, cfg.seed)
    init_weights_from(model, str(run_dir))
    model = model.to(device).eval()
    with open_dict(cfg):
        cfg.data.datasets.shapes.path = str(data_dir / "annotations_val.jsonl")
        cfg.data.datasets.shapes.jpeg_augment = False
    v = cfg.model.vision
    data = MixtureDataset(cfg.data, tok, tokens_per_tile(v.image_size, v.patch_size, cfg.model.downsample_ratio))
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    hits, totals, examples = defaultdict(int), defaultdict(int), []
    for i in range(len(data)):
        s = data[i]
        sup = (s.labels != IGNORE_INDEX).nonzero().flatten()
        start = int(sup[0])
        stop = start
        while stop < len(s.labels) and s.labels[stop] != IGNORE_INDEX:
            stop += 1
        gold = s.input_ids[start:stop].tolist()
        ids = s.input_ids[:start].unsqueeze(0).to(device)
        pix = s.pixel_values.to(device) if s.pixel_values is not None else None
        out = []
        for _ in range(max_new):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                emb = multimodal_embeddings(model, ids, pix)
                h = model.model.language_model(inputs_embeds=emb).last_hidden_state[:, -1]
                nxt = int(model.lm_head(h).argmax(-1))
            out.append(nxt)
            if nxt == end_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], 1)
        kind = "text_only" if s.pixel_values is None else ("two_images" if len(s.num_tiles) > 1 else "one_image")
        totals[kind] += 1
        hits[kind] += out == gold
        if len(examples) < 12:
            examples.append({"question": tok.decode(s.input_ids[:start]).split("</img>")[-1].split("user\n")[-1].strip(),
                             "answer": tok.decode(gold), "predicted": tok.decode(out)})
    image = sum(totals[k] for k in ("one_image", "two_images"))
    acc = {k: hits[k] / totals[k] for k in totals}
    acc["image_questions"] = (hits["one_image"] + hits["two_images"]) / max(1, image)
    acc["all"] = sum(hits.values()) / sum(totals.values())
    return {"accuracy": acc, "counts": dict(totals), "examples": examples}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/learning_proof")
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--heldout", type=int, default=500)
    ap.add_argument("--epochs", type=int, nargs=3, default=[1, 1, 7], help="epochs of stages 1, 1.5, 2 (1 and 1.5 stop at 60 steps)")
    args, overrides = ap.parse_known_args()
    out = Path(args.out).resolve()
    data_dir = out / "data"
    t0 = time.time()
    if not (data_dir / "annotations_val.jsonl").is_file():
        make_shapes_dataset(data_dir, args.train, seed=1, split="train", side_range=(160, 448))
        make_shapes_dataset(data_dir, args.heldout, seed=1, split="val", side_range=(160, 448))
    os.environ["LEARNING_PROOF_DATA"] = str(data_dir)
    print(f"data: {args.train} train / {args.heldout} held-out lines in {time.time() - t0:.0f}s", flush=True)
    register()
    prev, curves, times = None, {}, {}
    for (stage, extra), epochs in zip(STAGES.items(), args.epochs):
        t = time.time()
        run_dir = out / stage
        init = [f"init_from={prev}"] if prev else []
        cfg = compose_cfg([f"stage={stage}", f"stage.max_epochs={epochs}", *extra, *init, *overrides])
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
        train(cfg)
        times[stage] = time.time() - t
        metrics = run_dir / "metrics.csv"
        rows = list(csv.DictReader(open(metrics))) if metrics.is_file() else []
        curves[stage] = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
        print(f"{stage}: {times[stage]:.0f}s, loss curve {curves[stage][:1]} .. {curves[stage][-1:]}", flush=True)
        prev = run_dir
    t = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate(cfg, prev, data_dir, device)
    result.update(train_seconds=times, eval_seconds=time.time() - t, total_seconds=time.time() - t0,
                  curves=curves, epochs=args.epochs, stages=STAGES, overrides=overrides,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    (out / "learning_proof.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("accuracy", "counts", "train_seconds", "total_seconds")}), flush=True)
    for e in result["examples"]:
        print(e, flush=True)


if __name__ == "__main__":
    main()
