"""CPU proof of the preference stage (issue 20): SFT on the demo data, pairs by `vlmtrain pairs`,
then MPO steps raise the reward accuracy on held-out pairs well above 0.5.

    nice -n 10 python experiments/preference/cpu_proof.py --out /tmp/mpo_proof

Steps, each the entry point itself in a subprocess (``python -m vlmtrain ...``):

1. SFT: the tiny model (random init) on the demo training split, ``stage=instruction_tuning``,
   one tile per image (``n_max=1``), ``--sft-steps`` steps of 8 samples (lr 1e-3).
2. ``vlmtrain pairs`` with that checkpoint on the demo training split (the training pairs) and on
   its held-out split (``data=demo_val``: images and lines training never saw, the held-out pairs):
   ``pairs.samples`` answers sampled per question against the ground truth, DropoutNTP where all
   are right.
3. MPO: ``stage=mpo init_from=<SFT run> data=single data.path=<training pairs>`` (the copy
   reference, DPO 0.8 + BCO 0.2 + SFT 1), ``--mpo-steps`` steps of 8 pairs.
4. Held-out reward accuracy: every held-out pair scored by the MPO checkpoint (policy) and the SFT
   checkpoint (reference, which is what MPO's reference is), reward beta * (log pi - log pi_ref);
   accuracy = share of pairs whose chosen reward > rejected reward (TRL's rewards/accuracies; 0 for
   the SFT model itself, whose rewards are all 0). ``--exact-match`` also evaluates both
   checkpoints' held-out exact match (``vlmtrain eval data=demo_val``), for information: this tiny
   model is far from answering the task, so that is no claim.

Writes ``--out/preference_proof.json`` (figures, commands, timings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def run(args: list[str], log: list) -> float:
    cmd = [sys.executable, "-m", "vlmtrain", *args]
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log.append({"command": " ".join(["python -m vlmtrain", *args]), "seconds": round(seconds, 1), "rc": proc.returncode})
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return seconds


def held_out_accuracy(policy_dir: Path, reference_dir: Path, pairs_file: Path, beta: float) -> dict:
    import torch
    from omegaconf import OmegaConf

    from vlmtrain.cli import register
    from vlmtrain.config import DataConfig, DatasetConfig
    from vlmtrain.inference.pairs import score_pairs
    from vlmtrain.models.checkpoint import load_trained

    register()
    settings = DatasetConfig(path=str(pairs_file), n_max=1)
    scores = {}
    for name, ckpt in (("policy", policy_dir), ("reference", reference_dir)):
        trained = load_trained(str(ckpt))
        data = DataConfig(tile_size=trained.model_cfg.vision.image_size, template=trained.model_cfg.template)
        data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.structured(data)))
        with torch.no_grad():
            rows, skipped, _ = score_pairs(trained, data, pairs_file, 16, settings)
        scores[name] = {r.line: (c, rj) for r, c, rj in rows}
    lines = sorted(scores["policy"])
    chosen = [beta * (scores["policy"][i][0] - scores["reference"][i][0]) for i in lines]
    rejected = [beta * (scores["policy"][i][1] - scores["reference"][i][1]) for i in lines]
    n = len(lines)
    return {"pairs": n, "rewards/accuracies": sum(c > r for c, r in zip(chosen, rejected)) / n,
            "rewards/chosen": sum(chosen) / n, "rewards/rejected": sum(rejected) / n,
            "rewards/margins": sum(c - r for c, r in zip(chosen, rejected)) / n}


def mpo_steps_done(run_dir: Path) -> int:
    import torch

    return int(torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"])


def exact_match(ckpt: Path, out: Path, log: list) -> float:
    run(["eval", f"ckpt={ckpt}", "data=demo_val", f"out={out}", "device=cpu", "data.datasets.shapes_val.n_max=1",
         "generation.max_new_tokens=8", "eval.batch_size=16"], log)
    return json.loads((out / "metrics.json").read_text())["overall"]["exact_match"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--mpo-steps", type=int, default=300)
    ap.add_argument("--mpo-lr", type=float, default=2e-4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="pairs per MPO step")
    ap.add_argument("--exact-match", action="store_true", help="also eval both checkpoints' held-out exact match")
    ap.add_argument("--mpo-max-time", default=None,
                    help="trainer.max_time of the MPO run (DD:HH:MM:SS): on a busy machine it stops there, saved")
    ap.add_argument("--score-only", action="store_true",
                    help="only step 4, on the runs already under --out (e.g. an MPO run stopped early)")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log: list = []
    t0 = time.perf_counter()
    common = ["data.num_workers=0", "trainer.enable_progress_bar=false", "logger=csv"]
    sft, mpo = out / "sft", out / "mpo"
    if args.score_only:
        result = {"held_out": held_out_accuracy(mpo, sft, out / "pairs_val" / "shapes_val.jsonl", beta=0.1),
                  "mpo_steps_done": mpo_steps_done(mpo)}
        (out / "preference_proof_scores.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    run(["stage=instruction_tuning", "data=demo", "data.datasets.shapes.n_max=1", f"stage.max_steps={args.sft_steps}",
         "stage.max_epochs=100", "stage.lr=1e-3", f"run_dir={sft}", f"hydra.run.dir={sft}", *common], log)
    pair_opts = [f"pairs.samples={args.samples}", "pairs.max_new_tokens=8", "pairs.reference=false", "device=cpu"]
    run(["pairs", f"ckpt={sft}", f"out={out / 'pairs_train'}", "data.datasets.shapes.n_max=1", *pair_opts], log)
    run(["pairs", f"ckpt={sft}", f"out={out / 'pairs_val'}", "data=demo_val", "data.datasets.shapes_val.n_max=1",
         *pair_opts], log)
    train_pairs, val_pairs = out / "pairs_train" / "shapes.jsonl", out / "pairs_val" / "shapes_val.jsonl"
    run(["stage=mpo", f"init_from={sft}", "data=single", f"data.path={train_pairs}", "++data.datasets.single.n_max=1",
         f"stage.global_batch_size={args.batch}", f"data.micro_batch_size={args.batch}", f"stage.max_steps={args.mpo_steps}",
         "stage.max_epochs=1000", f"stage.lr={args.mpo_lr}", f"run_dir={mpo}", f"hydra.run.dir={mpo}", *common,
         *([f"trainer.max_time={args.mpo_max_time}"] if args.mpo_max_time else [])], log)
    accuracy = held_out_accuracy(mpo, sft, val_pairs, beta=0.1)
    em = None
    if args.exact_match:
        em = {"sft": exact_match(sft, out / "eval_sft", log), "mpo": exact_match(mpo, out / "eval_mpo", log)}
    import csv

    rows = [r for r in csv.DictReader(open(mpo / "metrics.csv")) if r.get("train/rewards/accuracies")]
    train_acc = [float(r["train/rewards/accuracies"]) for r in rows]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared), torch threads default",
        "held_out": accuracy,
        "train_rewards_accuracies": {"first_10_steps": sum(train_acc[:10]) / max(1, len(train_acc[:10])),
                                     "last_10_steps": sum(train_acc[-10:]) / max(1, len(train_acc[-10:]))},
        "pairs": {"train": json.loads((out / "pairs_train" / "pairs.json").read_text())["datasets"],
                  "held_out": json.loads((out / "pairs_val" / "pairs.json").read_text())["datasets"]},
        "exact_match_held_out": em,
        "mpo_steps_done": mpo_steps_done(mpo),
        "steps": {"sft": args.sft_steps, "mpo": args.mpo_steps, "mpo_lr": args.mpo_lr, "mpo_pairs_per_step": args.batch},
        "cpu_seconds_children": round(sum(os.times()[2:4]), 1),
        "commands": log,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "preference_proof.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
