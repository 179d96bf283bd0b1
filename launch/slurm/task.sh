#!/usr/bin/env bash
# One SLURM task = one rank: map Slurm's task ids to torch.distributed's variables, then run.
set -euo pipefail
export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
exec "$@"
