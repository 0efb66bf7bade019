"""How long the README's install takes, uv vs pip, cold and warm, from one fresh clone in one run.

    python3.11 bench/install_time.py                          # both sets, uv and pip on the lock
    python3.11 bench/install_time.py --extras pipeline,test --resolve   # one set, and the old pip resolve too

Rows are added to bench/results/install_time.json, each with the commit, its start time and the load average (other
jobs share the CPU: compare rows of one run).

Three installers, each for the demo's set (`pipeline`) and the tests' set (`pipeline,test`):
- uv: `scripts/install.sh` as the README's commands run it (uv from the lock, hash-checked);
- pip (lock): the same script with PHIOPS_INSTALLER=pip, its fallback where uv cannot be had (same lock);
- pip (resolve), with --resolve: the command the scripts ran before the lock, `pip install -e '.[EXTRAS]'` (cold only).
Cold: a new .venv and empty uv and pip caches (temporary dirs). Warm: a new .venv, the caches that cold run filled.
Only the standard library is needed, so any python3.11 runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from _common import _cpu_isa, _cpu_model  # noqa: E402  (stdlib only; _common.machine imports torch)

DEST = ROOT / "bench" / "results" / "install_time.json"
EXTRAS = ("pipeline", "pipeline,test")
OLD = "python3.11 -m venv .venv && .venv/bin/pip install --quiet -e '.[{extras}]'"


def run(clone: Path, cmd: str, env: dict[str, str]) -> float:
    """Seconds `cmd` takes in a clone without .venv (its old build files removed too).

    Raises:
        subprocess.CalledProcessError: the install failed (its output is shown).
    """
    for p in (clone / ".venv", clone / "build", *clone.glob("src/*.egg-info")):
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.monotonic()
    subprocess.run(["bash", "-c", cmd], cwd=clone, env=env, check=True)
    return round(time.monotonic() - t0, 1)


def save(runs: list[dict]) -> None:
    """Add `runs` to the rows already in results/install_time.json (written to a temporary file, then renamed)."""
    old = json.loads(DEST.read_text())["runs"] if DEST.exists() else []
    old = [r for r in old if r not in runs]
    out = {"machine": {"cpu": _cpu_model() or platform.machine(), "cpu_isa": _cpu_isa(), "cpus": os.cpu_count()},
           "python": platform.python_version(),
           "note": "torch's CPU wheel (190 MB) comes from this machine's disk (pip's find-links), every other file "
                   "from PyPI; load_avg_1m: other jobs shared the 2 CPUs",
           "runs": old + runs}
    tmp = DEST.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    tmp.replace(DEST)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extras", action="append", choices=EXTRAS, help="a set to time (repeatable; default both)")
    ap.add_argument("--resolve", action="store_true", help="also time the old `pip install -e '.[EXTRAS]'`, cold")
    args = ap.parse_args()
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="install_time.") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "--quiet", rev], cwd=clone, check=True)
        for extras in args.extras or EXTRAS:
            cases = [("uv", f"bash scripts/install.sh {extras}", {}, True),
                     ("pip (lock)", f"bash scripts/install.sh {extras}", {"PHIOPS_INSTALLER": "pip"}, True)]
            if args.resolve:
                cases.append(("pip (resolve)", OLD.format(extras=extras), {}, False))
            for installer, cmd, extra_env, warm_too in cases:
                caches = Path(tempfile.mkdtemp(dir=tmp))
                env = {**os.environ, **extra_env, "UV_CACHE_DIR": str(caches / "uv"), "PIP_CACHE_DIR": str(caches / "pip")}
                row = {"rev": rev[:7], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "load_avg_1m": os.getloadavg()[0], "installer": installer, "extras": extras, "command": cmd,
                       "cold_s": run(clone, cmd, env)}
                if warm_too:
                    row["warm_s"] = run(clone, cmd, env)
                print(json.dumps(row), flush=True)
                runs.append(row)
                save(runs)  # after every row: a run stopped part way keeps what it measured
                shutil.rmtree(caches)


if __name__ == "__main__":
    main()
