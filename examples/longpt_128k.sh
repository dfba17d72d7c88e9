#!/usr/bin/env bash
# LongPT of Qwen2.5-VL-7B from 32K to 128K (the MMProLong recipe) on Slurm: 8 nodes x 8 GPUs.
#
#   MODEL_DIR=/ckpt/qwen25vl-7b-megatron DATA_PREFIX=/data/longpt/mix RUN_DIR=/runs/longpt \
#     sbatch examples/longpt_128k.sh [--set key=value ...]
#   DRY_RUN=1 bash examples/longpt_128k.sh      # print the launch command instead of running it
#
# MODEL_DIR: a model directory from `tools/checkpoint/convert.py hf-to-megatron` (rope base is set
# to 4e6 by the recipe). DATA_PREFIX: tools/preprocess_data.py output. Extra arguments go to the
# trainer as overrides. A preempted job (SIGTERM) saves a checkpoint; resubmitting resumes it.
#SBATCH --job-name=longpt-128k
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${MODEL_DIR:?set MODEL_DIR to a converted Qwen2.5-VL model directory}"
: "${DATA_PREFIX:?set DATA_PREFIX to the preprocess_data.py output prefix}"
RUN_DIR=${RUN_DIR:-runs/longpt-128k}
RECIPE=${RECIPE:-qwen25vl_7b_longpt_128k}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_JOB_NUM_NODES:-${NNODES:-1}}
TP=${TP:-1}
CP=${CP:-2}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)}
MASTER_PORT=${MASTER_PORT:-29500}

# NCCL / CUDA: fail loudly instead of hanging, keep kernels ordered for TP/CP overlap, use IB if present.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

LAUNCH=(torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${SLURM_JOB_ID:-local}"
        -m megatron_vlm.train --recipe "$RECIPE"
        --set "model.load=$MODEL_DIR" --set "data.prefix=$DATA_PREFIX" --set "log.run_dir=$RUN_DIR"
        --set "parallel.tensor_parallel=$TP" --set "parallel.context_parallel=$CP" "$@")

if [[ "${DRY_RUN:-0}" != 0 ]]; then
  printf 'srun --kill-on-bad-exit=1'
  printf ' %q' "${LAUNCH[@]}"
  printf '\n'
  exit 0
fi
mkdir -p "$RUN_DIR"
exec srun --kill-on-bad-exit=1 "${LAUNCH[@]}"
