#!/usr/bin/env bash
# The test command of the README and CI: set up (idempotent), lint and type check
# (scripts/lint.sh: ruff, mypy), then run every test on the CPU, the slow and Slurm ones included.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# the `slurm` tests stand up a local 2-node Slurm cluster: Debian's slurm-wlm + munge (needs root)
if ! command -v slurmctld >/dev/null 2>&1 && [ ! -x /usr/sbin/slurmctld ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi
bash scripts/setup.sh .venv
VENV=.venv bash scripts/lint.sh
exec .venv/bin/python -m pytest -m "not gpu" "$@"
