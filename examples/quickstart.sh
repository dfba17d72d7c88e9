#!/usr/bin/env bash
# The main job on a fresh CPU machine: install, then run every stage that exists so far on a tiny
# Qwen2.5-VL-architecture model. Stages land with their issues (see README.md, "Status"):
#   now:   HF checkpoint -> Megatron distributed checkpoint (rope 1e6 -> 4e6) -> logit check
#          -> HF export -> the export loads in transformers and matches again
#   next:  PDFs -> pool -> VQA -> mix -> mmap -> train -> export -> eval report
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${WORK:-work_dirs/quickstart}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"   # the CPU build; never a CUDA one here
fi
"$PY" -m pip install -q -e ".[dev]"
export PYTHONWARNINGS=ignore

rm -rf "$WORK" && mkdir -p "$WORK"
echo "== 1. a tiny random HF Qwen2.5-VL checkpoint"
"$PY" tools/make_tiny_checkpoint.py "$WORK/hf"
echo "== 2. HF -> Megatron (distributed checkpoint, rope base 1e6 -> 4e6, checked for TP=2)"
"$PY" tools/checkpoint/convert.py hf-to-megatron --hf-dir "$WORK/hf" --out-dir "$WORK/megatron" --tp 2 --rope-theta 4e6
echo "== 3. verify: Megatron vs transformers logits on fixed text + image inputs"
"$PY" tools/checkpoint/convert.py verify --hf-dir "$WORK/hf" --megatron-dir "$WORK/megatron"
echo "== 4. Megatron -> HF export"
"$PY" tools/checkpoint/convert.py megatron-to-hf --in-dir "$WORK/megatron" --out-dir "$WORK/hf_export"
echo "== 5. verify the export (loads with transformers, rope base 4e6 in its config)"
"$PY" tools/checkpoint/convert.py verify --hf-dir "$WORK/hf_export" --megatron-dir "$WORK/megatron"
echo "quickstart done: outputs in $WORK"
