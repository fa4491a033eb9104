#!/usr/bin/env bash
# One short GPU check (a few minutes on one H100/H200): steps/s and MFU for
# ViT-B-32 / ViT-L-14 full and lora at bf16, the frozen-tower probe, and a
# 1-process torchrun run. Needs CUDA; CI never runs it.
#   benchmarks/gpu_check.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" benchmarks/gpu_check.py --steps "${STEPS:-20}" --json "${1:-gpu_check.json}"
