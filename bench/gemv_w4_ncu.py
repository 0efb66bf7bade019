r"""What limits the W4A16 GEMV, read from the hardware counters: Nsight Compute on each kernel once.

    ncu --clock-control none --csv --page details -k regex:gemv_w4 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" --log-file bench/results/gemv_w4_ncu_h200.csv python bench/gemv_w4_ncu.py
    python bench/gemv_w4_ncu.py --summarize bench/results/gemv_w4_ncu_h200.csv --out bench/results/gemv_w4_ncu_h200.json

Phi-3-mini's four stages (group 128, symmetric), each launched once per variant with the data cold
in L2 (ncu flushes the caches before each replay): the tiles (``_gemv_w4_kernel``) at the config the
bench's sweep found fastest in a graph, the same config ``dry`` (its weight loads without the
arithmetic), and the streamed kernel (``_gemv_w4_stream_kernel``) at its fastest. Launched one at
a time, not in a graph: ncu times each kernel alone (no PDL overlap), so compare the variants with
each other, not with the graph timings of ``decode_kernels.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

STAGES = {  # name: (weight rows, K, norm, gated, residual, tiles config, streamed config)
    "qkv": (9216, 3072, True, False, False, (8, 512, 4), (2, 512, 2, 8, 3)),
    "o": (3072, 3072, False, False, True, (8, 512, 4), (2, 512, 2, 4, 5)),
    "gate_up": (16384, 3072, True, True, False, (4, 128, 1), (2, 512, 2, 4, 3)),
    "down": (3072, 8192, False, False, True, (8, 512, 4), (4, 1024, 4, 2, 3)),
}
METRICS = {  # ncu "Metric Name" -> key in the summary
    "Duration": "duration_us", "DRAM Throughput": "dram_pct", "Compute (SM) Throughput": "sm_pct",
    "Memory Throughput": "memory_pct", "Achieved Occupancy": "occupancy_pct", "Registers Per Thread": "registers",
    "Issue Slots Busy": "issue_busy_pct", "No Eligible": "no_eligible_pct", "Active Warps Per Scheduler": "warps_per_scheduler",
    "Warp Cycles Per Issued Instruction": "cycles_per_issue", "L2 Hit Rate": "l2_hit_pct", "Mem Busy": "mem_busy_pct",
    "Max Bandwidth": "max_bandwidth_pct",
}


def launch() -> None:
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from phiops.serve import kernels as K

    dev, bf, group = "cuda", torch.bfloat16, 128
    for name, (rows, k, norm, gated, residual, tiles, streamed) in STAGES.items():
        q = torch.randint(-8, 8, (rows, k), device=dev, dtype=torch.int8)
        scale = (torch.rand(rows, k // group, device=dev) * 0.01 + 0.001).to(bf)
        w4 = (K.interleave_w4(pack_to_int32(q, 4).contiguous(), k, group), scale, None)
        a = torch.randn(k, device=dev, dtype=bf if norm else torch.float32)
        g = torch.rand(k, device=dev, dtype=bf) + 0.5
        n = rows // 2 if gated else rows
        out = torch.randn(n, device=dev, dtype=bf)
        for variant, config, dry in (("tiles", tiles, False), ("dry", tiles, True), ("streamed", streamed, False)):
            print(name, variant, config, flush=True)  # ncu's log lists the launches in this order
            K.gemv_w4(*w4, group, a, out, norm=g if norm else None, eps=1e-5, gated=gated,
                      residual=out if residual else None, config=config, dry=dry)
        torch.cuda.synchronize()


def summarize(path: Path) -> list[dict[str, Any]]:
    """ncu's CSV (one row a metric a launch) as one record a launch, in launch order."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    launches: dict[str, dict[str, Any]] = {}
    for row in csv.DictReader(lines[start:]):
        rec = launches.setdefault(row["ID"], {"kernel": row["Kernel Name"].split("(")[0]})
        key = METRICS.get(row["Metric Name"])
        if key and key not in rec:
            value = row["Metric Value"].replace(",", "")
            unit = row.get("Metric Unit", "")
            try:
                number = float(value)
            except ValueError:
                continue
            rec[key] = round(number / 1000, 3) if key == "duration_us" and unit == "ns" else number
        if row["Metric Name"].startswith("smsp__average_warps_issue_stalled_"):  # warps stalled per issue, by reason
            reason = row["Metric Name"].removeprefix("smsp__average_warps_issue_stalled_").split("_per_issue")[0]
            rec.setdefault("stalls", {})[reason] = float(row["Metric Value"].replace(",", "") or 0)
    names = [(s, v) for s in STAGES for v in ("tiles", "dry", "streamed")]
    out = []
    for (stage, variant), rec in zip(names, launches.values()):
        out.append({"stage": stage, "variant": variant, **rec})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--summarize", type=Path, help="ncu's CSV log to turn into --out")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not args.summarize:
        launch()
        return 0
    import subprocess

    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip()
    rows = summarize(args.summarize)
    args.out.write_text(json.dumps({"bench": "gemv_w4_ncu", "gpu": gpu, "source": str(args.summarize),
                                    "command": " ".join(["python", "bench/gemv_w4_ncu.py", *(argv or sys.argv[1:])]),
                                    "launches": rows}, indent=2) + "\n")
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "stalls"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
