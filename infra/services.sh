#!/usr/bin/env bash
# The real services for scheduled retraining: a Prefect server, a process work pool, the
# `retrain` deployment of prefect.yaml (cron schedule) and a worker that runs its flow runs.
#
#   infra/services.sh start     # server + work pool + deployment + worker, in the background
#   infra/services.sh status    # what runs, the deployment's schedule, runs waiting for approval
#   infra/services.sh stop      # worker, then server
#   eval "$(infra/services.sh env)"   # this shell talks to that server (phiops approve, prefect ...)
#
# State (SQLite database, logs, pids, persisted flow results) lives in $PHIOPS_SERVICES_DIR
# (default .services/ in the project, git-ignored); nothing goes to ~/.prefect.
# Settings: PHIOPS_PREFECT_PORT (4200), PHIOPS_WORK_POOL (phiops-process), and, to require
# authentication, PREFECT_SERVER_API_AUTH_STRING="user:password" (the worker and this script's
# clients then send it as PREFECT_API_AUTH_STRING; so must `phiops approve`).
set -euo pipefail
# Job control: each background service gets its own process group (pgid = its pid), so `stop`
# ends it with everything it started, and nothing of it holds this script's stdout.
set -m

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${PHIOPS_SERVICES_DIR:-$ROOT/.services}"
PORT="${PHIOPS_PREFECT_PORT:-4200}"
POOL="${PHIOPS_WORK_POOL:-phiops-process}"
# The project's interpreter: the venv beside it, else whatever python runs phiops here.
PY="${PHIOPS_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
BIN="$(dirname "$PY")"

export PHIOPS_ROOT="$ROOT" PHIOPS_WORK_POOL="$POOL"
export PREFECT_HOME="$STATE/prefect" PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT="$PORT"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# Suspended runs are resumed by running them again: finished tasks' results must be on disk.
export PREFECT_LOCAL_STORAGE_PATH="$STATE/results" PREFECT_RESULTS_PERSIST_BY_DEFAULT=true
# A worker picks up new runs within this many seconds (Prefect's default is 10).
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-5}"
if [ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" ]; then
  export PREFECT_API_AUTH_STRING="$PREFECT_SERVER_API_AUTH_STRING"
fi
export PATH="$BIN:$PATH"

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

stop_one() {  # the process group this script started, politely then for good
  local name="$1" pid
  running "$name" || { rm -f "$STATE/$name.pid"; return 0; }
  pid="$(cat "$STATE/$name.pid")"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$STATE/$name.pid"
  echo "stopped $name ($pid)"
}

wait_api() {
  for _ in $(seq 1 240); do
    if "$PY" - <<'PY' 2>/dev/null; then return 0; fi
from prefect import get_client
with get_client(sync_client=True) as c:
    c.hello().raise_for_status()
    c.read_work_pools()  # an authenticated endpoint: the auth string works too
PY
    running server || { echo "prefect server exited; see $STATE/server.log" >&2; tail -20 "$STATE/server.log" >&2; return 1; }
    sleep 0.5
  done
  echo "prefect server not answering on $PREFECT_API_URL after 120 s; see $STATE/server.log" >&2
  return 1
}

wait_worker() {  # until the worker has announced itself to the pool (it then polls it)
  for _ in $(seq 1 240); do
    if "$PY" - <<'PY' 2>/dev/null; then return 0; fi
import os, sys
from prefect import get_client
with get_client(sync_client=True) as c:
    sys.exit(0 if c.read_workers_for_work_pool(os.environ["PHIOPS_WORK_POOL"]) else 1)
PY
    running worker || { echo "worker exited; see $STATE/worker.log" >&2; tail -20 "$STATE/worker.log" >&2; return 1; }
    sleep 0.5
  done
  echo "worker did not reach pool $POOL after 120 s; see $STATE/worker.log" >&2
  return 1
}

start() {
  mkdir -p "$STATE" "$PREFECT_HOME"
  if running server; then
    echo "server already running ($(cat "$STATE/server.pid"))"
  else
    "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$STATE/server.log" 2>&1 </dev/null &
    echo $! >"$STATE/server.pid"
  fi
  wait_api
  echo "prefect server: $PREFECT_API_URL (UI: http://127.0.0.1:$PORT)"
  # Idempotent: creating an existing pool is an error we do not care about.
  "$BIN/prefect" --no-prompt work-pool create "$POOL" --type process >/dev/null 2>&1 || true
  (cd "$ROOT" && "$BIN/prefect" --no-prompt deploy --all --prefect-file "$ROOT/prefect.yaml" >"$STATE/deploy.log" 2>&1) \
    || { echo "prefect deploy failed:" >&2; tail -30 "$STATE/deploy.log" >&2; return 1; }
  echo "deployment: retrain/scheduled on work pool $POOL (schedule: prefect.yaml)"
  if running worker; then
    echo "worker already running ($(cat "$STATE/worker.pid"))"
  else
    cd "$ROOT"
    "$BIN/prefect" worker start --pool "$POOL" --type process --name "phiops-worker-$(hostname)" \
      >"$STATE/worker.log" 2>&1 </dev/null &
    echo $! >"$STATE/worker.pid"
  fi
  wait_worker
  echo "worker: pid $(cat "$STATE/worker.pid") polling $POOL, log $STATE/worker.log"
}

status() {
  for s in server worker; do
    if running "$s"; then echo "$s: running ($(cat "$STATE/$s.pid"))"; else echo "$s: stopped"; fi
  done
  running server || return 0
  "$BIN/prefect" deployment inspect retrain/scheduled 2>/dev/null | grep -E "'(cron|timezone|active|limit|collision_strategy)'" || true
  (cd "$ROOT" && "$PY" -m phiops.cli approvals) || true
}

case "${1:-}" in
  start) start ;;
  stop) stop_one worker; stop_one server ;;
  status) status ;;
  env)
    for v in PREFECT_HOME PREFECT_API_URL PREFECT_SERVER_ANALYTICS_ENABLED PREFECT_LOCAL_STORAGE_PATH; do
      printf 'export %s=%q\n' "$v" "${!v}"
    done
    [ -n "${PREFECT_API_AUTH_STRING:-}" ] && printf 'export PREFECT_API_AUTH_STRING=%q\n' "$PREFECT_API_AUTH_STRING"
    true ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
