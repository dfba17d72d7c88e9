#!/usr/bin/env bash
# LongPT of Qwen2.5-VL-7B from 32K to 128K (the MMProLong recipe) on Slurm: 8 nodes x 8 GPUs.
#
#   MODEL_DIR=/ckpt/qwen25vl-7b-megatron DATA_PREFIX=/data/longpt/mix RUN_DIR=/runs/longpt \
#     sbatch examples/longpt_128k.sh [--set key=value ...]
#   DRY_RUN=1 bash examples/longpt_128k.sh      # print the launch command instead of running it
#   SAVE_GRACE_SECONDS=900 ...                   # time a stopped run gets to save (default 600)
#
# MODEL_DIR: a model directory from `tools/checkpoint/convert.py hf-to-megatron` (rope base is set
# to 4e6 by the recipe). DATA_PREFIX: tools/preprocess_data.py output. Extra arguments go to the
# trainer as overrides. Resubmitting (or Slurm's requeue) resumes from the last checkpoint.
#
# Stopping with a checkpoint. The trainer, on SIGUSR1/SIGTERM/SIGINT, finishes its step, saves and exits 0.
# torchrun (torch.distributed.run) forwards a signal it handles to every worker's process group and
# SIGKILLs what is left after its shutdown timeout, 30 s by default -- far too short for a 7B save. So:
#   * torchrun gets --signals-to-handle ...,SIGUSR1 (forward USR1 instead of dying of it) and
#     --shutdown-timeout $SAVE_GRACE_SECONDS (also exported as TORCH_ELASTIC_SHUTDOWN_TIMEOUT);
#   * Slurm warns this batch shell only (B:) with SIGUSR1 720 s before the time limit; the shell runs
#     srun in the background, forwards that signal ONCE to the job step, and keeps waiting for it,
#     ignoring repeats. Keep the @720 below >= SAVE_GRACE_SECONDS + 60 (the step + save must end
#     before Slurm's own SIGTERM/SIGKILL at the limit).
#   * SIGTERM/SIGINT to this shell (scancel, preemption): Slurm signals the job step itself, so the
#     shell does not forward again (torchrun would take a second signal as a new shutdown); it waits.
#     How long a cancelled/preempted job may live is Slurm's KillWait / PreemptMode GraceTime: ask for
#     a GraceTime >= SAVE_GRACE_SECONDS, or PreemptParameters=send_user_signal, which sends the USR1.
# LAUNCHER=local runs torchrun without srun (one node, no Slurm): there every signal is forwarded once.
#SBATCH --job-name=longpt-128k
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@720
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${MODEL_DIR:?set MODEL_DIR to a converted Qwen2.5-VL model directory}"
: "${DATA_PREFIX:?set DATA_PREFIX to the preprocess_data.py output prefix}"
RUN_DIR=${RUN_DIR:-runs/longpt-128k}
RECIPE=${RECIPE:-qwen25vl_7b_longpt_128k}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_JOB_NUM_NODES:-${NNODES:-1}}
TP=${TP:-}   # empty: the recipe's layout (qwen25vl_7b_longpt_128k: CP=2 for 96 GB GPUs; ..._80gb: CP=4)
CP=${CP:-}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)}
MASTER_PORT=${MASTER_PORT:-29500}
SAVE_GRACE_SECONDS=${SAVE_GRACE_SECONDS:-600}   # finish the step + save a 7B checkpoint before SIGKILL
LAUNCHER=${LAUNCHER:-srun}                      # srun | local
[[ "$SAVE_GRACE_SECONDS" =~ ^[0-9]+$ ]] || { echo "SAVE_GRACE_SECONDS must be whole seconds" >&2; exit 2; }

# NCCL / CUDA: fail loudly instead of hanging, keep kernels ordered for TP/CP overlap, use IB if present.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SAVE_GRACE_SECONDS

LAUNCH=(torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${SLURM_JOB_ID:-local}"
        --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$SAVE_GRACE_SECONDS"
        -m megatron_vlm.train --recipe "$RECIPE"
        --set "model.load=$MODEL_DIR" --set "data.prefix=$DATA_PREFIX" --set "log.run_dir=$RUN_DIR"
        ${TP:+--set "parallel.tensor_parallel=$TP"} ${CP:+--set "parallel.context_parallel=$CP"} "$@")

case "$LAUNCHER" in
  srun) STEP=(srun --kill-on-bad-exit=1 "${LAUNCH[@]}") ;;
  local) STEP=(setsid "${LAUNCH[@]}") ;;   # own process group: only this shell's forward reaches it
  *) echo "LAUNCHER must be srun or local, not $LAUNCHER" >&2; exit 2 ;;
esac
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  printf '%s' "${STEP[0]}"
  printf ' %q' "${STEP[@]:1}"
  printf '\n'
  exit 0
fi
# torchrun without --shutdown-timeout (torch < 2.12) would SIGKILL the workers 30 s into the save.
torchrun_help=$(torchrun --help 2>&1 || true)
if [[ "$torchrun_help" != *--shutdown-timeout* || "$torchrun_help" != *--signals-to-handle* ]]; then
  echo "this torchrun lacks --shutdown-timeout/--signals-to-handle (torch >= 2.12 needed): a stopped job could not save" >&2
  exit 2
fi
mkdir -p "$RUN_DIR"

log() { printf '[launcher %(%F %T)T] %s\n' -1 "$*" >&2; }
FORWARDED=0 STEP_PID= PENDING=
# (`return 0`, never a bare `return`: in a trap, that returns the interrupted `wait`'s status, and set -e exits)
on_signal() {  # $1: the signal this shell got
  if [[ -z "$STEP_PID" ]]; then PENDING=$1; return 0; fi  # arrived before the step started
  if (( FORWARDED )); then log "SIG$1 again: already forwarded once; still waiting for the workers"; return 0; fi
  if [[ "$LAUNCHER" == srun && "$1" != USR1 ]]; then
    log "SIG$1: Slurm signals the job step itself; waiting for the workers to save (grace ${SAVE_GRACE_SECONDS}s)"
    return 0
  fi
  FORWARDED=1
  log "SIG$1: forwarding it once to the job step; workers save a checkpoint (grace ${SAVE_GRACE_SECONDS}s)"
  kill -s "$1" "$STEP_PID" 2>/dev/null || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP
"${STEP[@]}" &   # in the background: bash runs traps only between commands, and `wait` is one
STEP_PID=$!
[[ -z "$PENDING" ]] || on_signal "$PENDING"
while :; do  # a trapped signal interrupts `wait`; wait again until the step has really exited
  rc=0
  wait "$STEP_PID" || rc=$?
  kill -0 "$STEP_PID" 2>/dev/null || break
done
if (( FORWARDED )) || (( rc > 128 )); then
  log "job step exited with status $rc (torchrun exits non-zero after a signal; the trainer log says whether it saved)"
fi
exit "$rc"
