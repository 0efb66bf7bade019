#!/usr/bin/env bash
# Create .venv and install phiops with the given extras from the lock: bash scripts/install.sh pipeline[,test]
# (scripts/demo.sh and scripts/test.sh call it). uv installs where it can (a tenth of pip's time, cold: bench/README.md),
# pip otherwise; both install exactly scripts/lock/<extras>.txt, hash-checked, then phiops itself as an editable install.
# PHIOPS_INSTALLER=pip forces pip (bench/install_time.py compares the two).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="$1"
lock="scripts/lock/${extras//,/-}.txt"
[ -f "$lock" ] || { echo "no lock for extras '$extras' ($lock)" >&2; exit 2; }
# A stdlib venv, so .venv/bin/pip exists whoever installs (phiops.container and users call it).
python3.11 -m venv .venv
PIP=.venv/bin/pip
. scripts/_sources.sh
say() { echo "install: $*" >&2; }

# The lock is the CPU set for CPython 3.11 on Linux x86_64. Elsewhere, and on an NVIDIA GPU machine (which wants
# PyPI's CUDA torch), pip resolves the same pins from pyproject.toml instead.
if [ "$(uname -sm)" != "Linux x86_64" ] || nvidia-smi -L >/dev/null 2>&1; then
  say "not a CPU-only Linux x86_64 machine: resolving the pins from pyproject.toml with pip, not the lock"
  exec "$PIP" install --quiet -e ".[$extras]"
fi
torch_cpu=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$lock")

# uv: the one pinned in the lock, hash-checked, installed into the venv by pip (the pipeline extra keeps it there);
# a uv already on PATH if that fails (no wheel for this machine, no registry).
uv=""
if [ "${PHIOPS_INSTALLER:-}" != pip ]; then
  if [ -x .venv/bin/uv ]; then
    uv=.venv/bin/uv
  else
    uv_req="$(mktemp)"
    awk '/^uv==/ {p = 1; print; next} p && /^ +--hash/ {print; next} {p = 0}' "$lock" > "$uv_req"
    if "$PIP" install --quiet --no-deps --require-hashes -r "$uv_req"; then uv=.venv/bin/uv
    elif command -v uv >/dev/null; then uv=$(command -v uv); say "installing uv failed; using $uv"
    fi
    rm -f "$uv_req"
  fi
  [ -n "$uv" ] || say "no uv: installing with pip (same lock, slower)"
fi

if [ -n "$uv" ]; then
  say "$lock with $("$uv" --version)"
  # --compile-bytecode: pip writes every module's .pyc at install, uv does not by default. Where
  # PYTHONDONTWRITEBYTECODE=1 is set (this project's CI and dev machines), Python then never writes
  # them either, and every stage process and test subprocess compiled torch, transformers, GX...
  # from source again: the demo's stages took ~2x as long (25 min 7 s against 16 min 59 s).
  uv_sources_from_pip
  # torch's CPU build: from pip's own sources where they offer it (a local mirror), else PyTorch's CPU index.
  if ! echo "torch==$torch_cpu" | "$uv" pip compile - --quiet --no-deps --no-header --python-version 3.11 \
      --python-platform x86_64-manylinux_2_28 "${UV_SOURCES[@]}" >/dev/null 2>&1; then
    UV_SOURCES+=(--extra-index-url "$TORCH_CPU_INDEX")
  fi
  "$uv" pip install --quiet --compile-bytecode --python .venv/bin/python --require-hashes --no-deps -r "$lock" "${UV_SOURCES[@]}"
  "$uv" pip install --quiet --python .venv/bin/python --no-deps -e . "${UV_SOURCES[@]}"
else
  say "$lock with pip"
  torch_src=()
  "$PIP" install --quiet --dry-run --no-deps --ignore-installed "torch==$torch_cpu" >/dev/null 2>&1 \
    || torch_src=(--extra-index-url "$TORCH_CPU_INDEX")
  "$PIP" install --quiet --require-hashes --no-deps -r "$lock" "${torch_src[@]}"
  "$PIP" install --quiet --no-deps -e .
fi
