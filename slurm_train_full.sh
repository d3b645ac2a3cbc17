#!/bin/bash
# Full fine-tuning of ResNet50 on Animals-10 (the seed's 80 epochs, a checkpoint every 10).
#   sbatch slurm_train_full.sh
#   EPOCHS=40 ARCH=resnet18 DATA_DIR=data/processed sbatch slurm_train_full.sh
#   TRAIN_ARGS="--resume" sbatch slurm_train_full.sh        # continue a killed run
# Multi-GPU on one node: NPROC=4 sbatch --gres=gpu:4 slurm_train_full.sh (torchrun + DDP).
#SBATCH --job-name=resnet50_animals10_full
#SBATCH --time=24:00:00
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --output=%x_%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
EPOCHS=${EPOCHS:-80} EVERY=${EVERY:-10}
exec bash slurm_common.sh "$PYTHON" --epochs "$EPOCHS" --save_checkpoints_every "$EVERY"
