#!/usr/bin/env bash
# Set up a virtual environment for vlmtrain: torch first (the CPU wheel, so pip never pulls a
# multi-GB CUDA build as a side effect), then the package with its test extras.
# Usage: bash scripts/setup.sh [venv dir, default .venv]   (TORCH_SPEC=torch==X to choose torch)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/python" -m pip install -q -e ".[test]"
