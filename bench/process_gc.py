"""Start-up and exit of a stage process: CPython's default GC vs `phiops.procs.lean_gc` (what `phiops` runs with).

Run:  /work/main/.venv/bin/python bench/process_gc.py --rounds 6 --out bench/results/process_gc_cpu.json

Each `phiops stage` process imports the ML stack (torch, transformers, peft, TRL) before its first
line of work, and exits when done. This times exactly that, from a fresh interpreter each time:
`python -c "<imports>"` with the default thresholds, and with `lean_gc()` called first (as
`phiops.cli.main` does). The two sides alternate round by round, so the shared machine's load
falls on both alike; the ratio of medians is the figure. CPU seconds (user + system of the child)
are recorded too: on a loaded host they move less than the wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _common import machine, run_process, versions

STACK = "import torch, transformers, peft, trl\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
SIDES = {
    "default_gc": STACK,
    "lean_gc": "from phiops import procs\nprocs.lean_gc()\n" + STACK,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    for code in SIDES.values():  # untimed: page cache and .pyc warm for both
        run_process(code)
    runs: dict[str, dict[str, list[float]]] = {side: {"wall_s": [], "cpu_s": []} for side in SIDES}
    for r in range(args.rounds):
        order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
        for side in order:
            wall, cpu = run_process(SIDES[side])
            runs[side]["wall_s"].append(round(wall, 2))
            runs[side]["cpu_s"].append(round(cpu, 2))
        print(r, {s: runs[s]["wall_s"][-1] for s in SIDES}, flush=True)

    med = {s: {k: round(statistics.median(v), 2) for k, v in runs[s].items()} for s in SIDES}
    result = {
        "what": "a fresh interpreter importing torch, transformers, peft and TRL, then exiting",
        "machine": machine(),
        "versions": versions(("torch", "transformers", "peft", "trl")),
        "rounds": args.rounds,
        "runs": runs,
        "median": med,
        "speedup_wall": round(med["default_gc"]["wall_s"] / med["lean_gc"]["wall_s"], 2),
        "speedup_cpu": round(med["default_gc"]["cpu_s"] / med["lean_gc"]["cpu_s"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "speedup_wall", "speedup_cpu")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
