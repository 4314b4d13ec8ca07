#!/usr/bin/env bash
# A wheelhouse for an air-gapped cluster: wheels of vlmtrain and every dependency, for the
# cluster's Python and platform (which may differ from this machine's). Packages published only
# as source (deepspeed, antlr4-python3-runtime) are built here as pure-Python wheels
# (DeepSpeed with DS_BUILD_OPS=0: its CUDA ops compile just in time on the cluster).
#
#   bash scripts/wheelhouse.sh                                  # -> wheelhouse/, py3.12, x86_64, extras deepspeed
#   PYTHON_VERSION=3.11 EXTRAS=deepspeed,wandb OUT=/tmp/wh bash scripts/wheelhouse.sh
#   PLATFORMS="manylinux_2_28_aarch64 manylinux_2_17_aarch64" bash scripts/wheelhouse.sh   # Grace/ARM nodes
#   DRY_RUN=1 bash scripts/wheelhouse.sh                        # resolve only: OUT/resolution.json
#   TORCH_SPEC="torch==2.6.0" bash scripts/wheelhouse.sh        # pin the cluster's torch
#
# On the cluster:  pip install --no-index --find-links wheelhouse "vlmtrain[deepspeed]"
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-wheelhouse}")
PYTHON=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
EXTRAS=${EXTRAS:-deepspeed}
PLATFORMS=${PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64"}
mkdir -p "$OUT"

echo "[wheelhouse] vlmtrain itself"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" . 2>/dev/null || "$PYTHON" -m pip wheel -q --no-deps -w "$OUT" .
pkg=$(ls -t "$OUT"/vlmtrain-*.whl | head -n1)

# published only as source: build pure-Python wheels here (hydra's parser runtime; DeepSpeed
# without prebuilt ops, which compile just in time on the cluster)
prebuild=("antlr4-python3-runtime==4.9.3")
[[ ",$EXTRAS," == *,deepspeed,* ]] && prebuild+=("deepspeed>=0.15")
for r in "${prebuild[@]}"; do
    echo "[wheelhouse] building $r (source only on PyPI)"
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps -w "$OUT" "$r" 2>&1 | grep -v "^WARNING: Location" || true
done

platform_args=(--only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp)
for p in $PLATFORMS; do platform_args+=(--platform "$p"); done

reqs=("${pkg}${EXTRAS:+[$EXTRAS]}")
if [ -n "${TORCH_SPEC:-}" ]; then reqs+=("$TORCH_SPEC"); fi
if [ "${DRY_RUN:-0}" = 1 ]; then
    # resolve only (metadata, no multi-GB downloads): check the wheelhouse can be built
    fetch=(install --dry-run --ignore-installed --target "$OUT/.dry-run" --report "$OUT/resolution.json")
else
    fetch=(download -d "$OUT")
fi

# binary wheels for the target; whatever exists only as source is built here (pure Python), then retried
for attempt in $(seq 10); do
    log=$(mktemp)
    if "$PYTHON" -m pip "${fetch[@]}" -q --find-links "$OUT" "${platform_args[@]}" "${reqs[@]}" > "$log" 2>&1; then
        rm -f "$log"
        break
    fi
    missing=$(grep -oE "No matching distribution found for [^ ]+" "$log" | head -n1 | awk '{print $NF}')
    if [ -z "$missing" ] || [ "$attempt" = 10 ]; then cat "$log" >&2; rm -f "$log"; exit 1; fi
    echo "[wheelhouse] $missing has no binary wheel for the target: building it here (pure Python)"
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps -w "$OUT" "$missing"
    rm -f "$log"
done
echo "[wheelhouse] $(ls "$OUT" | wc -l) wheels in $OUT ($(du -sh "$OUT" | cut -f1))"
echo "[wheelhouse] on the cluster: pip install --no-index --find-links $OUT \"vlmtrain${EXTRAS:+[$EXTRAS]}\""
