#!/usr/bin/env bash
# Submit the InternVL 2.5 recipe as dependent Slurm jobs: stage 1 -> (1.5) -> 2, each starting
# (afterok) when the previous one succeeded, with init_from = the previous stage's run directory.
#
#   bash slurm/pipeline.sh runs/my-vlm model=internvl2_5_8b hardware=deepspeed_zero1
#   WITH_VIT=1 bash slurm/pipeline.sh runs/my-vlm model=internvl2_5_8b hardware=fsdp     # include stage 1.5
#   SBATCH_ARGS="--nodes=4 --time=48:00:00" bash slurm/pipeline.sh runs/my-vlm ...
#
# Arguments after the run root are Hydra overrides for every stage. A stage that is preempted
# requeues itself and resumes (slurm/train.sbatch), so its dependants simply wait longer.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:?usage: pipeline.sh RUN_ROOT [hydra overrides...]}
shift
mkdir -p "$ROOT"
read -r -a extra <<< "${SBATCH_ARGS:-}"

submit() {  # submit NAME DEPENDENCY OVERRIDES... -> prints the job id
    local name=$1 dep=$2; shift 2
    local args=(--parsable --job-name="vlmtrain-$name" --output="$ROOT/slurm-%x-%j.out" "${extra[@]}")
    [ -n "$dep" ] && args+=(--dependency="afterok:$dep" --kill-on-invalid-dep=yes)
    VLMTRAIN_RUN_DIR="$ROOT/$name" sbatch "${args[@]}" slurm/train.sbatch "$@" | cut -d';' -f1
}

s1=$(submit s1_mlp_warmup "" stage=mlp_warmup "$@")
echo "stage 1   (mlp_warmup):         job $s1 -> $ROOT/s1_mlp_warmup"
prev=$s1 prev_dir=$ROOT/s1_mlp_warmup
if [ "${WITH_VIT:-0}" = 1 ]; then
    s15=$(submit s1_5_vit_incremental "$prev" stage=vit_incremental init_from="$prev_dir" "$@")
    echo "stage 1.5 (vit_incremental):    job $s15 -> $ROOT/s1_5_vit_incremental (after $prev)"
    prev=$s15 prev_dir=$ROOT/s1_5_vit_incremental
fi
s2=$(submit s2_instruction_tuning "$prev" stage=instruction_tuning init_from="$prev_dir" "$@")
echo "stage 2   (instruction_tuning): job $s2 -> $ROOT/s2_instruction_tuning (after $prev)"
