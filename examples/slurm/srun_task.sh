#!/bin/bash
# One srun task = one trainer process: translate Slurm's task variables into torch.distributed's
# env:// variables (MASTER_ADDR/PORT come from lib.sh), then exec so signals reach the trainer.
set -euo pipefail
export RANK="$SLURM_PROCID"
export WORLD_SIZE="$SLURM_NTASKS"
export LOCAL_RANK="$SLURM_LOCALID"
export LOCAL_WORLD_SIZE="$SLURM_NTASKS_PER_NODE"
export GROUP_RANK="$SLURM_NODEID"
exec "$@"
