"""Where the paged engine's batched decode step spends its GPU time, and the launch settings of its own kernels.

    python bench/batched_step.py --out bench/results/batched_step_h200.json   # ~3 min on one H200

Phi-3-mini's shape with random bf16 weights, one GPU:

- ``step_profile``: the ``PagedDecoder`` step (the CUDA graph the engine replays) at 8, 32 and 128
  rows of ``--length`` cached tokens: wall time of a replay (CUDA events) and torch.profiler's
  kernel time per step, by kernel, grouped (GEMMs, attention, norms, gating, the rest);
- ``attention``: the paged attention kernel alone at 32 rows, over its launch settings (warps,
  pipeline stages, splits), 32 layers' caches so none sits in L2;
- ``matmul_w4``: ``kernels.matmul_w4`` on packed int4 weights of each of the step's matrices at
  ``--w4-rows`` rows, by each of its paths: its own tiles (``tiles_us``), the weight dequantized
  into a scratch matrix for cuBLAS (``dequant_us``) and what it picks by row count
  (``default_us``), against cuBLAS on the bf16 weights of the same shape; ``--w4-sweep`` times the
  tiles over tile sizes and pipeline depths (where their default came from).

Timings are CUDA-graph replays (``decode_kernels.graph_time_us``); ratios are within this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from _common import machine, versions
from decode_kernels import graph_time_us
from decode_phi3_mini import _arch


def _group(name: str) -> str:
    n = name.lower()
    if "decode_attention" in n or "_combine" in n:
        return "attention"
    if "rms_norm" in n:
        return "rms_norm"
    if "silu_mul" in n:
        return "silu_mul"
    if "matmul_w4" in n:
        return "matmul_w4"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "sm90", "xmma", "splitk")):
        return "gemm (cuBLAS)"
    if "index" in n:
        return "embedding"
    return "other"


def step_profile(model: Any, rows_list: list[int], length: int, steps: int = 10) -> list[dict[str, Any]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from phiops.serve.paged import PAGE, PagedDecoder, cdiv

    most = max(rows_list)
    max_len = cdiv(length + steps + 16, PAGE) * PAGE
    dec = PagedDecoder(model, "cuda", pages=most * cdiv(max_len, PAGE), max_len=max_len, max_rows=most)
    hkv, d = dec.hkv, dec.head_dim
    out = []
    for rows in rows_list:
        dec.clear()
        zeros = torch.zeros((rows, hkv, length, d), dtype=dec.dtype, device="cuda")
        dec.add([(zeros, zeros)] * len(dec.k), [length] * rows)
        tok = torch.ones((rows,), dtype=torch.long, device="cuda")
        dec.grow()
        dec.step(tok)  # captures this bucket
        torch.cuda.synchronize()
        walls = []
        for _ in range(steps):
            dec.grow()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dec.step(tok)
            b.record()
            b.synchronize()
            walls.append(a.elapsed_time(b) * 1000)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                dec.grow()
                dec.step(tok)
            torch.cuda.synchronize()
        kernels, groups, total = [], {}, 0.0
        for e in prof.key_averages():
            us = e.device_time_total
            if us <= 0 or e.key.startswith(("cudaGraph", "Memcpy", "Memset")):
                continue
            total += us
            groups[_group(e.key)] = groups.get(_group(e.key), 0.0) + us / steps
            kernels.append({"kernel": e.key[:100], "calls_per_step": round(e.count / steps, 1),
                            "us_per_step": round(us / steps, 1)})
        kernels.sort(key=lambda r: -r["us_per_step"])
        walls.sort()
        row = {"rows": rows, "cached_tokens": length, "bucket": dec.bucket(rows),
               "replay_us_median": round(walls[len(walls) // 2], 1),
               "gpu_kernel_us_per_step": round(total / steps, 1),
               "by_group_us": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
               "top_kernels": kernels[:16]}
        print(json.dumps(row)[:1500], flush=True)
        out.append(row)
    del dec
    torch.cuda.empty_cache()
    return out


def attention_sweep(arch: dict[str, Any], rows: int, length: int) -> dict[str, Any]:
    import torch

    from phiops.serve import kernels as K
    from phiops.serve.paged import PAGE, cdiv

    hq, hkv = arch["num_attention_heads"], arch.get("num_key_value_heads") or arch["num_attention_heads"]
    d = arch["hidden_size"] // hq
    max_len = cdiv(length + 64, PAGE) * PAGE
    width = max_len // PAGE
    layers, dev, bf = 32, "cuda", torch.bfloat16
    pages = rows * width
    kc = [torch.randn(pages + 1, hkv, PAGE, d, device=dev, dtype=bf) for _ in range(layers)]
    vc = [torch.randn(pages + 1, hkv, PAGE, d, device=dev, dtype=bf) for _ in range(layers)]
    table = torch.arange(pages, dtype=torch.int32, device=dev).view(rows, width)
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, device=dev, dtype=bf)
    pos = torch.full((rows,), length, dtype=torch.int32, device=dev)
    cos, sin = torch.randn(max_len, d, device=dev), torch.randn(max_len, d, device=dev)
    o = torch.empty(rows, hq * d, device=dev, dtype=bf)
    kv_bytes = 2 * rows * hkv * (length + 1) * d * 2
    res = []
    for warps in (2, 4, 8):
        for stages in (2, 3, 4):
            for chunk in (None, max_len // 2):
                a = K.Attention(heads=hq, kv_heads=hkv, head_dim=d, rotary_dim=d, max_len=max_len, scaling=d ** -0.5,
                                device=dev, rows=rows, page=PAGE, chunk=chunk, num_warps=warps, stages=stages)
                us = graph_time_us([lambda i=i, a=a: a(qkv, kc[i], vc[i], pos, cos, sin, o, table)
                                    for i in range(layers)])
                res.append({"num_warps": warps, "stages": stages, "splits": a.splits, "chunk": a.chunk,
                            "us": round(us, 2), "tb_s": round(kv_bytes / us / 1e6, 2)})
    res.sort(key=lambda r: r["us"])
    default = K.Attention(heads=hq, kv_heads=hkv, head_dim=d, rotary_dim=d, max_len=max_len, scaling=d ** -0.5,
                          device=dev, rows=rows, page=PAGE)
    out = {"rows": rows, "cached_tokens": length, "kv_bytes": kv_bytes,
           "default": {"num_warps": default.num_warps, "stages": default.stages, "splits": default.splits},
           "runs": res}
    print(json.dumps(out), flush=True)
    return out


def matmul_w4_sweep(arch: dict[str, Any], ms: list[int], group: int = 128, sweep: bool = False) -> list[dict[str, Any]]:
    import torch

    from phiops.serve import kernels as K

    h, inter = arch["hidden_size"], arch["intermediate_size"]
    hq = arch["num_attention_heads"]
    hkv = arch.get("num_key_value_heads") or hq
    d = h // hq
    # the LM head stays bf16 in the promoted W4A16 models (quantize stage: ignore lm_head)
    shapes = [("qkv", (hq + 2 * hkv) * d, h), ("o", h, h), ("gate_up", 2 * inter, h), ("down", h, inter)]
    dev, out = "cuda", []
    for name, n, k in shapes:
        copies = max(2, int(4e8 // (n * k // 2)))  # more bytes than L2 holds, rotated
        packed = [torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=dev) for _ in range(copies)]
        scale = [torch.rand(n, k // group, device=dev, dtype=torch.bfloat16) * 0.01 for _ in range(copies)]
        dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(max(2, copies // 4))]
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            cublas = graph_time_us([lambda w=w: torch.mm(x, w.t(), out=y) for w in dense])
            paths = {path: graph_time_us([lambda i=i, d=d: K.matmul_w4(packed[i], scale[i], None, group, x, y,
                                                                       dequant=d) for i in range(copies)])
                     for path, d in (("tiles", False), ("dequant", True), ("default", None))}
            runs = []
            if sweep:
                block_m = min(64, max(16, 1 << (m - 1).bit_length()))
                for cfg in [(block_m, bn, bk, 4, stages) for bn in (32, 64, 128) for bk in (64, 128, 256)
                            for stages in (3, 4) if bn * bk <= 128 * 128]:
                    try:
                        us = graph_time_us([lambda i=i, c=cfg: K.matmul_w4(packed[i], scale[i], None, group, x, y,
                                                                           config=c) for i in range(copies)])
                    except Exception as exc:  # out of shared memory, say
                        runs.append({"config": cfg, "error": f"{type(exc).__name__}"[:80]})
                        continue
                    runs.append({"config": cfg, "us": round(us, 2)})
            ok = sorted((r for r in runs if "us" in r), key=lambda r: r["us"])
            row = {"matrix": name, "n": n, "k": k, "m": m, "cublas_bf16_us": round(cublas, 2),
                   **{f"{p}_us": round(us, 2) for p, us in paths.items()},
                   "default_path": "dequant" if K.matmul_w4_dequantizes(m, n, x.device) else "tiles",
                   "dequant_over_tiles": round(paths["tiles"] / paths["dequant"], 3),
                   "default_over_cublas": round(cublas / paths["default"], 3),
                   "dequant_over_cublas": round(cublas / paths["dequant"], 3),
                   "tiles_over_cublas": round(cublas / paths["tiles"], 3),
                   "w4_bytes_tb_s": round((n * k // 2 + n * k // group * 2) / min(paths.values()) / 1e6, 2)}
            if ok:
                row.update(best_tiles=ok[0], best_tiles_over_cublas=round(cublas / ok[0]["us"], 3), top_tiles=ok[:6])
            print(json.dumps(row), flush=True)
            out.append(row)
        packed = scale = dense = None  # freed before the next shape (rebound, not deleted: the lambdas name them)
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--length", type=int, default=192, help="tokens cached per row (prompt 128 + half of 128 out)")
    ap.add_argument("--rows", default="8,32,128")
    ap.add_argument("--only", default="step_profile,attention,matmul_w4")
    ap.add_argument("--w4-sweep", action="store_true", help="matmul_w4's tiles over tile sizes and pipeline depths")
    ap.add_argument("--w4-rows", default="8,32,64,128,1024,4096",
                    help="matmul_w4's row counts (decode batches; 1,024 and 4,096: prefill of 8 and 32 prompts)")
    args = ap.parse_args(argv)
    import torch

    from phiops import models

    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    only = set(args.only.split(","))
    arch = _arch(False)
    result: dict[str, Any] = {"bench": "batched_step", "command": " ".join(["python", "bench/batched_step.py", *(
        argv if argv is not None else sys.argv[1:])]), "machine": machine(),
        "versions": versions(("torch", "triton", "transformers"))}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    t0 = time.perf_counter()
    rows = [int(x) for x in args.rows.split(",")]
    if "step_profile" in only:
        model = models.random_model(arch, dtype="bfloat16", device="cuda")
        result["step_profile"] = step_profile(model, rows, args.length)
        save()
        del model
        torch.cuda.empty_cache()
    if "attention" in only:
        result["attention"] = attention_sweep(arch, 32, args.length)
        save()
    if "matmul_w4" in only:
        result["matmul_w4"] = matmul_w4_sweep(arch, [int(x) for x in args.w4_rows.split(",")], sweep=args.w4_sweep)
        save()
    result["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
