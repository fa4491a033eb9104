#!/usr/bin/env bash
# One short GPU check (about 4 minutes on one H100/H200, never over 8: every
# case has a time limit, the whole a 450 s budget): steps/s and MFU for
# ViT-B-32 / ViT-L-14 full and lora at bf16, the frozen-tower probe, peak GPU
# memory of large-batch accumulation at effective batch 1024 against one batch,
# a 1-process torchrun run and a 2-process --parallel fsdp run (skipped on one
# GPU); one table at the end. Random init, no downloads. Needs CUDA; CI never
# runs it (tests/test_gpu_check.py runs its --dry-run code on the CPU).
#   benchmarks/gpu_check.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" benchmarks/gpu_check.py --steps "${STEPS:-20}" --budget "${BUDGET:-450}" --json "${1:-gpu_check.json}"
