#!/bin/bash
# Ensemble members (TracIn/ensemble.py) as a SLURM job array: task k trains member k of the original run (its settings,
# seed + k) in $OUT_DIR/member_k; a requeued or resubmitted task resumes its member (train.py --resume).
#   bash slurm_train_ensemble.sh                        # on the login node: submits members 1..MEMBERS-1
#   MEMBERS=8 bash slurm_train_ensemble.sh
#   MEMBERS=8 FORK_EPOCH=1 OUT_DIR=models/forks bash slurm_train_ensemble.sh   # cheap members: forks after epoch 1
# Then: python -m TracIn.efficient_tracin --members models/checkpoints models/members/member_*/checkpoints
# Overrides: MEMBERS (4) CHECKPOINT_DIR (models/checkpoints) OUT_DIR (models/members) FORK_EPOCH (0: independent) LOG_DIR (.) PYTHON
#            SBATCH_EXTRA_ARGS (extra sbatch flags, e.g. "--gres=none" on a CPU partition)
#SBATCH --job-name=ensemble
#SBATCH --time=12:00:00
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --output=%x_%A_%a.out
set -euo pipefail
self=$(realpath "$0")
cd "${SLURM_SUBMIT_DIR:-$(dirname "$self")}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MEMBERS=${MEMBERS:-4}
common=(--members "$MEMBERS" --checkpoint_dir "${CHECKPOINT_DIR:-models/checkpoints}" --out_dir "${OUT_DIR:-models/members}"
        --num_workers "${SLURM_CPUS_PER_TASK:-4}" --fork_epoch "${FORK_EPOCH:-0}")

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "ensemble member $SLURM_ARRAY_TASK_ID of $MEMBERS (job $SLURM_JOB_ID)"
  exec "$PYTHON" -m TracIn.ensemble "${common[@]}" --only "$SLURM_ARRAY_TASK_ID"
else
  # shellcheck disable=SC2206
  extra=(${SBATCH_EXTRA_ARGS:-})
  logs=${LOG_DIR:-.}
  array_id=$(sbatch --parsable "${extra[@]}" --output="$logs/%x_%A_%a.out" --array=1-$((MEMBERS - 1)) \
             --export=ALL,MEMBERS="$MEMBERS",FORK_EPOCH="${FORK_EPOCH:-0}" "$self")
  echo "submitted ensemble array ${array_id%%;*} (members 1..$((MEMBERS - 1)))"
fi
