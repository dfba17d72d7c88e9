#!/usr/bin/env bash
# Table 16: mRoPE base 1e6, 2e6, 4e6, 8e6 for each VQA task.
#   VQA=vqa/ SHORT_DATA=llava.jsonl BASE_CHECKPOINT=ckpt/qwen7b WORK=work_dirs/study \
#     bash examples/ablations/table16_rope.sh --eval-data mmlb:MMLongBench/data,images=MMLongBench/images [--dry-run | --smoke | ...]
# See README "Reproducing the paper"; every flag: python -m megatron_vlm.study --help.
cd "$(dirname "$0")/../.." && exec "${PYTHON:-python3}" -m megatron_vlm.study table16_rope ${VQA:+--vqa "$VQA"} ${SHORT_DATA:+--short-data "$SHORT_DATA"} ${BASE_CHECKPOINT:+--base-checkpoint "$BASE_CHECKPOINT"} --work "${WORK:-work_dirs/study}" "$@"
