#!/usr/bin/env bash
# Train a MoM model with torchtitan 0.2.2.
#
#   ./run_train.sh --job.config_file train_configs/mom_debug.toml [--section.key value ...]
#
# NGPU: processes per node (default: the number of CUDA GPUs, or 1 without one).
# LOG_RANK: ranks whose logs are shown (default 0). CONFIG_FILE: a TOML, used when no
# --job.config_file is passed. Every other argument goes to torchtitan unchanged.
# PYTHON: the interpreter (default python). If it cannot import momtitan and torchtitan,
# scripts/setup_env.sh picks one that can, creating ./.venv if needed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c 'import momtitan, torchtitan' >/dev/null 2>&1; then
    # scripts/setup_env.sh prints an interpreter that has everything, making ./.venv if none has
    PYTHON="$(bash "$ROOT/scripts/setup_env.sh")"
fi

if [ -z "${NGPU:-}" ]; then
    NGPU="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)"
fi
LOG_RANK="${LOG_RANK:-0}"

ARGS=("$@")
have_config=0
for a in "${ARGS[@]+"${ARGS[@]}"}"; do
    case "$a" in --job.config_file|--job.config-file|--job.config_file=*|--job.config-file=*) have_config=1 ;; esac
done
if [ "$have_config" = 0 ] && [ -n "${CONFIG_FILE:-}" ]; then
    ARGS=(--job.config_file "$CONFIG_FILE" "${ARGS[@]+"${ARGS[@]}"}")
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
# CPU runs: one intra-op thread pool per rank, sized to share the cores.
if [ -z "${OMP_NUM_THREADS:-}" ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    CORES="$("$PYTHON" -c 'import os; print(len(os.sched_getaffinity(0)))')"
    export OMP_NUM_THREADS=$(( CORES / NGPU > 0 ? CORES / NGPU : 1 ))
fi

exec "$PYTHON" -m torch.distributed.run \
    --nproc_per_node="$NGPU" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
    --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
    -m momtitan.train \
    --experimental.custom_import momtitan.train \
    --job.custom_config_module momtitan.train.job_config \
    "${ARGS[@]+"${ARGS[@]}"}"
