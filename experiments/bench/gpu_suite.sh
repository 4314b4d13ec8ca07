#!/usr/bin/env bash
# The GPU suite of issue 21 on one H200, one model size per device call (10-minute hard limit; budgeted
# for ~8.5 min: the four rows of one size fit, two sizes do not):
#   1. the processor check (experiments/bench/processor_check.py: vlmtrain export -> transformers'
#      AutoProcessor + AutoModelForImageTextToText vs vlmtrain chat; PASS/FAIL JSON); skip with NO_PROCESSOR=1
#   2. experiments/bench/throughput.py, rows trainer / loop / hf_strong / hf_naive, for
#      experiment=bench_internvl2_5_$SIZES (random weights; every ratio of one size from one call)
# Everything lands under $OUT: env.txt, processor_check.{json,log}, throughput_<size>.{json,md,log}, summary.md.
#
# The device commands (one line each, from the repository root; .whl/ holds the hydra-core, omegaconf and
# antlr4-python3-runtime wheels the device's python3 lacks). Call 1, 1B and the processor check:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && bash experiments/bench/gpu_suite.sh
#
# Call 2, 2B:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && SIZES=2b NO_PROCESSOR=1 bash experiments/bench/gpu_suite.sh
#
# The ablation of issue 21 item 3 (the bench loop with each speed lever alone and together: bf16 compute
# weights + fp32 masters, fused ViT qkv, selective activation checkpointing, all, all with 16k buffers),
# 2b first, then 1b as time allows:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && bash experiments/bench/gpu_suite.sh --ablation
#
# Options (environment): BUDGET=500 (seconds for the whole suite; rows that would start too late are
# recorded as skipped), STEPS=5 and WARMUP=7 (per row), SIZES (1b; "2b 1b" with --ablation),
# ROWS=trainer,loop,hf_strong,hf_naive,hf_strong_flex (the last: the strong row with transformers'
# flex_attention, last because the budget may skip it), NO_PROCESSOR=1, HF_ATTN=auto (hf_strong's attn_implementation:
# flash_attention_3/2 when installed, else sdpa; e.g. flex_attention).
# `bash experiments/bench/gpu_suite.sh --cpu` runs the same suite on the CPU with the tiny model (a test
# of the script, not a measurement). Needs no webdataset, wandb, deepspeed, flash-attn or av.
set -uo pipefail
cd "$(dirname "$0")/../.."
CPU=0
ABLATION=0
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    --ablation) ABLATION=1 ;;
    *) echo "gpu_suite.sh: unknown option $arg (--cpu, --ablation)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_suite_out}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${BUDGET:-500}
END=$((START + BUDGET))
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/vlmtrain_inductor}   # shared by the rows: the second compile of a block is a cache hit
export TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled
left() { echo $((END - $(date +%s))); }

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  git log -1 --format="commit %H %s" 2>/dev/null || echo "commit: (no git)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv 2>/dev/null || echo "no nvidia-smi"
  nproc
  $PY - <<'EOF'
import importlib
for m in ("torch", "transformers", "lightning", "hydra", "omegaconf", "triton", "torchvision", "peft", "torchao",
          "flash_attn", "flash_attn_interface", "liger_kernel", "swift"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "missing:", type(e).__name__)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$CPU" = 1 ]; then
  DEVICE=cpu; SIZES=${SIZES:-tiny}; STEPS=${STEPS:-1}; WARMUP=${WARMUP:-1}
  COMMON=(--device cpu --samples-per-step 2 --text 10 30 --peak-tflops 1)
else
  DEVICE=cuda; STEPS=${STEPS:-5}; WARMUP=${WARMUP:-7}
  if [ "$ABLATION" = 1 ]; then SIZES=${SIZES:-"2b 1b"}; else SIZES=${SIZES:-1b}; fi
  COMMON=(--device cuda --hf-attn "${HF_ATTN:-auto}")
fi
if [ "$CPU" = 1 ]; then ROWS=${ROWS:-trainer,loop,hf_strong,hf_naive}; else ROWS=${ROWS:-trainer,loop,hf_strong,hf_naive,hf_strong_flex}; fi

if [ "$ABLATION" = 1 ]; then
  MODE=(--ablation); TAG=ablation_; FIRST_SHARE=${FIRST_SHARE:-65}
else
  MODE=(--rows "$ROWS"); TAG=; FIRST_SHARE=${FIRST_SHARE:-40}
fi
if [ "$ABLATION" = 0 ] && [ "${NO_PROCESSOR:-0}" != 1 ]; then
  echo "== processor check ($(left)s left)"
  timeout 150 $PY experiments/bench/processor_check.py --device "$DEVICE" --out "$OUT/processor_check.json" \
    > "$OUT/processor_check.log" 2>&1
  echo "processor check rc=$? result=$(grep -o '"result": "[A-Z]*"' "$OUT/processor_check.json" 2>/dev/null || echo none)"
fi

n=$(echo $SIZES | wc -w)
i=0
for size in $SIZES; do
  i=$((i + 1))
  # this size's share of what is left (the suite: 1b first, 40%, the 2b rows take ~1.5x the 1b's;
  # the ablation: 2b first, 65%)
  if [ "$i" -lt "$n" ]; then share=$(( $(left) * FIRST_SHARE / 100 )); else share=$(( $(left) - 5 )); fi
  deadline=$(( $(date +%s) + share ))
  if [ "$size" = tiny ]; then EXP=(); else EXP=(experiment=bench_internvl2_5_$size); fi
  echo "== throughput $size (${share}s of $(left)s left)"
  timeout $((share + 40)) $PY experiments/bench/throughput.py "${EXP[@]}" "${COMMON[@]}" "${MODE[@]}" \
    --steps "$STEPS" --warmup "$WARMUP" --deadline "$deadline" \
    --out "$OUT/throughput_$TAG$size.json" --md "$OUT/throughput_$TAG$size.md" > "$OUT/throughput_$TAG$size.log" 2>&1
  echo "throughput $TAG$size rc=$?"
  grep -E "^(internvl|tiny)[^ ]* (trainer|loop|hf_strong|hf_naive|hf_strong_flex|ablation/[a-z0-9_]*):|Error|error:" \
    "$OUT/throughput_$TAG$size.log" | tail -8
done

{
  echo "# GPU suite, $(date -u +%Y-%m-%d) ($(($(date +%s) - START)) s)"
  echo
  echo '```'; cat "$OUT/env.txt"; echo '```'
  echo
  if [ -f "$OUT/processor_check.log" ]; then
    echo "## Processor check"
    echo '```'; cat "$OUT/processor_check.json" 2>/dev/null || tail -5 "$OUT/processor_check.log"; echo '```'
  fi
  for size in $SIZES; do
    echo; cat "$OUT/throughput_$TAG$size.md" 2>/dev/null || echo "($size: no table; see throughput_$TAG$size.log)"
  done
} > "$OUT/summary.md"
echo "== done in $(($(date +%s) - START)) s"
cat "$OUT/summary.md" | tail -40
