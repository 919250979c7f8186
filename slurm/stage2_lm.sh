#!/bin/bash
# Stage 2 of the curriculum: language modelling (pretrain/configs/stage2_lm.yaml).
#   sbatch slurm/stage2_lm.sh [--set KEY=VALUE ...]            (from the repository root)
# The #SBATCH lines are this stage's defaults: edit them here, or override any on sbatch's command line.
# Partition and account: add #SBATCH --partition= / --account= lines, or set SBATCH_PARTITION and
# SBATCH_ACCOUNT in the environment (sbatch reads them). Everything else: slurm/common.sh.
#SBATCH --job-name=stage2_lm
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=2-00:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

CONFIG=${CONFIG:-pretrain/configs/stage2_lm.yaml}
source "${CROMWELL_DIR:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
launch pretrain/train.py --config "$CONFIG" "$@"
