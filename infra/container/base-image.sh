#!/usr/bin/env bash
# The base image of phiops-llm images, made from Debian's packages alone (no Docker Hub):
#
#   infra/container/base-image.sh                 # -> phiops-base:bookworm       (CPU images)
#   infra/container/base-image.sh --variant cuda  # -> phiops-base:bookworm-cuda  (GPU images)
#   infra/container/base-image.sh --tag my/base:1 # another name
#
# Needs root, mmdebstrap and a running Docker engine (infra/container/engine.sh). ~45 s and
# ~50 MB of downloads from Debian's package registry. `phiops containerize` runs this when
# `container.base_image` is null and the image is missing.
#
# What is in it, and why:
# - python3.11 and python3.11-venv: the Python phiops pins; the image's venv is made with it
#   (ensurepip's bundled pip installs the wheelhouse, so python3-pip is not needed).
# - ca-certificates: nothing in the service makes TLS calls, but a user adding a package later
#   would need them; 0.4 MB.
# - cuda only: gcc, libc6-dev, python3.11-dev. Triton compiles a small C launcher with `cc` at
#   run time, and the service's CUDA decoders (Triton kernels, torch.compile) need it. The CUDA
#   libraries themselves come as PyPI wheels with torch (nvidia-*), and the driver is mounted by
#   the NVIDIA container toolkit, so no nvidia/cuda base is needed.
# Left out: documentation, man pages, locales and apt's package lists (~40 MB); the image runs
# with LANG=C.UTF-8. `apt-get update` first if you extend it.
set -euo pipefail

variant=cpu
tag=
suite=bookworm   # Debian 12: Python 3.11 is its python3, glibc 2.36
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
packages=python3.11,python3.11-venv,ca-certificates
case "$variant" in
  cpu) tag="${tag:-phiops-base:$suite}" ;;
  cuda) tag="${tag:-phiops-base:$suite-cuda}"; packages="$packages,gcc,libc6-dev,python3.11-dev" ;;
  *) echo "--variant is cpu or cuda, not $variant" >&2; exit 2 ;;
esac
for tool in mmdebstrap docker; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: infra/container/engine.sh install" >&2; exit 3; }
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mmdebstrap --variant=apt --include="$packages" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  "$suite" "$tmp/rootfs.tar"
docker import \
  --change 'ENV LANG=C.UTF-8 LC_ALL=C.UTF-8' \
  --change 'CMD ["python3.11"]' \
  --change "LABEL org.opencontainers.image.title=phiops-base org.opencontainers.image.description=\"Debian $suite + Python 3.11 ($variant), made by infra/container/base-image.sh\"" \
  "$tmp/rootfs.tar" "$tag" >/dev/null
echo "$tag"
