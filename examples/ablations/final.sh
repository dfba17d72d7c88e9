#!/usr/bin/env bash
# the final MMProLong recipe: 8:2, pool-native, no short data, mRoPE base 4e6.
#   VQA=vqa/ SHORT_DATA=llava.jsonl BASE_CHECKPOINT=ckpt/qwen7b WORK=work_dirs/study \
#     bash examples/ablations/final.sh --eval-data mmlb:MMLongBench/data,images=MMLongBench/images [--dry-run | --smoke | ...]
# See README "Reproducing the paper"; every flag: python -m megatron_vlm.study --help.
cd "$(dirname "$0")/../.." && exec "${PYTHON:-python3}" -m megatron_vlm.study final ${VQA:+--vqa "$VQA"} ${SHORT_DATA:+--short-data "$SHORT_DATA"} ${BASE_CHECKPOINT:+--base-checkpoint "$BASE_CHECKPOINT"} --work "${WORK:-work_dirs/study}" "$@"
