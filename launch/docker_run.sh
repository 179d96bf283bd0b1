#!/usr/bin/env bash
# Run a slowqk command in the Docker image, with the GPUs, shared memory and mounts it needs.
#   launch/docker_run.sh [--image slowqk:latest] [--data DIR] [--runs DIR] -- <slowqk args...>
# Example:
#   launch/docker_run.sh --data "$PWD/data" --runs "$PWD/runs" -- launch llama-125m --nproc 8
set -euo pipefail

image="slowqk:latest"
data_dir="$PWD/data"
runs_dir="$PWD/runs"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --image) image="$2"; shift 2 ;;
    --data) data_dir="$2"; shift 2 ;;
    --runs) runs_dir="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "docker_run.sh: unknown option '$1' (put slowqk arguments after --)" >&2; exit 2 ;;
  esac
done
mkdir -p "$runs_dir"
gpu_flags=()
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu_flags=(--gpus all)
fi
# --ipc=host / large shm: NCCL and data loader workers share memory; ulimits as NVIDIA recommends
exec docker run --rm "${gpu_flags[@]}" \
  --ipc=host --shm-size=16g --ulimit memlock=-1 --ulimit stack=67108864 \
  --user "$(id -u):$(id -g)" \
  -v "$data_dir":/workspace/data:ro \
  -v "$runs_dir":/workspace/runs \
  "$image" "$@"
