#!/bin/bash
# Shared body of slurm_train_{full,short}.sh: train.py with overrides from the environment.
#   DATA_DIR (data/processed) ARCH (resnet50) BATCH_SIZE (32) LR (1e-4) CHECKPOINT_DIR (models/checkpoints)
#   MODELS_DIR (models) WEIGHTS (imagenet) NUM_WORKERS (SLURM_CPUS_PER_TASK or 4) NPROC (1: >1 uses torchrun)
#   TRAIN_ARGS (extra flags, e.g. "--resume" or "--lr_schedule cosine")
set -euo pipefail
PYTHON=$1; shift
args=("$@" --data_dir "${DATA_DIR:-data/processed}" --arch "${ARCH:-resnet50}" --batch_size "${BATCH_SIZE:-32}"
      --learning_rate "${LR:-1e-4}" --checkpoint_dir "${CHECKPOINT_DIR:-models/checkpoints}"
      --models_dir "${MODELS_DIR:-models}" --weights "${WEIGHTS:-imagenet}" --num_workers "${NUM_WORKERS:-${SLURM_CPUS_PER_TASK:-4}}")
# shellcheck disable=SC2206
extra=(${TRAIN_ARGS:-})
echo "job ${SLURM_JOB_ID:-local} on $(hostname): train.py ${args[*]} ${extra[*]}"
if [ "${NPROC:-1}" -gt 1 ]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train.py "${args[@]}" "${extra[@]}"
fi
exec "$PYTHON" train.py "${args[@]}" "${extra[@]}"
