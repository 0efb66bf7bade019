#!/usr/bin/env bash
# Set up a venv and run the whole chain on the embedded default model, then ask the served model.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
python3.11 -m venv .venv
.venv/bin/pip install --quiet -e .
.venv/bin/phiops run --ask "${1:-Hi, my Nimbus router keeps dropping the connection every hour and our whole office is offline. Please fix this asap!}"
