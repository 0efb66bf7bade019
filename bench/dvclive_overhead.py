"""What logging live metrics to dvclive costs the train stage: step time with and without it.

    python bench/dvclive_overhead.py --out bench/results/dvclive_overhead_cpu.json

The embedded model (SmolLM2-135M-Instruct) and params.yaml's train settings (batch 8, LoRA r 16,
logging every 5 steps, a checkpoint every 10), on the ticket data as the validate and format
stages leave it, trained for `--steps` steps instead of the stage's 40 (a full run each way, 2 x
~7 min per round on 2 cores, would leave too few rounds): the train stage itself (`train.run`),
with `live_metrics` on and off, alternating (the order flips each round), in one process.

Two figures: the stage's own count of the seconds spent in the dvclive callback (`dvclive_s` in
reports/train.json: opening dvclive, every logged step, the final eval) as a share of the training
time, which is exact; and the mean step time of each arm, whose ratio includes the machine's
noise (the spread between runs of the same arm is reported beside it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine, versions

from phiops.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/dvclive_overhead_cpu.json")
    a = ap.parse_args()

    from phiops import config
    from phiops.paths import Layout
    from phiops.stages import format as format_stage
    from phiops.stages import train, validate

    base = config.load(ROOT / "params.yaml")
    cfg = config.parse({**base.dump(), "train": {**base.dump()["train"], "max_steps": a.steps, "device": "cpu"}})
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(Path(tmp))
        shutil.copytree(ROOT / "data/raw", layout.root / "data/raw")
        validate.run(cfg, layout)
        format_stage.run(cfg, layout)
        runs = []
        for r in range(a.rounds):
            for live_on in ((False, True) if r % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                train.run(cfg, layout, live_metrics=live_on)
                rep = json.loads(layout.train_report.read_text())
                runs.append({"round": r, "dvclive": live_on, "steps": rep["steps"], "train_runtime_s": rep["train_runtime_s"],
                             "step_s": round(rep["train_runtime_s"] / rep["steps"], 3), "dvclive_s": rep["dvclive_s"],
                             "stage_wall_s": round(time.perf_counter() - t0, 1)})
                print(json.dumps(runs[-1]), flush=True)

    def arm(on: bool) -> list[dict]:
        return [x for x in runs if x["dvclive"] is on]

    on, off = arm(True), arm(False)
    step_on, step_off = statistics.mean(x["step_s"] for x in on), statistics.mean(x["step_s"] for x in off)
    live_share = statistics.mean(x["dvclive_s"] / x["train_runtime_s"] for x in on)
    result = {
        "what": "train stage, embedded model, params.yaml's train settings for a fixed number of steps, "
                "dvclive on/off alternating in one process",
        "steps_per_run": a.steps, "logging_steps": cfg.train.logging_steps, "rounds": a.rounds,
        "batch_size": cfg.train.batch_size, "runs": runs,
        "step_s_with_dvclive": round(step_on, 3), "step_s_without": round(step_off, 3),
        "step_time_ratio": round(step_on / step_off, 4),
        "step_s_spread_without": [min(x["step_s"] for x in off), max(x["step_s"] for x in off)],
        "step_s_spread_with": [min(x["step_s"] for x in on), max(x["step_s"] for x in on)],
        "dvclive_s_per_run": round(statistics.mean(x["dvclive_s"] for x in on), 4),
        "dvclive_share_of_train_time": round(live_share, 6),
        "budget": 0.02,
        "machine": machine(), "versions": versions(("torch", "transformers", "trl", "peft", "dvclive", "dvc")),
    }
    write_json(a.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "versions")}, indent=2))


if __name__ == "__main__":
    main()
