#!/usr/bin/env bash
# Lint and type check (CI runs it from scripts/test.sh before pytest): ruff (E, F, I, B, UP; see
# pyproject's [tool.ruff]) over the repo, then the lenient mypy pass over the package ([tool.mypy]).
# Uses the tools of VENV (default .venv, set up by scripts/setup.sh with the `test` extra), else PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
bin() { if [ -x "$VENV/bin/$1" ]; then echo "$VENV/bin/$1"; else command -v "$1"; fi; }
"$(bin ruff)" check .
"$(bin mypy)" vlmtrain
