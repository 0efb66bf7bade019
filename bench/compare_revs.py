"""Two git revisions side by side on the CPU benchmarks: does a refactor change the figures?

For each benchmark, each revision runs it from its own worktree (a detached ``git worktree`` in a
temporary folder, its ``src/`` first on ``PYTHONPATH``, this venv's packages), one after the
other in the same run, then the key figures are put side by side with head/base ratios:

- ``bench/data_100k.py``: validate + format on 100,000 rows, as DVC runs them;
- ``bench/serve_cpu_load.py --rounds 2 --no-engines``: the built bento under load against the
  one-at-a-time loop (its own ratio is the figure to compare; absolute req/s moves with load).

Usage:  python bench/compare_revs.py --base d3aea2f --head HEAD --out bench/results/compare_revs_issue14.json
(about 15 minutes on the 2-core machine)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# (name, argv after the script, figures to compare: dotted paths into its JSON result)
BENCHES = (
    ("data_100k", ["bench/data_100k.py"],
     ["validate.wall_s", "validate.peak_rss_mb", "format.wall_s", "format.peak_rss_mb", "validate_plus_format_s",
      "format_speedup_vs_baseline", "streaming.peak_rss_ratio_vs_1x"]),
    ("serve_cpu_load", ["bench/serve_cpu_load.py", "--rounds", "2", "--no-engines"],
     ["summary.ratio_requests_per_s", "summary.ratio_output_tokens_per_s", "summary.service_requests_per_s",
      "summary.baseline_requests_per_s", "summary.service_latency_p50_s", "summary.service_latency_p99_s",
      "summary.service_errors", "summary.server_rss_before_bytes", "summary.server_rss_growth_fraction"]),
)


def _get(data: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _worktree(rev: str, where: Path) -> tuple[str, Path]:
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = where / sha
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), sha], cwd=ROOT, check=True,
                   capture_output=True)
    return sha, path


def _run(tree: Path, argv: list[str], out: Path) -> tuple[dict[str, Any], float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, *argv, "--out", str(out)], cwd=tree, env=env, capture_output=True,
                         text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{tree.name}: {' '.join(argv)} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return json.loads(out.read_text()), wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--head", default="HEAD")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", choices=[b[0] for b in BENCHES], action="append")
    ap.add_argument("--head-first", action="store_true",
                    help="run head before base (a second run in the other order cancels load drift)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="phiops-revs-"))
    trees = [_worktree(args.base, tmp), _worktree(args.head, tmp)]
    result: dict[str, Any] = {"benchmark": "bench/compare_revs.py", "command": " ".join(["python", *sys.argv]),
                              "cpu": _cpu(), "base": trees[0][0], "head": trees[1][0],
                              "order": "head, base" if args.head_first else "base, head", "loadavg_before": os.getloadavg(),
                              "benches": {}}
    try:
        for name, argv, figures in BENCHES:
            if args.only and name not in args.only:
                continue
            runs = {}
            order = list(zip(("base", "head"), trees))
            for label, (sha, tree) in (order[::-1] if args.head_first else order):
                data, wall = _run(tree, argv, tmp / f"{name}_{sha}.json")
                runs[label] = {"rev": sha, "wall_s": round(wall, 1), "figures": {f: _get(data, f) for f in figures}}
                print(f"{name} @ {sha}: {runs[label]['figures']}", flush=True)
            ratios = {}
            for f in figures:
                b, h = runs["base"]["figures"][f], runs["head"]["figures"][f]
                ratios[f] = round(h / b, 3) if isinstance(b, (int, float)) and isinstance(h, (int, float)) and b else None
            result["benches"][name] = {**runs, "head_over_base": ratios}
    finally:
        for _, tree in trees:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    result["loadavg_after"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["benches"], indent=2))
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
