#!/usr/bin/env bash
# Table 3 / Figure 3: short-context data share 0%, 20%, 40% of the budget (+ HF exports and the VLMEvalKit command).
#   VQA=vqa/ SHORT_DATA=llava.jsonl BASE_CHECKPOINT=ckpt/qwen7b WORK=work_dirs/study \
#     bash examples/ablations/table3_short.sh --eval-data mmlb:MMLongBench/data,images=MMLongBench/images [--dry-run | --smoke | ...]
# See README "Reproducing the paper"; every flag: python -m megatron_vlm.study --help.
cd "$(dirname "$0")/../.." && exec "${PYTHON:-python3}" -m megatron_vlm.study table3_short ${VQA:+--vqa "$VQA"} ${SHORT_DATA:+--short-data "$SHORT_DATA"} ${BASE_CHECKPOINT:+--base-checkpoint "$BASE_CHECKPOINT"} --work "${WORK:-work_dirs/study}" "$@"
