#!/usr/bin/env bash
# Run a slowqk command in the image (docker or podman), with the GPUs, shared memory and mounts
# it needs: the data read-only at /workspace/data, the runs (and the caches) writable at
# /workspace/runs, /tmp in memory. Nothing else in the container is written.
#   launch/docker_run.sh [--engine docker|podman] [--image slowqk:latest] [--data DIR] [--runs DIR]
#                        [--name NAME] [--keep] -- <slowqk args...>
# The engine: --engine, else $SLOWQK_CONTAINER_ENGINE, else docker when its daemon answers, else
# podman. --keep leaves the stopped container (for `diff`, `logs`). Example:
#   launch/docker_run.sh --data "$PWD/data" --runs "$PWD/runs" -- launch llama-125m --nproc 8
set -euo pipefail

image="slowqk:latest"
data_dir="$PWD/data"
runs_dir="$PWD/runs"
engine="${SLOWQK_CONTAINER_ENGINE:-}"
name=()
remove=(--rm)
while [ "$#" -gt 0 ]; do
  case "$1" in
    --engine) engine="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --data) data_dir="$2"; shift 2 ;;
    --runs) runs_dir="$2"; shift 2 ;;
    --name) name=(--name "$2"); shift 2 ;;
    --keep) remove=(); shift ;;
    --) shift; break ;;
    *) echo "docker_run.sh: unknown option '$1' (put slowqk arguments after --)" >&2; exit 2 ;;
  esac
done
if [ -z "$engine" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    engine=docker
  elif command -v podman >/dev/null 2>&1; then
    engine=podman
  else
    echo "docker_run.sh: neither a running docker nor podman found" >&2
    exit 2
  fi
fi
case "$engine" in
  docker|podman) ;;
  *) echo "docker_run.sh: --engine must be docker or podman, got '$engine'" >&2; exit 2 ;;
esac
mkdir -p "$runs_dir"
flags=()
if command -v nvidia-smi >/dev/null 2>&1; then
  # --ipc=host / large shm: NCCL and data loader workers share memory; ulimits as NVIDIA
  # recommends for NCCL (raising them needs a capability a CPU-only container host may lack)
  if [ "$engine" = podman ]; then flags+=(--device nvidia.com/gpu=all); else flags+=(--gpus all); fi
  flags+=(--ipc=host --shm-size=16g --ulimit memlock=-1 --ulimit stack=67108864)
fi
if [ "$(id -u)" != 0 ]; then  # files in the runs directory owned by the caller
  flags+=(--user "$(id -u):$(id -g)")
fi
exec "$engine" run "${remove[@]}" "${name[@]}" "${flags[@]}" --tmpfs /tmp \
  -v "$data_dir":/workspace/data:ro \
  -v "$runs_dir":/workspace/runs \
  "$image" "$@"
