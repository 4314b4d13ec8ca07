"""Strategies x stages on the InternVL2.5-1B architecture: loss per step and tokens/s per GPU.

Each run is `python -m vlmtrain experiment=scaleout_internvl2_5_1b hardware=H stage=S
hardware.devices=N stage.global_batch_size=4N` (4 samples per GPU per step, same seed, same data),
then its metrics.csv is read. Prints a markdown table and writes results.json.

    python experiments/bench/scaleout.py --out /tmp/scaleout                        # the default grid, 2 GPUs
    python experiments/bench/scaleout.py --runs fsdp:mlp_warmup:2 fsdp:instruction_tuning:1 --steps 6
    python experiments/bench/scaleout.py --runs ddp:mlp_warmup:2 --extra model=tiny hardware.accelerator=cpu \
        hardware.precision=32-true data.datasets.shapes.n_max=1 --steps 3    # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_RUNS = [  # most informative first, in case the deadline cuts the list
    "fsdp:instruction_tuning:2", "fsdp:instruction_tuning:1",
    "deepspeed_zero2:instruction_tuning:2", "deepspeed_zero3:instruction_tuning:2",
    "fsdp:mlp_warmup:2:ckpt", "deepspeed_zero3:mlp_warmup:2:ckpt", "deepspeed_zero2:mlp_warmup:2",
    "deepspeed_zero2:instruction_tuning:1",
]


def read_metrics(path: Path) -> list[dict]:
    rows = [r for r in csv.DictReader(open(path)) if r.get("train/loss")]
    out = []
    for r in rows:
        out.append({k: float(v) for k, v in r.items() if v not in ("", None)})
    return out


def run_one(spec: str, steps: int, out: Path, extra: list[str], per_gpu_batch: int, timeout: int) -> dict:
    hardware, stage, devices, *flags = spec.split(":")
    devices = int(devices)
    save = "ckpt" in flags  # hardware:stage:devices:ckpt also writes (and checks) the final checkpoint
    run_dir = out / f"{hardware}-{stage}-{devices}gpu"
    cmd = [sys.executable, "-m", "vlmtrain", "experiment=scaleout_internvl2_5_1b", f"hardware={hardware}",
           f"stage={stage}", f"hardware.devices={devices}", f"stage.global_batch_size={per_gpu_batch * devices}",
           f"stage.max_steps={steps}", f"trainer.checkpoint={save}", f"hydra.run.dir={run_dir}", *extra]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        (out / f"{run_dir.name}.log").write_text(str(e.stdout or "") + str(e.stderr or ""))
        return {"run": spec, "error": f"timed out after {timeout}s", "wall_s": timeout}
    wall = time.time() - t0
    (out / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    result = {"run": spec, "hardware": hardware, "stage": stage, "devices": devices, "wall_s": round(wall, 1),
              "returncode": proc.returncode, "command": " ".join(cmd[1:])}
    if proc.returncode != 0:
        result["error"] = (proc.stderr or proc.stdout)[-1500:]
        return result
    rows = read_metrics(run_dir / "metrics.csv")
    result["loss"] = [round(r["train/loss"], 5) for r in rows]
    result["grad_norm"] = [round(r.get("train/grad_norm", float("nan")), 4) for r in rows]
    tps = [r["train/tokens_per_s_per_gpu"] for r in rows[2:] if "train/tokens_per_s_per_gpu" in r]
    result["tokens_per_s_per_gpu"] = round(sum(tps) / len(tps), 1) if tps else None  # steps 3.. (warm)
    if save:
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        files = [ckpt] if ckpt.is_file() else sorted(p for p in ckpt.rglob("*") if p.is_file())
        result["checkpoint"] = {"path": str(ckpt), "is_dir": ckpt.is_dir(), "files": len(files),
                                "bytes": sum(p.stat().st_size for p in files),
                                "tmp_left": ckpt.with_name("last.ckpt.tmp").exists()}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="hardware:stage:devices")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--per-gpu-batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("outputs/scaleout"))
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="start no run after this many seconds")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    start = time.time()
    for spec in args.runs:
        if time.time() - start > args.deadline:
            results.append({"run": spec, "error": "not started: deadline reached"})
            continue
        r = run_one(spec, args.steps, args.out, args.extra, args.per_gpu_batch, args.timeout)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "command"}), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))

    print("\n| run | wall s | loss per step | tokens/s per GPU (steps 3+) |")
    print("|---|---|---|---|")
    for r in results:
        loss = " ".join(f"{x:.4f}" for x in r.get("loss", [])) or f"FAILED ({r.get('error', '')[-80:]})"
        print(f"| {r['run']} | {r.get('wall_s')} | {loss} | {r.get('tokens_per_s_per_gpu')} |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
