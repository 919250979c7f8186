#!/bin/bash
# Step-JEPA fine-tuning of a causal LM on reasoning steps (pretrain/configs/step_jepa.yaml; docs/design.md,
# Step-JEPA fine-tuning).
#   sbatch slurm/step_jepa.sh [--set KEY=VALUE ...]            (from the repository root)
# The #SBATCH lines are this stage's defaults: edit them here, or override any on sbatch's command line.
# Partition and account: add #SBATCH --partition= / --account= lines, or set SBATCH_PARTITION and
# SBATCH_ACCOUNT in the environment (sbatch reads them). Everything else: slurm/common.sh.
#SBATCH --job-name=step_jepa
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

CONFIG=${CONFIG:-pretrain/configs/step_jepa.yaml}
source "${CROMWELL_DIR:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
launch pretrain/train.py --config "$CONFIG" "$@"
