"""GPU check for issue 22 claim 6: after MPO, the model beats its SFT checkpoint by >= 2 points of
exact match on held-out questions. Starts from the learning proof's checkpoints
(``experiments/learning_proof/run.py``, owned by the proofs engineer; this script only reads its
work directory: ``<lp>/data/annotations{,_val}.jsonl`` and the stage-2 run ``<lp>/instruction_tuning``).

    python experiments/preference/gpu_mpo_after_sft.py --lp runs/learning_proof --out runs/mpo_after_sft   # one H200, < 10 min

1. ``vlmtrain pairs`` with the SFT checkpoint on ``--questions`` training questions: ``--samples``
   answers each at temperature 1, sampling pairs where one is wrong (DropoutNTP off: its one-by-one
   continuations would not fit the budget, and questions the model always answers right teach little).
2. ``vlmtrain stage=mpo init_from=<SFT run>`` on those pairs (the learning proof's model and packing;
   copy reference; ``--lr``, ``--epochs``).
3. ``vlmtrain eval`` of both checkpoints on the held-out split (the learning proof's eval settings);
   the JSON gives exact match of both and the difference in points (claim: >= 2).

Writes ``--out/mpo_after_sft.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SYSTEM = "Answer with one word or number."  # the learning proof's data.system


def vlmtrain(args: list[str], log: list, env_extra: dict | None = None) -> None:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env_extra or {}))
    print("python -m vlmtrain", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "vlmtrain", *args], check=True, env=env, cwd=REPO)
    log.append({"command": "python -m vlmtrain " + " ".join(args), "seconds": round(time.perf_counter() - t0, 1)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lp", type=Path, required=True, help="the learning proof's work directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--questions", type=int, default=12000, help="training questions sampled for pairs")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="pairs per optimizer step")
    args = ap.parse_args()
    lp, out = args.lp.resolve(), args.out.resolve()
    sft, data = lp / "instruction_tuning", lp / "data"
    out.mkdir(parents=True, exist_ok=True)
    log: list = []
    t0 = time.perf_counter()
    system = f"data.system='{SYSTEM}'"
    vlmtrain(["pairs", f"ckpt={sft}", f"out={out / 'pairs'}", "data=single", f"data.path={data / 'annotations.jsonl'}",
              "++data.datasets.single.n_max=1", system, f"pairs.limit={args.questions}", f"pairs.samples={args.samples}",
              "pairs.max_new_tokens=4", "pairs.batch_size=256", "pairs.dropout_ntp=false", "pairs.reference=false",
              "device=cuda"], log)
    pairs = out / "pairs" / "single.jsonl"
    mpo = out / "mpo"
    vlmtrain(["experiment=learning_proof", "stage=mpo", f"init_from={sft}", "data=single", f"data.path={pairs}",
              "~data.datasets.shapes", "++data.datasets.single.n_max=1", system, f"stage.lr={args.lr}",
              f"stage.global_batch_size={args.batch}", f"stage.max_epochs={args.epochs}", "stage.drop_path=0.0",
              "model.compile=[]", "data.num_workers=8", f"run_dir={mpo}", f"hydra.run.dir={mpo}"], log,
             {"LEARNING_PROOF_DATA": str(data)})
    scores = {}
    for name, ckpt in (("sft", sft), ("mpo", mpo)):
        vlmtrain(["eval", f"ckpt={ckpt}", f"out={out / ('eval_' + name)}", "data=single",
                  f"data.path={data / 'annotations_val.jsonl'}", "++data.datasets.single.n_max=1", system,
                  "eval.batch_size=512", "generation.max_new_tokens=4", "device=cuda"], log)
        scores[name] = json.loads((out / f"eval_{name}" / "metrics.json").read_text())["overall"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exact_match": {k: v["exact_match"] for k, v in scores.items()},
        "gain_points": round(100 * (scores["mpo"]["exact_match"] - scores["sft"]["exact_match"]), 2),
        "claim_gain_ge_2_points": 100 * (scores["mpo"]["exact_match"] - scores["sft"]["exact_match"]) >= 2.0,
        "pairs": json.loads((out / "pairs" / "pairs.json").read_text())["datasets"],
        "args": {k: str(v) for k, v in vars(args).items()},
        "commands": log,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "mpo_after_sft.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
