#!/usr/bin/env bash
# Set up a venv and run the whole chain on the embedded default model, then ask the served model.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# .venv from the lock (scripts/lock/pipeline.txt), with uv where it can, else pip: README, Install.
bash scripts/install.sh pipeline
# The model was tuned on "instruction + ticket" prompts, so the demo asks the same way.
ticket="${1:-Hi, my Nimbus router keeps dropping the connection every hour and our whole office is offline. Please fix this asap!}"
.venv/bin/phiops run --ask "Classify the support ticket. Answer with JSON: category, priority, product.

$ticket"
