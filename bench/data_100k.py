"""validate + format on 100,000 rows, as DVC runs them (one `phiops stage` process each).

In one run, on the same rows:
  1. `phiops stage validate` then `phiops stage format` on N rows (default 100,000): wall time,
     rows/s and peak RSS of each process (the issue's bound: both together <= 60 s);
  2. the baseline: the foundation's formatting, one row at a time through
     `apply_chat_template(tokenize=True)` (prompt and conversation), on the same validated rows;
  3. streaming: `phiops stage validate` on 4x the rows: peak RSS should stay near the 1x figure
     (memory is bounded by `validate.chunk_rows`, not by the file).

Usage:  python bench/data_100k.py [--rows 100000] [--out bench/results/data_100k_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PHIOPS = str(Path(sys.executable).with_name("phiops"))


def _project(root: Path, rows: int) -> Path:
    from phiops import datagen

    (root / "data/raw").mkdir(parents=True)
    datagen.write(root / "data/raw/rows.jsonl", n=rows, seed=11)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["raw"] = "data/raw/rows.jsonl"
    # The generator's vocabulary is small: at 100k rows some tickets differ only in case. Keep them
    # out (quarantined, counted) rather than fail the run on them.
    params["validate"].update(on_invalid="quarantine", max_invalid_fraction=0.05)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _stage(root: Path, name: str) -> dict:
    """Run one stage as its own process; wall time and that process's peak RSS."""
    t = time.perf_counter()
    proc = subprocess.Popen([PHIOPS, "--root", str(root), "--params", str(root / "params.yaml"), "stage", name],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stage {name} failed:\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def _baseline(root: Path) -> dict:
    """The foundation's format: per row, tokenize the prompt and the conversation via the template."""
    from phiops import models
    from phiops.io import read_jsonl

    t = time.perf_counter()
    tok = models.load_tokenizer(models.resolve("builtin:smollm2-135m-instruct"))
    n = 0
    for row in read_jsonl(root / "data/validated/rows.jsonl"):
        msgs = row["messages"]
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=True, return_dict=True, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)
        assert full["input_ids"][: len(prompt["input_ids"])] == prompt["input_ids"]
        n += 1
    return {"wall_s": round(time.perf_counter() - t, 2), "rows": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--scale", type=int, default=4, help="the streaming check validates rows x scale")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/data_100k_cpu.json")
    args = ap.parse_args()
    from phiops.models import ensure_builtin

    ensure_builtin()  # a one-time download/convert must not count
    tmp = Path(tempfile.mkdtemp(prefix="phiops-bench-data-"))
    try:
        proj = _project(tmp / "p1", args.rows)
        validate = _stage(proj, "validate")
        fmt = _stage(proj, "format")
        vrep = json.loads((proj / "reports/validate.json").read_text())
        frep = json.loads((proj / "reports/format.json").read_text())
        base = _baseline(proj)
        big = _project(tmp / "p4", args.rows * args.scale)
        validate_big = _stage(big, "validate")
        brep = json.loads((big / "reports/validate.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    total = validate["wall_s"] + fmt["wall_s"]
    result = {
        "benchmark": "validate + format, 100k rows",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "versions": {p: version(p) for p in ("great-expectations", "transformers", "tokenizers", "pandas")},
        "rows": args.rows,
        "validate": {**validate, "rows_in": vrep["rows_in"], "accepted": vrep["accepted"],
                     "rejected_by_rule": vrep["rejected_by_rule"], "timings": vrep["timings"],
                     "rows_per_s": round(args.rows / validate["wall_s"], 1)},
        "format": {**fmt, "rows": frep["rows"], "train_rows": frep["train_rows"], "test_rows": frep["test_rows"],
                   "mean_tokens": frep["tokens"]["mean"], "rows_per_s": round(frep["rows"] / fmt["wall_s"], 1)},
        "validate_plus_format_s": round(total, 2),
        "rows_per_s": round(args.rows / total, 1),
        "goal_s": 60,
        "baseline_format_one_row_at_a_time": base,
        "format_speedup_vs_baseline": round(base["wall_s"] / fmt["wall_s"], 2),
        "streaming": {"rows": brep["rows_in"], "validate": validate_big, "chunks": brep["gx"]["chunks"],
                      "peak_rss_ratio_vs_1x": round(validate_big["peak_rss_mb"] / validate["peak_rss_mb"], 2)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
