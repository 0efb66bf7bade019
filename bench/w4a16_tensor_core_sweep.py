"""A tried-and-not-kept W4A16 batched matmul on tensor cores, swept against ``kernels.matmul_w4``.

    python bench/w4a16_tensor_core_sweep.py bench/results/w4a16_tensor_core_sweep_h200.json   # one H200, ~9 min

The kernel (``_matmul_w4_tc``) reads each packed word once, unpacks a group's words to
``[rows, 128]`` codes in column order, builds each bf16 weight as ``128 + code`` by OR-ing the code
under 128's exponent, and runs ``tl.dot`` against the activations (swapped: the weight rows are the
MMA's M); the centre comes off through the activations' sums and the scale multiplies the
accumulator, once per group. ``B`` groups are requested before the previous ``B`` are computed (a
software pipeline; ``B = 1``: none). ``dq`` configs time ``kernels.dequant_w4`` + cuBLAS instead
(the path ``matmul_w4`` took since). bench/README (W4A16's batched matmul through a scratch matrix)
says what it showed: per-program K loops whose time tracks their length, not the bytes.
"""
import json
import sys
import time

import torch
import triton
import triton.language as tl
from _common import machine
from decode_kernels import graph_time_us

from phiops.serve import kernels as K
from phiops.serve.kernels import INTERPRET


@triton.jit
def _w4_group_load(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, g, K: tl.constexpr, G: tl.constexpr,
                   ZP: tl.constexpr, BLOCK_N: tl.constexpr):
    KW: tl.constexpr = K // 8
    NG: tl.constexpr = K // G
    GW: tl.constexpr = G // 8
    ok = g < NG
    t = tl.arange(0, G)
    x = tl.load(x_ptr + rm[:, None] * K + (g * G + t)[None, :], mask=mmask[:, None] & ok, other=0.0)
    q = tl.load(q_ptr + rn[:, None] * KW + (g * GW + tl.arange(0, GW))[None, :], mask=nmask[:, None] & ok, other=0)
    s = tl.load(s_ptr + rn * NG + g, mask=nmask & ok, other=0.0)
    if ZP:
        z = tl.load(z_ptr + (rn // 8) * NG + g, mask=nmask & ok, other=0)
    else:
        z = tl.zeros([BLOCK_N], dtype=tl.int32)
    return x, q, s, z


@triton.jit
def _w4_group_dot(acc, x, q, s, z, rn, G: tl.constexpr, ZP: tl.constexpr, F32: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    u = ((q[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15) | 0x4300  # bf16 128 + code
    w = tl.reshape(tl.permute(u, (0, 2, 1)), [BLOCK_N, G]).to(tl.int16).to(tl.bfloat16, bitcast=True)
    if ZP:
        c = ((z >> ((rn % 8) * 4)) & 15).to(tl.float32) + 128.0
    else:
        c = tl.full([BLOCK_N], 136.0, tl.float32)
    xs = tl.sum(x.to(tl.float32), axis=1)
    if F32:
        d = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision=PRECISION)
    else:
        d = tl.dot(w, tl.trans(x), input_precision=PRECISION)  # [BN, BM]
    return acc + (d - c[:, None] * xs[None, :]) * s.to(tl.float32)[:, None]


@triton.jit
def _matmul_w4_tc(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K: tl.constexpr, G: tl.constexpr, ZP: tl.constexpr,
                  PRECISION: tl.constexpr, F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  B: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    NG: tl.constexpr = K // G
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # software pipeline: the next batch of B groups is requested before this one is computed
    x0, q0, s0, z0 = _w4_group_load(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, 0, K, G, ZP, BLOCK_N)
    if B > 1:
        x1, q1, s1, z1 = _w4_group_load(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, 1, K, G, ZP, BLOCK_N)
    if B > 2:
        x2, q2, s2, z2 = _w4_group_load(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, 2, K, G, ZP, BLOCK_N)
        x3, q3, s3, z3 = _w4_group_load(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, 3, K, G, ZP, BLOCK_N)
    for g in range(0, NG, B):
        nx0, nq0, ns0, nz0 = _w4_group_load(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, g + B, K, G, ZP, BLOCK_N)
        if B > 1:
            nx1, nq1, ns1, nz1 = _w4_group_load(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, g + B + 1, K, G, ZP, BLOCK_N)
        if B > 2:
            nx2, nq2, ns2, nz2 = _w4_group_load(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, g + B + 2, K, G, ZP, BLOCK_N)
            nx3, nq3, ns3, nz3 = _w4_group_load(x_ptr, q_ptr, s_ptr, z_ptr, rm, rn, mmask, nmask, g + B + 3, K, G, ZP, BLOCK_N)
        acc = _w4_group_dot(acc, x0, q0, s0, z0, rn, G, ZP, F32, PRECISION, BLOCK_N)
        if B > 1:
            acc = _w4_group_dot(acc, x1, q1, s1, z1, rn, G, ZP, F32, PRECISION, BLOCK_N)
        if B > 2:
            acc = _w4_group_dot(acc, x2, q2, s2, z2, rn, G, ZP, F32, PRECISION, BLOCK_N)
            acc = _w4_group_dot(acc, x3, q3, s3, z3, rn, G, ZP, F32, PRECISION, BLOCK_N)
        x0, q0, s0, z0 = nx0, nq0, ns0, nz0
        if B > 1:
            x1, q1, s1, z1 = nx1, nq1, ns1, nz1
        if B > 2:
            x2, q2, s2, z2 = nx2, nq2, ns2, nz2
            x3, q3, s3, z3 = nx3, nq3, ns3, nz3
    tl.store(out_ptr + rm[None, :] * N + rn[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=mmask[None, :] & nmask[:, None])


def matmul_w4_tc(packed, scale, zero_point, group, x, out, config=None):
    m, k = x.shape
    n = packed.shape[0]
    block_m, block_n, warps, b, dq = config or (16, 64, 4, 2, False)
    if dq:
        return torch.mm(x, K.dequant_w4(packed, scale, zero_point, group, k, x.dtype).t(), out=out)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _matmul_w4_tc[grid](x, packed, scale, zero_point if zero_point is not None else packed, out, m, n, k,
                        G=group, ZP=zero_point is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                        F32=x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16),
                        BLOCK_M=block_m, BLOCK_N=block_n, B=b, num_warps=warps)
    return out


def main() -> None:
    out_path = sys.argv[1]
    group = 128
    shapes = [("qkv", 9216, 3072), ("o", 3072, 3072), ("gate_up", 16384, 3072), ("down", 3072, 8192)]
    res = {"machine": machine(), "rows": []}
    t0 = time.time()
    for name, n, k in shapes:
        copies = max(2, int(4e8 // (n * k // 2)))
        packed = [torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
                  for _ in range(copies)]
        scale = [torch.rand(n, k // group, device="cuda", dtype=torch.bfloat16) * 0.01 for _ in range(copies)]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, copies // 4))]
        for m in (8, 32, 128, 1024):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            y2 = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            cublas = graph_time_us([lambda w=w: torch.mm(x, w.t(), out=y) for w in dense])
            old = graph_time_us([lambda i=i: K.matmul_w4(packed[i], scale[i], None, group, x, y, dequant=False)
                                 for i in range(copies)])
            bm = min(128, max(16, 1 << (m - 1).bit_length()))
            runs = []
            cfgs = [(bm, bn, w, b, False) for bn in (16, 32, 64, 128) for w in (4, 8) for b in (2, 4)]
            cfgs += [(bm, 64, 4, 1, False), (bm, 64, 4, 1, True)]
            for cfg in cfgs:
                try:
                    us = graph_time_us([lambda i=i: matmul_w4_tc(packed[i], scale[i], None, group, x, y2, config=cfg)
                                        for i in range(copies)])
                except Exception as exc:  # out of registers or shared memory, say
                    runs.append({"config": cfg, "error": str(exc)[:100]})
                    continue
                runs.append({"config": cfg, "us": round(us, 2)})
            # correctness of the best against the old kernel's output
            ok = sorted((r for r in runs if "us" in r), key=lambda r: r["us"])
            K.matmul_w4(packed[0], scale[0], None, group, x, y, dequant=False)
            matmul_w4_tc(packed[0], scale[0], None, group, x, y2, config=tuple(ok[0]["config"]))
            err = float((y2.float() - y.float()).norm() / y.float().norm())
            def best(pick):
                return min((r["us"] for r in ok if pick(r["config"])), default=None)

            row = {"matrix": name, "m": m, "cublas_us": round(cublas, 2), "old_us": round(old, 2), "best": ok[0],
                   "best_over_old": round(old / ok[0]["us"], 2), "best_over_cublas": round(cublas / ok[0]["us"], 2),
                   "rel_err_vs_old": err, "top": ok[:8], "errors": [r for r in runs if "error" in r][:3],
                   "by_variant": {"dequant_cublas": best(lambda c: c[4]),
                                  **{f"B={b}": best(lambda c, b=b: c[3] == b and not c[4]) for b in (1, 2, 4)}}}
            print(json.dumps({key: v for key, v in row.items() if key != "top"}), flush=True)
            res["rows"].append(row)
            json.dump(res, open(out_path, "w"), indent=1)
        packed = scale = dense = None  # freed before the next shape (rebound, not deleted: the lambdas name them)
        torch.cuda.empty_cache()
    res["total_s"] = round(time.time() - t0, 1)
    json.dump(res, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
