# Sourced by scripts/install.sh and scripts/lock.sh: where packages come from.
#
# uv reads no pip.conf, so the sources this machine's pip is configured with (PIP_* variables, then
# pip's config files) are handed to uv as flags; a local mirror that pip uses, uv uses too.
# torch's CPU build (torch==X+cpu) comes from those sources where they offer it, else from
# PyTorch's CPU index. Both indexes are searched best-match (pip's own rule); the lock's hashes
# decide which files are acceptable, so a second index cannot substitute a package.

# PyTorch's CPU index, or PHIOPS_TORCH_INDEX: a mirror of it (the locks' hashes still decide what installs).
TORCH_CPU_INDEX="${PHIOPS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

# pip's effective value of an option ("" if unset): its PIP_* variable wins over its config files, and a file's
# [install] section over its [global] one, as in pip itself. `pip config list` prints the files merged in pip's order
# (`pip config get` misses keys of some files). $1: the option's name, e.g. extra-index-url. Needs $PIP.
pip_setting() {
  local var="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  "$PIP" config list 2>/dev/null | "$(dirname "$PIP")/python" -c '
import ast, sys
found = dict(line.rstrip("\n").split("=", 1) for line in sys.stdin if "=" in line)
value = found.get("install." + sys.argv[1], found.get("global." + sys.argv[1]))
print(ast.literal_eval(value) if value else "")' "$1"
}

# Fills UV_SOURCES: uv's flags for pip's index-url, extra-index-url and find-links (each may list
# several, separated by spaces or newlines, as pip accepts them). Needs $PIP (a pip to ask).
uv_sources_from_pip() {
  UV_SOURCES=()
  local v
  v=$(pip_setting index-url); [ -n "$v" ] && UV_SOURCES+=(--index-url "$v")
  for v in $(pip_setting extra-index-url); do UV_SOURCES+=(--extra-index-url "$v"); done
  for v in $(pip_setting find-links); do UV_SOURCES+=(--find-links "$v"); done
  # pip picks the best version across all its indexes; uv's default stops at the first index that
  # has the package at all, which fails where a local mirror holds only some versions.
  UV_SOURCES+=(--index-strategy unsafe-best-match)
  return 0
}
