#!/usr/bin/env bash
# Build the CPU image (and its Debian base when missing) from this checkout with podman or docker;
# prints the image's size and the build time.
#   bash docker/build_cpu_image.sh [TAG]   (default slowqk:cpu)
# torch's CPU wheel comes from download.pytorch.org, or from a local folder of wheels: the one
# SLOWQK_TORCH_WHEELS names, else the folder pip's own configuration finds (find-links).
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-slowqk:cpu}"
base="debian-python:bookworm"
engine="$(command -v podman || command -v docker || true)"
[ -n "$engine" ] || { echo "build_cpu_image.sh: neither podman nor docker found" >&2; exit 2; }
"$engine" image exists "$base" 2>/dev/null || "$engine" image inspect "$base" >/dev/null 2>&1 \
  || bash docker/build_cpu_base.sh "$base" >/dev/null
wheels="${SLOWQK_TORCH_WHEELS:-${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}}"
args=(--build-arg VARIANT=cpu --build-arg "BASE_IMAGE=$base")
if [ -n "$wheels" ] && compgen -G "$wheels/torch-*.whl" >/dev/null; then
  args+=(-v "$wheels:/wheels:ro" --build-arg "TORCH_SOURCE=--find-links /wheels")
fi
# pip inside the build reaches the package index through the host's network and CA bundle
[ -d /etc/ssl/certs ] && args+=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
case "$engine" in *podman) args+=(--format docker) ;; esac  # keeps SHELL
start=$(date +%s)
"$engine" build --quiet --network host "${args[@]}" -f docker/Dockerfile -t "$tag" . >/dev/null
seconds=$(( $(date +%s) - start ))
size=$("$engine" image inspect "$tag" --format '{{.Size}}')
echo "image $tag: $(( size / 1000000 )) MB, built in ${seconds} s"
