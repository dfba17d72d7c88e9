#!/usr/bin/env bash
# Figure 2 / Table 14: pool-native vs long-biased length distribution for each VQA task.
#   VQA=vqa/ SHORT_DATA=llava.jsonl BASE_CHECKPOINT=ckpt/qwen7b WORK=work_dirs/study \
#     bash examples/ablations/fig2_length.sh --eval-data mmlb:MMLongBench/data,images=MMLongBench/images [--dry-run | --smoke | ...]
# See README "Reproducing the paper"; every flag: python -m megatron_vlm.study --help.
cd "$(dirname "$0")/../.." && exec "${PYTHON:-python3}" -m megatron_vlm.study fig2_length ${VQA:+--vqa "$VQA"} ${SHORT_DATA:+--short-data "$SHORT_DATA"} ${BASE_CHECKPOINT:+--base-checkpoint "$BASE_CHECKPOINT"} --work "${WORK:-work_dirs/study}" "$@"
