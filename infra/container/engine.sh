#!/usr/bin/env bash
# The Docker engine that builds and runs phiops images on a Debian machine (as root):
#
#   infra/container/engine.sh install   # Debian's docker.io and mmdebstrap (skipped when present)
#   infra/container/engine.sh start     # dockerd without its bridge network; reuses a running engine
#   infra/container/engine.sh status
#
# No bridge network, no iptables rules: these machines only reach package registries, and a
# bridge would give containers addresses of their own. Builds and containers use the host's
# network instead (`--network host`), so all their traffic stays on this machine's loopback.
# The daemon's log: $PHIOPS_DOCKERD_LOG (default /var/log/phiops-dockerd.log).
set -euo pipefail

log="${PHIOPS_DOCKERD_LOG:-/var/log/phiops-dockerd.log}"

answers() { docker info >/dev/null 2>&1; }

case "${1:-}" in
  install)
    missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    if [ ${#missing[@]} -gt 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
      echo "installed: ${missing[*]}"
    else
      echo "docker.io and mmdebstrap already installed"
    fi
    ;;
  start)
    if answers; then
      echo "Docker engine already running: reusing it"
      exit 0
    fi
    command -v dockerd >/dev/null || { echo "no dockerd: $0 install" >&2; exit 3; }
    mkdir -p "$(dirname "$log")"
    # setsid: the daemon outlives the shell that started it (CI's script, a terminal).
    setsid dockerd --bridge=none --iptables=false --ip6tables=false >>"$log" 2>&1 < /dev/null &
    for _ in $(seq 1 60); do
      if answers; then
        echo "Docker engine started (log: $log)"
        exit 0
      fi
      sleep 1
    done
    echo "dockerd did not answer within 60 s; its log ($log) ends:" >&2
    tail -20 "$log" >&2
    exit 1
    ;;
  status)
    if answers; then docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'; else echo "no engine answers"; exit 1; fi
    ;;
  *)
    sed -n '2,6p' "$0" >&2
    exit 2
    ;;
esac
