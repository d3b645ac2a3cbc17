#!/bin/bash
# A short fine-tuning run (10 epochs, a checkpoint every 2): a quick TracIn-ready model.
#   sbatch slurm_train_short.sh
#   EPOCHS=4 EVERY=1 ARCH=resnet18 DATA_DIR=data/processed sbatch slurm_train_short.sh
#SBATCH --job-name=resnet50_animals10_short
#SBATCH --time=02:00:00
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --output=%x_%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
EPOCHS=${EPOCHS:-10} EVERY=${EVERY:-2}
exec bash slurm_common.sh "$PYTHON" --epochs "$EPOCHS" --save_checkpoints_every "$EVERY"
