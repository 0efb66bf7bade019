#!/usr/bin/env bash
# Refresh the install locks after changing a pin in pyproject.toml (needs .venv: bash scripts/install.sh pipeline):
#   bash scripts/lock.sh              # keeps every locked version that still fits the pins
#   bash scripts/lock.sh --upgrade    # re-resolves the unpinned ones too
# scripts/lock/pipeline-test.txt is what scripts/test.sh installs, scripts/lock/pipeline.txt what scripts/demo.sh installs (resolved
# within the first, so the two agree). Both: CPython 3.11 on Linux x86_64 (manylinux_2_28), torch's CPU build, every
# file with its sha256. Resolved on PyPI only, plus PyTorch's CPU index for torch (or a wheel of torch's CPU build
# that pip's find-links hold, where that index cannot be reached), so the files exist for anyone.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=.venv/bin/pip
UV="${UV:-.venv/bin/uv}"
. scripts/_sources.sh

torch_cpu="$(.venv/bin/python -c 'import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(re.fullmatch(r"torch==(\S+)", d).group(1) for d in deps if d.startswith("torch==")))')+cpu"

torch_src=(--extra-index-url "$TORCH_CPU_INDEX")
for dir in $(pip_setting find-links); do
  if compgen -G "${dir#file://}/torch-$torch_cpu-*.whl" >/dev/null; then torch_src=(--find-links "$dir"); break; fi
done

# torch's CPU build, as a constraint kept beside the locks (a stable path: the locks' "via" comments name it)
cons=scripts/lock/torch-cpu.in
echo "torch==$torch_cpu  # written by scripts/lock.sh from pyproject.toml's torch pin" > "$cons"
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --quiet
        --index-url https://pypi.org/simple "${torch_src[@]}" --index-strategy unsafe-best-match
        --custom-compile-command "bash scripts/lock.sh" -c "$cons" "$@")
"$UV" pip compile pyproject.toml --extra pipeline --extra test "${common[@]}" -o scripts/lock/pipeline-test.txt
"$UV" pip compile pyproject.toml --extra pipeline -c scripts/lock/pipeline-test.txt "${common[@]}" -o scripts/lock/pipeline.txt
echo "locked with torch $torch_cpu from ${torch_src[*]}: scripts/lock/pipeline.txt, scripts/lock/pipeline-test.txt"
