"""The embedded default's CPU training step, old vs new: seconds per step and the loss each reaches.

    python bench/train_cpu_step.py --old f92e448 --steps 10 --rounds 2 --out bench/results/train_cpu_step.json
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python bench/train_cpu_step.py --old f92e448 --out bench/results/train_cpu_step_avx2.json   # "emulated AVX2"

Each arm is the train stage itself (`train.run`) in its own process, from its own tree: `old` from a
detached `git worktree` of `--old` (its `src/` first on PYTHONPATH), `new` from this checkout. Both
get params.yaml's train section (SmolLM2-135M-Instruct, LoRA r16 fp32 on CPU, batch 8, lr 1e-3,
checkpoints every 10 steps) with `max_steps` = `--steps` (the schedule is constant after warmup, so
the first N steps are the full run's first N), on a copy of the demo's formatted data: the same
rows in the same order, the same seed. The arms alternate (old, new, new, old, ...) so that the
machine's load, shared with other users, falls on both. Step time is the mean of steps 2..N
(step begin to step end: forward, backward, optimizer; checkpoint writes and the final eval
apart); the loss figures come from the stage's report (`final_train_loss`: the last logging
window; `eval_loss`: 64 test rows after training).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from _common import machine, versions  # noqa: E402
from train_cpu_profile import EMULATION_VARS, emulation, project  # noqa: E402


def arm(data: Path, steps: int, out: Path) -> None:
    """One training run of whatever `phiops` is first on the path; writes its figures to `out`."""
    from transformers import TrainerCallback

    from phiops import config
    from phiops.stages import train

    import phiops

    base = config.load(Path(phiops.__file__).parents[2] / "params.yaml")  # each tree's own params
    cfg = config.parse({**base.model_dump(mode="json"),
                        "train": {**base.train.model_dump(mode="json"), "max_steps": steps}})
    step_s: list[float] = []
    losses: dict[int, float] = {}

    class _Time(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    with tempfile.TemporaryDirectory() as tmp:
        layout = project(data, Path(tmp))
        t0 = time.perf_counter()
        train.run(cfg, layout, callbacks=[_Time()])
        wall = time.perf_counter() - t0
        report = json.loads(layout.train_report.read_text())
    import torch

    out.write_text(json.dumps({
        "phiops": str(Path(phiops.__file__).parents[1]), "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "step_s": [round(s, 3) for s in step_s],
        "seconds_per_step": round(statistics.mean(step_s[1:] or step_s), 3), "loss_by_step": losses,
        "stage_wall_s": round(wall, 1), "report": report}))


def _worktree(rev: str, where: Path) -> tuple[str, Path]:
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = where / sha
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), sha], cwd=ROOT, check=True)
    return sha, path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="f92e448", help="the revision to compare against")
    ap.add_argument("--data", type=Path, default=Path("/tmp/fc-demo/data/processed"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/train_cpu_step.json")
    ap.add_argument("--arm", type=Path, help=argparse.SUPPRESS)  # internal: run one arm, write here
    ap.add_argument("--collect", type=Path, help="summarize the arms already written in this folder "
                    "(old0.json, new0.json, ...) of a run stopped early")
    a = ap.parse_args()
    if a.arm:
        return arm(a.data, a.steps, a.arm)

    new_sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip())
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    order = [("old", "new") if r % 2 == 0 else ("new", "old") for r in range(a.rounds)]
    if a.collect:
        for r, pair in enumerate(order):
            for name in pair:
                if (a.collect / f"{name}{r}.json").exists():
                    runs[name].append(json.loads((a.collect / f"{name}{r}.json").read_text()))
        n = min(len(runs["old"]), len(runs["new"]))
        runs = {k: v[:n] for k, v in runs.items()}  # complete pairs only
        order = order[:n]
        return _write(a, runs, order, a.old, new_sha + ("+dirty" if dirty else ""))
    with tempfile.TemporaryDirectory() as tmp:
        old_sha, old_tree = _worktree(a.old, Path(tmp))
        try:
            trees = {"old": old_tree, "new": ROOT}
            for r, pair in enumerate(order):
                for name in pair:
                    res = Path(tmp) / f"{name}{r}.json"
                    env = {**os.environ, "PYTHONPATH": f"{trees[name] / 'src'}{os.pathsep}{ROOT / 'bench'}"}
                    t = time.time()
                    subprocess.run([sys.executable, str(ROOT / "bench/train_cpu_step.py"), "--data", str(a.data),
                                    "--steps", str(a.steps), "--arm", str(res)], env=env, check=True)
                    runs[name].append(json.loads(res.read_text()))
                    print(f"round {r} {name}: {runs[name][-1]['seconds_per_step']} s/step, "
                          f"{time.time() - t:.0f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT)
    _write(a, runs, order, old_sha, new_sha + ("+dirty" if dirty else ""))


def _write(a: argparse.Namespace, runs: dict[str, list[dict]], order: list, old_sha: str, new_sha: str) -> None:
    """The summary of both arms (means over rounds, ratios, loss differences of the first pair) as JSON."""

    def summary(name: str) -> dict:
        rs = runs[name]
        return {"seconds_per_step_by_round": [x["seconds_per_step"] for x in rs],
                "seconds_per_step": round(statistics.mean(x["seconds_per_step"] for x in rs), 3),
                "final_train_loss": [x["report"]["final_train_loss"] for x in rs],
                "eval_loss": [x["report"]["eval_loss"] for x in rs],
                "train_loss_mean": [x["report"]["train_loss"] for x in rs]}

    old, new = summary("old"), summary("new")
    per_round = [o["seconds_per_step"] / n["seconds_per_step"] for o, n in zip(runs["old"], runs["new"])]

    def rel(key: str) -> float:
        return round((new[key][0] - old[key][0]) / old[key][0], 4)

    result = {
        "machine": machine(), "emulation": emulation(),
        "emulation_vars": {k: os.environ.get(k) for k in EMULATION_VARS},
        "versions": versions(("torch", "transformers", "trl", "peft", "accelerate")),
        "load_average_at_end": os.getloadavg(),
        "setup": {"steps": a.steps, "rounds": a.rounds, "data": str(a.data), "params": "params.yaml train section",
                  "old": old_sha, "new": new_sha, "rounds_completed": len(order),
                  "order": [list(p) for p in order]},
        "old": old, "new": new,
        "speedup_seconds_per_step": round(old["seconds_per_step"] / new["seconds_per_step"], 3),
        "speedup_by_round": [round(x, 3) for x in per_round],
        "final_train_loss_rel_diff": rel("final_train_loss"),
        "eval_loss_rel_diff": rel("eval_loss"),
        "loss_by_step": {"old": runs["old"][0]["loss_by_step"], "new": runs["new"][0]["loss_by_step"]},
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup_seconds_per_step", "speedup_by_round", "final_train_loss_rel_diff",
                                             "eval_loss_rel_diff")}), json.dumps(old), json.dumps(new), sep="\n")


if __name__ == "__main__":
    main()
