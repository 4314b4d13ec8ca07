#!/usr/bin/env bash
# The test command of the README and CI: set up (idempotent), then run every test on the CPU,
# the slow and Slurm ones included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
exec .venv/bin/python -m pytest -m "not gpu" "$@"
