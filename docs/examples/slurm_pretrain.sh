#!/usr/bin/env bash
#SBATCH --job-name=lmkiln-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
# One torchrun per node; torchrun starts a process per GPU. Resubmit the same script to resume.
set -euo pipefail
RECIPE=${RECIPE:-recipes/my.yaml}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node 8 \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:29500" --rdzv_id "$SLURM_JOB_ID" \
    -m lmkiln pretrain "$RECIPE" pretrain.strategy=fsdp "$@"
