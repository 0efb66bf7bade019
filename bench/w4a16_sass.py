"""What the W4A16 GEMV costs in instructions, read from its sm_90a build: no GPU needed.

    python bench/w4a16_sass.py --out bench/results/w4a16_sass_sm90.json   # ~1 min on 2 CPU cores

Compiles ``kernels._gemv_w4_kernel`` for an H100/H200 (``sm_90a``) with Triton's own ptxas, for the
four stages of a Phi-3-mini layer and every config of ``kernels.W4_CONFIGS`` that takes K in one batch
of tiles, and reads the machine code with Triton's cuobjdump: registers, stack (spills), and
instructions a thread executes per weight it dequantizes (the code is straight-line, one pass
over its tiles, so the static count is the dynamic one; masked padding counts as work).

Why it matters: at 4.8 TB/s an H200 streams ~9.6 * 10^12 int4 weights/s, and its 132 SMs issue
~3.3 * 10^13 thread-instructions/s (4 schedulers x 32 lanes x ~1.98 GHz each), so above ~3.5
instructions a weight the kernel cannot reach the memory bound however its loads are arranged.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

STAGES = {  # Phi-3-mini: hidden 3072, intermediate 8192
    "qkv_proj (norm)": dict(k=3072, norm=True, gated=False, residual=False),
    "gate_up_proj (norm, gated)": dict(k=3072, norm=True, gated=True, residual=False),
    "o_proj (+ residual)": dict(k=3072, norm=False, gated=False, residual=True, act="fp32"),
    "down_proj (+ residual)": dict(k=8192, norm=False, gated=False, residual=True, act="fp32"),
}


def build(config: tuple[int, int, int], k: int, norm: bool, gated: bool, residual: bool, act: str = "bf16",
          group: int = 128) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from phiops.serve import kernels as K

    block_n, bw, warps = config
    tiles, batches = K._w4_tiles({"K": k, "BW": bw}), K._w4_batches({"K": k, "BW": bw})
    sig = {"q_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*i32", "a_ptr": f"*{act}", "g_ptr": "*bf16",
           "r_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "eps": "fp32"}
    const = {"K": k, "G": group, "ZP": False, "NORM": norm, "GATED": gated, "RESIDUAL": residual, "PDL": True,
             "BLOCK_N": block_n, "BW": bw, "T": tiles, "NB": batches, "DRY": False}
    sig.update({name: "constexpr" for name in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}
    src = ASTSource(fn=K._gemv_w4_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "launch_pdl": True})


def read_sass(cubin: bytes) -> tuple[collections.Counter[str], dict[str, int]]:
    import triton

    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    ops: collections.Counter[str] = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    res = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    return ops, {"registers": int(res.group(1)), "stack_bytes": int(res.group(2))} if res else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from phiops.serve import kernels as K

    rows = []
    for stage, spec in STAGES.items():
        kw = spec["k"] // 8
        for config in K.W4_CONFIGS:
            block_n, bw, warps = config
            if K._w4_batches({"K": spec["k"], "BW": bw}) > 1:
                continue
            ops, res = read_sass(build(config, **spec).asm["cubin"])
            tiles = K._w4_tiles({"K": spec["k"], "BW": bw})
            pairs = 2 if spec["gated"] else 1
            per_thread = tiles * block_n * pairs * bw * 8 // (32 * warps)  # weights a thread dequantizes
            useful = per_thread * kw / (tiles * bw)  # without the padding past K
            total = sum(ops.values())
            row = {"stage": stage, "config": list(config), "tiles": tiles, **res, "instructions": total,
                   "per_weight": round(total / useful, 2), "padding": round(1 - kw / (tiles * bw), 3),
                   "ops": {op: ops[op] for op in ("LDG", "LOP3", "FFMA", "FADD", "FMUL", "SHF", "PRMT", "IMAD", "SHFL",
                                                 "BAR")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    import triton

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench": "w4a16_sass", "target": "sm_90a", "triton": triton.__version__,
                                    "command": " ".join(["python", "bench/w4a16_sass.py", *(argv or sys.argv[1:])]),
                                    "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
