#!/usr/bin/env bash
# ZeRO-3 on GPU gave wrong losses (experiments/results/scaleout.md). On a 2-GPU host this separates
# the suspects, then re-measures FSDP 1- vs 2-GPU scaling:
#   GPU 0, the tiny model (packed 550-token buffers, 3 steps; the CPU tests' setting):
#     fp32 one process vs fp32 ZeRO-3 (every parameter partitioned): any gap is a GPU-path bug;
#     bf16-mixed one process vs ZeRO-3 (DeepSpeed bf16), and pure bf16 (bf16-true) one process.
#   GPU 1, the InternVL2.5-1B architecture: ZeRO-3 (timing with stage3_max_reuse_distance 0) and
#     pure bf16 one process, 3 steps each.
#   then both GPUs: FSDP instruction_tuning on 2 GPUs and on 1.
# Usage (repo root, GPU host): OUT=/tmp/diag bash experiments/bench/zero3_diagnose.sh
set -u
OUT=${OUT:-/tmp/zero3_diagnose}
mkdir -p "$OUT"
BENCH="python3 experiments/bench/scaleout.py"
TINY=(--experiment none --steps 3 --warmup 1 --global-batch 8 --timeout 120 --extra data/collate=packed
      data.collate.max_tokens=550 data.datasets.shapes.n_max=1 data.num_workers=0 stage.drop_path=0 stage.warmup_steps=1)
FP32=(hardware.precision=32-true)
DS_FP32=(hardware.strategy.config.bf16.enabled=false hardware.strategy.config.zero_optimization.stage3_param_persistence_threshold=0)

(
  export CUDA_VISIBLE_DEVICES=1 MASTER_PORT=29611
  $BENCH --out "$OUT/1b_zero3" --runs deepspeed_zero3:instruction_tuning:1 --steps 3 --timeout 200
  $BENCH --out "$OUT/1b_bf16true" --runs gpu:instruction_tuning:1 --steps 3 --timeout 120 --extra hardware.precision=bf16-true
) > "$OUT/gpu1.txt" 2>&1 &

(
  export CUDA_VISIBLE_DEVICES=0 MASTER_PORT=29622
  $BENCH --out "$OUT/tiny_fp32" --runs gpu:instruction_tuning:1 "${TINY[@]}" "${FP32[@]}"
  $BENCH --out "$OUT/tiny_fp32_zero3" --runs deepspeed_zero3:instruction_tuning:1 "${TINY[@]}" "${FP32[@]}" "${DS_FP32[@]}"
  $BENCH --out "$OUT/tiny_bf16" --runs gpu:instruction_tuning:1 deepspeed_zero3:instruction_tuning:1 "${TINY[@]}"
  $BENCH --out "$OUT/tiny_bf16true" --runs gpu:instruction_tuning:1 "${TINY[@]}" hardware.precision=bf16-true
) > "$OUT/gpu0.txt" 2>&1
wait

$BENCH --out "$OUT/fsdp" --runs fsdp:instruction_tuning:2 fsdp:instruction_tuning:1 --timeout 170 > "$OUT/fsdp.txt" 2>&1

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*/results.json")):
    for r in json.loads(f.read_text())["runs"]:
        print(f.parent.name, r["run"], "loss", r.get("loss"), "grad_norm", r.get("grad_norm"),
              "tok/s/gpu", r.get("tokens_per_s_per_gpu"), "step_s", r.get("step_s"), "wall", r.get("wall_s"),
              "peak", r.get("max_allocated_gib"), "ERROR " + r["error"][-300:] if r.get("error") else "")
PY
grep -h "PASS\|FAIL" "$OUT"/*.txt
