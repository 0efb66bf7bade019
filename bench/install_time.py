"""How long the README's install takes, uv vs pip, cold and warm, from one fresh clone in one run.

    python3.11 bench/install_time.py            # writes bench/results/install_time.json

Three installers, each for the demo's set (`pipeline`) and the tests' set (`pipeline,test`):
- uv: `scripts/install.sh` as the README's commands run it (uv from the lock, hash-checked);
- pip (lock): the same script with PHIOPS_INSTALLER=pip, its fallback where uv cannot be had (same lock);
- pip (resolve): the command the scripts ran before the lock, `pip install -e '.[EXTRAS]'` (cold only).
Cold: a new .venv and empty uv and pip caches (temporary dirs). Warm: a new .venv, the caches that cold run filled.
Only the standard library is needed, so any python3.11 runs it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import _cpu_isa, _cpu_model  # noqa: E402  (stdlib only; _common.machine imports torch)

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


def main() -> None:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    runs = []
    with tempfile.TemporaryDirectory(prefix="install_time.") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "--quiet", rev], cwd=clone, check=True)
        for extras in EXTRAS:
            cases = [("uv", f"bash scripts/install.sh {extras}", {}, True),
                     ("pip (lock)", f"bash scripts/install.sh {extras}", {"PHIOPS_INSTALLER": "pip"}, True),
                     ("pip (resolve)", OLD.format(extras=extras), {}, False)]
            for installer, cmd, extra_env, warm_too in cases:
                caches = Path(tempfile.mkdtemp(dir=tmp))
                env = {**os.environ, **extra_env, "UV_CACHE_DIR": str(caches / "uv"), "PIP_CACHE_DIR": str(caches / "pip")}
                row = {"installer": installer, "extras": extras, "command": cmd, "cold_s": run(clone, cmd, env)}
                if warm_too:
                    row["warm_s"] = run(clone, cmd, env)
                print(json.dumps(row), flush=True)
                runs.append(row)
                shutil.rmtree(caches)
    out = {"rev": rev, "machine": {"cpu": _cpu_model() or platform.machine(), "cpu_isa": _cpu_isa(),
                                   "cpus": os.cpu_count()},
           "python": platform.python_version(),
           "note": "torch's CPU wheel (190 MB) comes from this machine's disk (pip's find-links), every other file from PyPI",
           "runs": runs}
    dest = ROOT / "bench" / "results" / "install_time.json"
    dest.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
