#!/bin/bash
# LDS retrains (TracIn/lds.py) as a SLURM job array plus a scoring job: each subset is retrained once, by one task.
#   bash slurm_lds.sh                                   # on the login node: submits the array and the dependent merge
#   NUM_SHARDS=16 LDS_ARGS="--retrain full --num_subsets 100" bash slurm_lds.sh
# Array task i runs `python -m TracIn.lds --shard i/N` (subsets j with j % N == i, each one record in out_dir/subsets/);
# the merge job (afterok) runs --merge: every method scored against every record, lds.json written. A failed task can
# simply be resubmitted: records already written are kept.
# Overrides: NUM_SHARDS (4) LOG_DIR (.) DATA_DIR RESULTS_DIR (TracIn/results) LDS_ARGS PYTHON
#            SBATCH_EXTRA_ARGS (extra sbatch flags for both jobs, e.g. "--gres=none" on a CPU partition)
#SBATCH --job-name=lds
#SBATCH --time=04:00:00
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --output=%x_%A_%a.out
set -euo pipefail
self=$(realpath "$0")
cd "${SLURM_SUBMIT_DIR:-$(dirname "$self")}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
NUM_SHARDS=${NUM_SHARDS:-4}
# shellcheck disable=SC2206
common=(--data_dir "${DATA_DIR:-data/processed}" --results_dir "${RESULTS_DIR:-TracIn/results}"
        --num_workers "${SLURM_CPUS_PER_TASK:-4}" ${LDS_ARGS:-})

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "lds shard $SLURM_ARRAY_TASK_ID/$NUM_SHARDS (job $SLURM_JOB_ID)"
  exec "$PYTHON" -m TracIn.lds "${common[@]}" --shard "$SLURM_ARRAY_TASK_ID/$NUM_SHARDS"
elif [ "${LDS_MODE:-}" = merge ]; then
  echo "lds merge of $NUM_SHARDS shards (job ${SLURM_JOB_ID:-local})"
  exec "$PYTHON" -m TracIn.lds "${common[@]}" --merge
else
  # shellcheck disable=SC2206
  extra=(${SBATCH_EXTRA_ARGS:-})
  logs=${LOG_DIR:-.}
  array_id=$(sbatch --parsable "${extra[@]}" --output="$logs/%x_%A_%a.out" --array=0-$((NUM_SHARDS - 1)) \
             --export=ALL,NUM_SHARDS="$NUM_SHARDS" "$self")
  merge_id=$(sbatch --parsable "${extra[@]}" --job-name=lds_merge --output="$logs/%x_%j.out" --dependency=afterok:"${array_id%%;*}" \
             --export=ALL,LDS_MODE=merge,NUM_SHARDS="$NUM_SHARDS" "$self")
  echo "submitted LDS array ${array_id%%;*} ($NUM_SHARDS shards) and merge ${merge_id%%;*}"
fi
