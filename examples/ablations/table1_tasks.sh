#!/usr/bin/env bash
# Table 1: one training task per run (extract-single, extract-multi, reasoning, OCR-full, OCR-needle) at equal token budgets.
#   VQA=vqa/ SHORT_DATA=llava.jsonl BASE_CHECKPOINT=ckpt/qwen7b WORK=work_dirs/study \
#     bash examples/ablations/table1_tasks.sh --eval-data mmlb:MMLongBench/data,images=MMLongBench/images [--dry-run | --smoke | ...]
# See README "Reproducing the paper"; every flag: python -m megatron_vlm.study --help.
cd "$(dirname "$0")/../.." && exec "${PYTHON:-python3}" -m megatron_vlm.study table1_tasks ${VQA:+--vqa "$VQA"} ${SHORT_DATA:+--short-data "$SHORT_DATA"} ${BASE_CHECKPOINT:+--base-checkpoint "$BASE_CHECKPOINT"} --work "${WORK:-work_dirs/study}" "$@"
