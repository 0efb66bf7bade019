#!/usr/bin/env bash
# Set up a venv and pass the tests: unit, integration (tiny random models) and e2e.
set -euo pipefail
cd "$(dirname "$0")/.."
python3.11 -m venv .venv
.venv/bin/pip install --quiet -e '.[pipeline,test]'
.venv/bin/python -m pytest -ra "$@"
