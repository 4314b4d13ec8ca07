"""Strategies x stages on the InternVL2.5-1B architecture: loss per step, tokens/s per GPU, scaling.

Each run is `python -m vlmtrain experiment=scaleout_internvl2_5_1b hardware=H stage=S
hardware.devices=N stage.global_batch_size=G stage.max_steps=STEPS` (same seed, same data: every run
takes the same G samples per step, so 1- and 2-GPU runs and all strategies see the same steps), then
its metrics.csv is read. Prints markdown tables and writes results.json (per run: losses, step
times, tokens/s per GPU over the steps after --warmup, checkpoint) to --out.

Checks (printed as PASS / FAIL):
- loss: every pair of runs of one stage, per step, |a - b| / b <= --tol-first at step 1 (same
  weights: only rounding differs) and <= --tol at every step (bf16; the lr warm-up of the
  experiment keeps the first Adam updates small). The 1- vs 2-GPU pair of one strategy measures the
  bf16/reduction-order noise floor itself. Strategy correctness in exact arithmetic is
  tests/test_strategies.py (fp32, CPU ranks, FSDP2 and DeepSpeed ZeRO-1/2/3 vs one process).
- scaling: tokens/s per GPU of the 2-GPU run >= --min-scaling x the 1-GPU run, same strategy/stage.

    python experiments/bench/scaleout.py --out /tmp/scaleout --deadline 520     # the default list, 2 GPUs
    python experiments/bench/scaleout.py --runs fsdp:mlp_warmup:2 fsdp:instruction_tuning:1 --steps 6
    python experiments/bench/scaleout.py --experiment none --runs ddp:instruction_tuning:2 cpu:instruction_tuning:1 \\
        --global-batch 8 --steps 3 --warmup 1 --extra hardware.accelerator=cpu hardware.precision=32-true \\
        data/collate=packed data.datasets.shapes.n_max=1 data.num_workers=0 stage.drop_path=0   # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

DEFAULT_RUNS = [  # most important first, in case the deadline cuts the list
    "deepspeed_zero3:instruction_tuning:2", "deepspeed_zero3:mlp_warmup:2:ckpt",
    "fsdp:instruction_tuning:2", "fsdp:instruction_tuning:1",
    "deepspeed_zero2:mlp_warmup:2", "deepspeed_zero2:instruction_tuning:2", "deepspeed_zero2:instruction_tuning:1",
    "fsdp:mlp_warmup:2",
]


def read_metrics(path: Path) -> list[dict]:
    rows = [r for r in csv.DictReader(open(path)) if r.get("train/loss")]
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in rows]


def timing(rows: list[dict], warmup: int) -> dict:
    """Tokens/s per GPU over the steps after ``warmup``: all ranks' tokens / all those steps' time.

    The meter logs each step's tokens/s over the step's wall time (the slowest rank's, since the
    step ends in collectives), so step time = tokens / (tokens/s)."""
    timed = [r for r in rows[warmup:] if r.get("train/tokens_per_s")]
    if not timed:
        return {}
    tokens = [_step_tokens(rows, r) for r in timed]
    seconds = [t / r["train/tokens_per_s"] for t, r in zip(tokens, timed)]
    gpus = timed[0]["train/tokens_per_s"] / timed[0]["train/tokens_per_s_per_gpu"]
    return {"timed_steps": len(timed), "tokens_per_s_per_gpu": round(sum(tokens) / sum(seconds) / gpus, 1),
            "step_s": [round(s, 3) for s in seconds],
            "step_s_spread": round((max(seconds) - min(seconds)) / statistics.median(seconds), 3),
            "tokens_per_step": [int(t) for t in tokens],
            "mfu": round(statistics.mean(r["train/mfu"] for r in timed), 4) if "train/mfu" in timed[0] else None,
            # busiest rank / mean rank over the timed steps (1.0: balanced), from the data alone
            **{f"imbalance_{k}": round(statistics.mean(r[f"train/rank_imbalance/{k}"] for r in timed), 3)
               for k in ("tokens", "tiles") if f"train/rank_imbalance/{k}" in timed[0]},
            "max_allocated_gib": max((r.get("gpu/max_allocated_gib", 0.0) for r in rows), default=None)}


def _step_tokens(rows: list[dict], row: dict) -> float:
    """Tokens of this step from the running total (train/tokens_seen)."""
    i = rows.index(row)
    return row["train/tokens_seen"] - (rows[i - 1]["train/tokens_seen"] if i else 0.0)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_one(spec: str, args, timeout: float) -> dict:
    hardware, stage, devices, *flags = spec.split(":")
    devices = int(devices)
    save = "ckpt" in flags  # hardware:stage:devices:ckpt also writes (and checks) the final checkpoint
    run_dir = args.out / f"{hardware}-{stage}-{devices}gpu"
    experiment = [] if args.experiment == "none" else [f"experiment={args.experiment}"]
    cmd = [sys.executable, "-m", "vlmtrain", *experiment, f"hardware={hardware}",
           f"stage={stage}", f"hardware.devices={devices}", f"stage.global_batch_size={args.global_batch}",
           f"stage.max_steps={args.steps}", f"trainer.checkpoint={save}", f"hydra.run.dir={run_dir}", *args.extra]
    t0 = time.time()
    log = args.out / f"{run_dir.name}.log"
    # its own process group: on a timeout the other ranks (children of rank 0) are killed too, so
    # they cannot hold a GPU through the next runs
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
        log.write_text(stdout + stderr)
        result = {"run": spec, "hardware": hardware, "stage": stage, "devices": devices,
                  "error": f"timed out after {timeout:.0f}s", "wall_s": round(timeout, 1)}
        if (run_dir / "metrics.csv").exists():  # steps done before the limit
            result["loss"] = [round(r["train/loss"], 5) for r in read_metrics(run_dir / "metrics.csv")]
        return result
    wall = time.time() - t0
    _kill_group(proc.pid)  # a rank left waiting after rank 0 failed
    log.write_text(stdout + stderr)
    result = {"run": spec, "hardware": hardware, "stage": stage, "devices": devices, "wall_s": round(wall, 1),
              "returncode": proc.returncode, "command": " ".join(cmd[1:])}
    if proc.returncode != 0:
        result["error"] = (stderr or stdout)[-1500:]
        return result
    rows = read_metrics(run_dir / "metrics.csv")
    result["loss"] = [round(r["train/loss"], 5) for r in rows]
    result["grad_norm"] = [round(r.get("train/grad_norm", float("nan")), 4) for r in rows]
    result.update(timing(rows, args.warmup))
    summary = run_dir / "summary.json"
    if summary.exists():
        result["train_seconds"] = json.loads(summary.read_text()).get("train_seconds")
    if save:
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        files = [ckpt] if ckpt.is_file() else sorted(p for p in ckpt.rglob("*") if p.is_file())
        result["checkpoint"] = {"path": str(ckpt), "is_dir": ckpt.is_dir(), "files": len(files),
                                "bytes": sum(p.stat().st_size for p in files),
                                "tmp_left": ckpt.with_name("last.ckpt.tmp").exists()}
    return result


def loss_checks(results: list[dict], tol_first: float, tol: float) -> list[dict]:
    """Every pair of finished runs of one stage: per-step relative loss difference vs the tolerances."""
    done = [r for r in results if r.get("loss") and "error" not in r]
    checks = []
    for a, b in combinations(done, 2):
        if a["stage"] != b["stage"]:
            continue
        n = min(len(a["loss"]), len(b["loss"]))
        rel = [abs(x - y) / abs(y) for x, y in zip(a["loss"][:n], b["loss"][:n])]
        ok = bool(rel) and rel[0] <= tol_first and max(rel) <= tol
        checks.append({"a": a["run"], "b": b["run"], "rel_diff": [round(x, 5) for x in rel], "pass": ok,
                       "noise_floor_pair": a["hardware"] == b["hardware"]})
    return checks


def scaling_checks(results: list[dict], minimum: float) -> list[dict]:
    done = {(r["hardware"], r["stage"], r["devices"]): r for r in results
            if r.get("tokens_per_s_per_gpu") and "error" not in r}
    checks = []
    for (hw, stage, n), r in done.items():
        one = done.get((hw, stage, 1))
        if n > 1 and one:
            ratio = r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
            checks.append({"strategy": hw, "stage": stage, "gpus": n, "per_gpu_1": one["tokens_per_s_per_gpu"],
                           f"per_gpu_{n}": r["tokens_per_s_per_gpu"], "ratio": round(ratio, 3), "pass": ratio >= minimum,
                           "imbalance_tiles": r.get("imbalance_tiles"), "imbalance_tokens": r.get("imbalance_tokens")})
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="hardware:stage:devices[:ckpt]")
    ap.add_argument("--experiment", default="scaleout_internvl2_5_1b", help="none: no experiment file (CPU smoke runs)")
    ap.add_argument("--steps", type=int, default=12, help="12: one epoch of the experiment's data")
    ap.add_argument("--warmup", type=int, default=4, help="steps left out of the timing (the first 1-GPU steps were still speeding up at step 3)")
    ap.add_argument("--global-batch", type=int, default=64, help="samples per step, the same for every run")
    ap.add_argument("--out", type=Path, default=Path("outputs/scaleout"))
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run at most")
    ap.add_argument("--deadline", type=float, default=float("inf"),
                    help="seconds from the start by which every run has ended: a run gets what is left (at most "
                         "--timeout), and none starts with less than --min-run left")
    ap.add_argument("--min-run", type=float, default=45, help="seconds a run needs at least")
    ap.add_argument("--tol-first", type=float, default=0.005, help="relative loss difference allowed at step 1")
    ap.add_argument("--tol", type=float, default=0.03, help="relative loss difference allowed at every step")
    ap.add_argument("--min-scaling", type=float, default=0.9)
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    start = time.time()
    for spec in args.runs:
        left = args.deadline - (time.time() - start)
        if left < args.min_run:
            results.append({"run": spec, "error": f"not started: {max(left, 0):.0f}s left before the deadline"})
            continue
        r = run_one(spec, args, min(args.timeout, left))
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("command", "grad_norm")}), flush=True)
        (args.out / "results.json").write_text(json.dumps({"runs": results}, indent=1))

    losses = loss_checks(results, args.tol_first, args.tol)
    scaling = scaling_checks(results, args.min_scaling)
    (args.out / "results.json").write_text(json.dumps(
        {"runs": results, "loss_checks": losses, "scaling_checks": scaling,
         "tolerances": {"first_step": args.tol_first, "every_step": args.tol, "min_scaling": args.min_scaling}},
        indent=1))

    print("\n| run | wall s | loss per step | tokens/s per GPU (after warm-up) | step s (spread) | rank imbalance "
          "tiles / tokens | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        loss = " ".join(f"{x:.4f}" for x in r.get("loss", []))
        if "error" in r:
            loss = f"{loss} FAILED ({r['error'][-120:]!r})"
        step = f"{statistics.median(r['step_s']):.2f} ({r['step_s_spread']:.0%})" if r.get("step_s") else ""
        print(f"| {r['run']} | {r.get('wall_s')} | {loss} | {r.get('tokens_per_s_per_gpu')} | {step} | "
              f"{r.get('imbalance_tiles')} / {r.get('imbalance_tokens')} | {r.get('max_allocated_gib')} |")
    print(f"\nloss agreement (step 1 <= {args.tol_first:.1%}, every step <= {args.tol:.1%}):")
    for c in losses:
        tag = " (same strategy, 1 vs 2 GPUs: noise floor)" if c["noise_floor_pair"] else ""
        print(f"  {'PASS' if c['pass'] else 'FAIL'} {c['a']} vs {c['b']}: max {max(c['rel_diff']):.2%}, "
              f"per step {' '.join(f'{x:.2%}' for x in c['rel_diff'])}{tag}")
    print(f"scaling (tokens/s per GPU, 2 GPUs >= {args.min_scaling:.0%} of 1 GPU):")
    for c in scaling:
        print(f"  {'PASS' if c['pass'] else 'FAIL'} {c['strategy']} {c['stage']}: {c['ratio']:.1%} "
              f"({c['per_gpu_1']} -> {c['per_gpu_' + str(c['gpus'])]} tokens/s per GPU; busiest rank / mean: "
              f"tiles {c['imbalance_tiles']}, tokens {c['imbalance_tokens']})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
