#!/usr/bin/env bash
# Set up a venv and pass the tests: unit, integration (tiny random models) and e2e.
set -euo pipefail
cd "$(dirname "$0")/.."
# .venv from the lock (scripts/lock/pipeline-test.txt), with uv where it can, else pip: README, Install.
bash scripts/install.sh pipeline,test
# --durations: every run (CI included) lists its slowest tests, so a slower suite names its cause.
.venv/bin/python -m pytest -ra --durations=40 "$@"
