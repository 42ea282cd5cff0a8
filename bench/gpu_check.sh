#!/usr/bin/env bash
# The GPU check in one run, at most 8 minutes on one H100 (bench/gpu_check.py; bench/README.md).
#
#   bash bench/gpu_check.sh                        # report: bench/results/gpu-check.md (.json beside it)
#   bash bench/gpu_check.sh --out /tmp/check.md    # elsewhere
#   bash bench/gpu_check.sh --cpu                  # every stage on the CPU, CI-sized (tests/test_gpu_check.py)
#   COLM_GPU_CHECK_DATA=path/train.jsonl bash bench/gpu_check.sh   # the data (else see --help)
#
# Installs nothing: Python is $PYTHON, else the repository's .venv, else python3; the project's
# packages come from the working tree. Each stage has its own time limit and the report is written
# after every stage, so a failure or a timeout keeps what the stages before it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
exec "$PY" bench/gpu_check.py "$@"
