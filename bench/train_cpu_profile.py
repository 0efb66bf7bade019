"""Where a CPU training step of the embedded default goes: torch.profiler over a few steps of the train stage.

    python bench/train_cpu_profile.py --data /tmp/fc-demo/data/processed --out bench/results/train_cpu_profile_native.txt
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python bench/train_cpu_profile.py --data /tmp/fc-demo/data/processed --out bench/results/train_cpu_profile_avx2.txt

The train stage itself (`train.run`: params.yaml's train section, SmolLM2-135M-Instruct, LoRA r16
fp32 on CPU, batch 8) on the formatted demo data, for `--warm` + `--steps` steps; the profiler is
on for the last `--steps` (optimizer, data loading and callbacks included). The three environment
variables are "emulated AVX2": PyTorch's own kernels, oneDNN and MKL limited to AVX2, an
approximation of a 2-core AVX2-only machine (not that machine: caches, clocks and memory differ).
The table (self CPU time, top ops) and the per-step wall times go to `--out`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import machine, versions

from phiops import config
from phiops.paths import Layout

ROOT = Path(__file__).resolve().parents[1]
EMULATION_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def emulation() -> str:
    """`native` or the ISA-limiting variables that are set (what "emulated AVX2" means here)."""
    set_ = {k: os.environ[k] for k in EMULATION_VARS if k in os.environ}
    return "native" if not set_ else "emulated AVX2: " + " ".join(f"{k}={v}" for k, v in set_.items())


def project(data: Path, where: Path) -> Layout:
    """A project folder holding a copy of the formatted splits (the demo's are read-only)."""
    layout = Layout(where)
    layout.processed.mkdir(parents=True, exist_ok=True)
    for split in ("train.jsonl", "test.jsonl"):
        shutil.copyfile(data / split, layout.processed / split)
    return layout


def main() -> None:
    import torch
    from transformers import TrainerCallback

    from phiops.stages import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/fc-demo/data/processed"))
    ap.add_argument("--warm", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=40, help="top ops in the table")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    base = config.load(ROOT / "params.yaml")
    cfg = config.parse({**base.model_dump(mode="json"),
                        "train": {**base.train.model_dump(mode="json"), "max_steps": a.warm + a.steps,
                                  "save_steps": 10_000, "logging_steps": 1}})
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    step_s: list[float] = []

    class _Profile(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == a.warm:
                prof.start()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s.append(time.perf_counter() - self.t)
            if state.global_step == a.warm + a.steps:
                prof.stop()

    with tempfile.TemporaryDirectory() as tmp:
        layout = project(a.data, Path(tmp))
        train.run(cfg, layout, callbacks=[_Profile()], live_metrics=False)

    prof_steps = step_s[a.warm:]
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=48)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15,
                                                                  max_name_column_width=40, max_shapes_column_width=70)
    head = (f"# train stage CPU profile: {emulation()}\n# machine {machine()}\n# versions "
            f"{versions(('torch', 'transformers', 'trl', 'peft'))}\n# torch threads {torch.get_num_threads()}, "
            f"cpu capability {torch.backends.cpu.get_cpu_capability()}\n# step wall seconds (warm first): "
            f"{[round(s, 3) for s in step_s]}; profiled {len(prof_steps)} steps, mean "
            f"{sum(prof_steps) / max(len(prof_steps), 1):.3f} s (profiler on)\n\n")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(head + table + "\n\n# by input shape\n" + by_shape + "\n")
    print(head + table)


if __name__ == "__main__":
    main()
