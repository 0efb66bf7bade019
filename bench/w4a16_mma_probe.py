"""Probe: a tensor-core W4A16 GEMV (CUDA C++ through NVRTC) in two weight layouts, against kernels.gemv_w4.

Layouts: ``interleave`` is the service's kernel (phiops.serve.mma: interleave_w4's words, as gemv_w4
reads them); ``tiles`` reads its own copy (``pack_tiles``, gemv_w4_mma_tiles.cu).

    python bench/w4a16_mma_probe.py --out bench/results/w4a16_mma_probe_h200.json   # one GPU, ~2 min
    python bench/w4a16_mma_probe.py --sass --out bench/results/w4a16_mma_sass_sm90.json  # no GPU: NVRTC
        # (pip install cuda-bindings nvidia-cuda-nvrtc), Triton's cuobjdump

Phi-3-mini's stages as bench/decode_kernels.py times them (weights rotating over copies larger than
the L2, many launches in one CUDA graph), each with its fused stages, against gemv_w4 at every one-batch
config (the best kept). Both launch with PDL, as in the decoder (the probe through the driver's
cuLaunchKernelEx). Correctness: relative error against the weight dequantized in float32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from _common import machine, versions
from decode_kernels import HIDDEN, W4A16_STAGES, graph_time_us, w4a16_problem

TILES_SRC = (Path(__file__).parent / "gemv_w4_mma_tiles.cu").read_text()


def pack_tiles(packed: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, k: int, group: int,
               gated: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """compressed-tensors' packing -> gemv_w4_mma_tiles.cu's tiles (see there): words, scales, centres."""
    r = packed.shape[0]
    sh = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    u = ((packed[:, :, None] >> sh) & 15).reshape(r, k)

    def arrange(x: torch.Tensor) -> torch.Tensor:  # rows -> [T, half, g, ...]
        if gated:
            n = r // 2
            t = -(-n // 8)
            return torch.stack([torch.nn.functional.pad(x[:n], (0, 0, 0, t * 8 - n)).view(t, 8, -1),
                                torch.nn.functional.pad(x[n:], (0, 0, 0, t * 8 - n)).view(t, 8, -1)], 1)
        t = -(-r // 16)
        return torch.nn.functional.pad(x, (0, 0, 0, t * 16 - r)).view(t, 2, 8, -1)

    U = arrange(u)
    T, S = U.shape[0], k // 16
    U = U.reshape(T, 2, 8, S, 2, 4, 2).permute(0, 3, 2, 5, 1, 4, 6).to(torch.int64)  # [T, s, g, t, half, kb, e]
    half = torch.arange(2, device=u.device).view(2, 1, 1)
    kb = torch.arange(2, device=u.device).view(1, 2, 1)
    e = torch.arange(2, device=u.device).view(1, 1, 2)
    words = (U << (4 * (half + 2 * kb) + 16 * e)).sum((-3, -2, -1))  # [T, s, g, t]
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    words = words.reshape(T, S // 4, 4, 32).permute(0, 1, 3, 2).contiguous()  # [T, chunk, lane, word]
    s = arrange(scale).permute(0, 3, 2, 1).contiguous().view(torch.int32)  # [T, group, g] bf16 (g, g + 8)
    z = None
    if zp is not None:
        ng = k // group
        cen = ((zp[:, None, :] >> sh[None, :, None]) & 15).reshape(-1, ng)[:r]  # packed along rows
        z = arrange((128 + cen).to(torch.bfloat16)).permute(0, 3, 2, 1).contiguous().view(torch.int32)
    return words, s, z


_CACHE: dict[tuple, Any] = {}


def cubin(layout: str, arch: str, **defs: int) -> bytes:
    """The kernel's machine code for ``arch`` (``sm_90``) with these defines (NVRTC: no GPU needed)."""
    from phiops.serve import mma

    return mma.build(defs, arch, None if layout == "interleave" else mma.HELPERS + TILES_SRC)


def kernel(layout: str, **defs: int) -> Any:
    """The tiles' kernel built for this GPU with these defines, loaded through the driver (cuda-bindings)."""
    from cuda.bindings import driver as cu

    key = (layout, *sorted(defs.items()))
    if key not in _CACHE:
        major, minor = torch.cuda.get_device_capability()
        code = cubin(layout, f"sm_{major}{minor}", **defs)
        torch.cuda.init()
        err, mod = cu.cuModuleLoadData(code)
        if err != cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuModuleLoadData: {err}")
        err, fn = cu.cuModuleGetFunction(mod, b"gemv_w4_mma")
        if err != cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuModuleGetFunction: {err}")
        _CACHE[key] = (mod, fn)
    return _CACHE[key][1]


def sass_rows() -> list[dict[str, Any]]:
    """Instructions a thread executes per weight, from each variant's sm_90 build (straight-line code:
    the static count is the dynamic one), for q/k/v's shape (K 3,072, group 128, norm fused)."""
    from w4a16_sass import read_sass

    base = dict(KDIM=HIDDEN, GROUP=128, NORM=1, GATED=0, RESID=0, ZP=0, A_F32=0, PDL=1)
    rows = []
    for layout, var, weights in (
            [("interleave", dict(GPW=gpw, PRE=pre), gpw * 128 * 16 // 32) for gpw, pre in ((2, 1), (4, 1), (4, 2))]
            + [("tiles", dict(CPW=cpw, PRE=pre), cpw * 64 * 16 // 32) for cpw, pre in ((4, 2), (8, 2), (8, 8))]):
        ops, res = read_sass(cubin(layout, "sm_90", **base, **var))
        total = sum(ops.values())
        rows.append({"layout": layout, **{k.lower(): v for k, v in var.items()}, **res, "instructions": total,
                     "weights_a_thread": weights, "per_weight": round(total / weights, 2),
                     "ops": {op: ops[op] for op in ("LDG", "LDGSTS", "LDS", "STS", "LOP3", "SHF", "HMMA", "IMAD",
                                                   "FFMA", "FADD")}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def stage(name: str, rows: int, k: int, norm: bool, gated: bool, residual: bool, symmetric: bool,
          copies_bytes: int, group: int = 128) -> dict[str, Any]:
    from phiops.serve import kernels as K
    from phiops.serve import mma

    eps = 1e-5
    torch.manual_seed(0)
    prob = w4a16_problem(rows, k, norm, gated, residual, symmetric, group, eps)
    ct, zpk, scale, base, nbytes = prob.ct, prob.zp, prob.scale, prob.w4, prob.nbytes
    a, gvec, n, x, out, rel = prob.a, prob.g, prob.n, prob.x, prob.out, prob.error
    n_copies = max(2, -(-copies_bytes // nbytes))

    row: dict[str, Any] = {"stage": name, "weight_bytes": nbytes, "copies": n_copies}
    # the baseline: gemv_w4 at every config that takes K in one batch, the best kept
    copies = [base] + [tuple(None if t is None else t.clone() for t in base) for _ in range(n_copies - 1)]
    best = None
    for cfg in K.W4_CONFIGS:
        if K._w4_batches({"K": k, "BW": cfg[1]}) > 1:
            continue
        fns = [lambda w=w, cfg=cfg: K.gemv_w4(*w, group, a, out, norm=gvec if norm else None, eps=eps, gated=gated,
                                              residual=x if residual else None, config=cfg) for w in copies]
        tus = graph_time_us(fns)
        if best is None or tus < best[1]:
            best = (cfg, tus)
    cfg, t_base = best
    row["gemv_w4"] = {"config": list(cfg), "us": round(t_base, 2), "tbs": round(nbytes / t_base / 1e6, 3),
                      "rel_err": rel(lambda: K.gemv_w4(*base, group, a, out, norm=gvec if norm else None, eps=eps,
                                                        gated=gated, residual=x if residual else None, config=cfg))}
    # the mma kernel, on the same words, scales and zero points ("interleave"), and on its own
    # tiles ("tiles", a second copy of the weights)
    tiles = -(-n // (8 if gated else 16))
    row["mma"] = []
    tcopies = [pack_tiles(ct, scale, zpk, k, group, gated)]
    tcopies += [tuple(None if t is None else t.clone() for t in tcopies[0]) for _ in range(n_copies - 1)]
    variants: list[tuple[str, dict[str, int]]] = [("interleave", dict(GPW=gpw, PRE=pre))
                                                   for gpw, pre in ((2, 1), (4, 1), (4, 2))]
    if group % 64 == 0:
        variants += [("tiles", dict(CPW=cpw, PRE=pre)) for cpw, pre in ((4, 2), (8, 2), (8, 8))]
    for layout, var in variants:
        t0 = time.perf_counter()
        if layout == "interleave":  # the service's entry point
            cfg = (var["GPW"], var["PRE"])

            def call(w: Any, cfg: tuple[int, int] = cfg) -> None:
                mma.gemv_w4_mma(*w, group, a, out, norm=gvec if norm else None, eps=eps, gated=gated,
                                residual=x if residual else None, config=cfg)
            ws = copies
        else:
            defs = dict(KDIM=k, GROUP=group, **var, NORM=int(norm), GATED=int(gated), RESID=int(residual),
                        ZP=int(not symmetric), A_F32=int(not norm), PDL=1)
            fn, warps = kernel(layout, **defs), -(-(k // 64) // var["CPW"])

            def call(w: Any, fn: Any = fn, warps: int = warps) -> None:
                zz = w[2] if w[2] is not None else w[1]
                mma.launch(fn, tiles, 32 * warps, [w[0].data_ptr(), w[1].data_ptr(), zz.data_ptr(), a.data_ptr(),
                                                   gvec.data_ptr(), x.data_ptr(), out.data_ptr()], n, eps, True)
            ws = tcopies
        err = rel(lambda: call(ws[0]))  # builds it
        compile_s = time.perf_counter() - t0
        tus = graph_time_us([lambda w=w: call(w) for w in ws])
        row["mma"].append({"layout": layout, **{k_.lower(): v for k_, v in var.items()},
                           "us": round(tus, 2), "tbs": round(nbytes / tus / 1e6, 3), "rel_err": err,
                           "compile_s": round(compile_s, 2), "over_gemv_w4": round(t_base / tus, 3)})
    tcopies.clear()
    copies.clear()
    print(json.dumps(row), flush=True)
    torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--copies-bytes", type=int, default=400_000_000)
    ap.add_argument("--sass", action="store_true", help="no GPU: each variant's sm_90 instruction count only")
    args = ap.parse_args()
    if args.sass:
        args.out.write_text(json.dumps({"bench": "w4a16_mma_probe --sass", "machine": machine(),
                                        "versions": versions(("cuda-bindings", "nvidia-cuda-nvrtc", "triton")),
                                        "rows": sass_rows()}, indent=1))
        return 0
    # ragged: rows not a whole number of tiles, other groups (correctness; times not meaningful)
    stages: list[tuple[Any, ...]] = W4A16_STAGES + [
        ("ragged 300 x 384, group 64, asymmetric, norm", 300, 384, True, False, False, False, 64),
        ("ragged gated 2 x 200 x 320, group 64", 400, 320, True, True, False, True, 64),
        ("ragged 300 x 576, group 32, residual", 300, 576, False, False, True, True, 32),
    ]
    rows = []
    for st in stages:
        try:
            rows.append(stage(*st[:7], copies_bytes=args.copies_bytes, group=st[7] if len(st) > 7 else 128))
        except Exception as exc:  # recorded: the next stage still runs
            rows.append({"stage": st[0], "error": f"{type(exc).__name__}: {exc}"[:2000]})
            print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(json.dumps({"bench": "w4a16_mma_probe", "machine": machine(),
                                        "versions": versions(("torch", "triton", "cupy")), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
