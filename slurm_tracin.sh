#!/bin/bash
# TracIn over many training images as a SLURM job array of training shards plus a merge job.
#   bash slurm_tracin.sh                 # on the login node: submits the array and the dependent merge
#   NUM_SHARDS=8 TRACIN_ARGS="--top_k 100 --train_subset 0" bash slurm_tracin.sh
# Shards score TracIn (--score_fn tracin, normalised; tracin_last also shards): the curvature-aware default
# (influence_last) needs the whole training set's curvature, so it runs unsharded (efficient_tracin.py on one node).
# Each array task runs efficient_tracin.py --shard_index $SLURM_ARRAY_TASK_ID --num_shards N;
# the merge job (afterok) runs --merge and writes arrays identical to one unsharded run.
# Overrides: NUM_SHARDS (4) LOG_DIR (.) DATA_DIR CHECKPOINT_DIR OUTPUT_DIR (TracIn/results) TRACIN_ARGS PYTHON
#            SBATCH_EXTRA_ARGS (extra sbatch flags for both jobs, e.g. "--gres=none" on a CPU partition)
#SBATCH --job-name=tracin
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
common=(--data_dir "${DATA_DIR:-data/processed}" --checkpoint_dir "${CHECKPOINT_DIR:-models/checkpoints}"
        --output_dir "${OUTPUT_DIR:-TracIn/results}" --num_shards "$NUM_SHARDS"
        --num_workers "${SLURM_CPUS_PER_TASK:-4}" --score_fn tracin ${TRACIN_ARGS:-})

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "tracin shard $SLURM_ARRAY_TASK_ID/$NUM_SHARDS (job $SLURM_JOB_ID)"
  exec "$PYTHON" -m TracIn.efficient_tracin "${common[@]}" --shard_index "$SLURM_ARRAY_TASK_ID"
elif [ "${TRACIN_MODE:-}" = merge ]; then
  echo "tracin merge of $NUM_SHARDS shards (job ${SLURM_JOB_ID:-local})"
  exec "$PYTHON" -m TracIn.efficient_tracin "${common[@]}" --merge
else
  # shellcheck disable=SC2206
  extra=(${SBATCH_EXTRA_ARGS:-})
  logs=${LOG_DIR:-.}
  array_id=$(sbatch --parsable "${extra[@]}" --output="$logs/%x_%A_%a.out" --array=0-$((NUM_SHARDS - 1)) \
             --export=ALL,NUM_SHARDS="$NUM_SHARDS" "$self")
  merge_id=$(sbatch --parsable "${extra[@]}" --job-name=tracin_merge --output="$logs/%x_%j.out" --dependency=afterok:"${array_id%%;*}" \
             --export=ALL,TRACIN_MODE=merge,NUM_SHARDS="$NUM_SHARDS" "$self")
  echo "submitted TracIn array ${array_id%%;*} ($NUM_SHARDS shards) and merge ${merge_id%%;*}"
fi
