#!/usr/bin/env bash
# The CPU image's base from Debian's packages: bookworm (Python 3.11) with python3, venv and pip.
#   bash docker/build_cpu_base.sh [IMAGE_NAME]   (default debian-python:bookworm)
# Needs mmdebstrap and podman or docker (root, or a rootless setup that can import images).
set -euo pipefail
name="${1:-debian-python:bookworm}"
engine="$(command -v podman || command -v docker || true)"
[ -n "$engine" ] || { echo "build_cpu_base.sh: neither podman nor docker found" >&2; exit 2; }
command -v mmdebstrap >/dev/null || { echo "build_cpu_base.sh: mmdebstrap not found (apt-get install mmdebstrap)" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mmdebstrap --quiet --variant=minbase \
  --include=python3,python3-venv,python3-pip,ca-certificates,procps \
  bookworm "$work/rootfs.tar"
"$engine" import --quiet "$work/rootfs.tar" "$name" >/dev/null
echo "$name"
