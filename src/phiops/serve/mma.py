"""W4A16 GEMV at batch 1 on tensor cores, for ``FusedDecoder`` on CUDA: CUDA C++ built at run time.

``kernels.gemv_w4`` (Triton) dequantizes on the CUDA cores and is bound by their instruction issue,
not by memory (bench/README.md, "W4A16 at batch 1"). This kernel reads the same weights (the
``interleave_w4`` words, compressed-tensors' bf16 scales and packed zero points: no second copy),
turns each 32-bit word into four bf16 pairs with three shifts and four LOP3s and multiplies on the
tensor cores (``mma.sync`` m16n8k16, fp32 accumulation), with ``gemv_w4``'s fused stages (RMSNorm of
the input, SiLU gating, residual add). ``SOURCE`` says how. One H200, Phi-3-mini's matrices, timed in
graphs beside ``gemv_w4`` (bench/results/w4a16_mma_probe_h200.json): q/k/v 1.28x, gate/up 1.16x, o and
down slower; ``FusedDecoder``'s tuner times both per role and keeps the faster.

Built by NVRTC and launched through the CUDA driver with programmatic dependent launch, both from
``cuda-bindings`` (which torch's CUDA wheels require): nothing to compile at install time, and a
graph captures the launches like any other. It needs bf16 scales and norm weights (a bf16 model, the
serving dtype on CUDA), bf16 or float32 activations, and an sm_80+ GPU; ``unsupported`` says why not.
``PHIOPS_W4A16_MMA=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import torch

# (groups of the input a warp takes, groups it requests before the activations). H200, Phi-3-mini
# (bench/results/w4a16_mma_probe_h200.json): (2, 1) fastest on q/k/v and o, (4, 2) on gate/up and
# down; (4, 1) never.
CONFIGS = [(2, 1), (4, 2)]

HELPERS = r"""
// Shared by the kernels built from this module (and bench/gemv_w4_mma_tiles.cu): types, loads, the
// nibble-to-bf16 step, the mma, conversions.
typedef unsigned int u32;
typedef unsigned short u16;
struct alignas(16) q4 { u32 x, y, z, w; };
struct alignas(8) q2 { u32 x, y; };

template <int n>
__device__ __forceinline__ void ld_words(u32* r, const u32* p) {  // streamed: read once
  if constexpr (n == 4) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
  } else if constexpr (n == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "l"(p));
  } else {
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r[0]) : "l"(p));
  }
}

template <int n>
__device__ __forceinline__ void ld_vec(u32* r, const u32* p) {  // n words, widest loads, in program order
  if constexpr (n % 4 == 0) {
#pragma unroll
    for (int i = 0; i < n; i += 4)
      asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(r[i]), "=r"(r[i + 1]), "=r"(r[i + 2]), "=r"(r[i + 3]) : "l"(p + i));
  } else if constexpr (n % 2 == 0) {
#pragma unroll
    for (int i = 0; i < n; i += 2)
      asm volatile("ld.global.v2.u32 {%0,%1}, [%2];" : "=r"(r[i]), "=r"(r[i + 1]) : "l"(p + i));
  } else {
#pragma unroll
    for (int i = 0; i < n; ++i) asm volatile("ld.global.u32 %0, [%1];" : "=r"(r[i]) : "l"(p + i));
  }
}

__device__ __forceinline__ u32 nib2(u32 q) {  // (q & 0x000f000f) | 0x43004300
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(q), "n"(0x000f000f), "n"(0x43004300));
  return r;
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float lo_f(u32 v) { return __int_as_float(v << 16); }
__device__ __forceinline__ float hi_f(u32 v) { return __int_as_float(v & 0xffff0000u); }
__device__ __forceinline__ float bf_f(u16 v) { return __int_as_float(((u32)v) << 16); }
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ u16 f_bf(float v) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
  return r;
}
"""

SOURCE = HELPERS + r"""
// W4A16 GEMV at batch 1 on tensor cores (mma.sync m16n8k16: bf16 in, fp32 accumulate), reading the
// weights exactly as kernels.gemv_w4 does (interleave_w4's words, compressed-tensors' scales and
// packed zero points), so that either kernel can serve a layer with no second copy.
//
// A block takes one tile of 16 weight rows (gated: 8 gate rows over their 8 up rows, so that one
// thread holds both halves of an output) and all of K, one warp per slice of GPW groups. Lane
// (g, t) reads, for each group, GW / 4 consecutive words of row g and of row g + 8: the four
// lanes t of a row cover the group's GW words. An mma sums over k, and any order of k will do if
// the A and B operands agree: each word (8 columns of one row) feeds two k-steps, its nibbles
// (0, 4) and (1, 5) in the first, (2, 6) and (3, 7) in the second. Three shifts and four LOP3s a
// word: (w & 0x000f000f) | 0x43004300 is the bf16 pair (128 + u_lo, 128 + u_hi), exact. The
// activations are the B operand, the same vector in all 8 columns, laid out in shared memory in
// the nibbles' order; every lane's accumulator then holds its rows' sums. Per group, in fp32:
// y += s * (C - (128 + centre) * sum(x)), the group's sum of activations taken once per warp.
//
// Header-free (NVRTC, no toolkit headers). Compile-time: KDIM, GROUP, GPW (groups a warp), PRE
// (groups requested before the activations), NORM, GATED, RESID, ZP, A_F32 (float32 input), OUT_F32
// (float32 output), PDL.

#define KW (KDIM / 8)
#define NG (KDIM / GROUP)
#define GW (GROUP / 8)
#define WPT (GW / 4)                       // words a thread reads of each row, each group
#define WARPS ((NG + GPW - 1) / GPW)
#define E (GPW * GROUP / 32)               // activations a lane prepares
#define LPG (GROUP / E)                    // lanes a group's activations span

__device__ __forceinline__ void store(void* out, int n, float v) {
#if OUT_F32
  ((float*)out)[n] = v;
#else
  ((u16*)out)[n] = f_bf(v);
#endif
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
gemv_w4_mma(const u32* __restrict__ wq, const u16* __restrict__ sc, const u32* __restrict__ zc,
            const void* __restrict__ a_, const u16* __restrict__ gain, const u16* resid, void* out_, int N,
            float eps) {
  // B fragments: [warp][group][t][word][step] -> {b0, b1}
  __shared__ q2 xs[WARPS][GPW][4][WPT][2];
  __shared__ float sx[WARPS][GPW];
  __shared__ float red[WARPS][16];
  __shared__ float ssq[WARPS];
  __shared__ float yv[16];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, tile = blockIdx.x;
  const int g = lane >> 2, t = lane & 3;
  const int j0 = w * GPW;                        // this warp's first group
  const int ng = min(GPW, NG - j0);              // its groups
#if GATED
  const bool ok_lo = tile * 8 + g < N, ok_hi = ok_lo;
  const int row_lo = ok_lo ? tile * 8 + g : 0, row_hi = ok_hi ? N + tile * 8 + g : 0;
#else
  const bool ok_lo = tile * 16 + g < N, ok_hi = tile * 16 + 8 + g < N;
  // rows past N read row 0 (their sums are never stored): loads with no branch
  const int row_lo = ok_lo ? tile * 16 + g : 0, row_hi = ok_hi ? tile * 16 + 8 + g : 0;
#endif

  // 1. PRE groups of this warp's weights first (under PDL: before the previous kernel's output can
  // be read), the scales and centres, then the activations, then the rest of the weights.
  u32 qlo[GPW][WPT], qhi[GPW][WPT];
  const u32* plo = wq + (size_t)row_lo * KW + j0 * GW + t * WPT;
  const u32* phi = wq + (size_t)row_hi * KW + j0 * GW + t * WPT;
#pragma unroll
  for (int j = 0; j < PRE && j < GPW; ++j)
    if (j < ng) {
      ld_words<WPT>(qlo[j], plo + j * GW);
      ld_words<WPT>(qhi[j], phi + j * GW);
    }
  // scales (and centres) of the warp's groups, row by row: one vector load a row where the rows'
  // runs are aligned to it (NG a multiple of GPW), else one load a group
  float s_lo[GPW], s_hi[GPW], c_lo[GPW], c_hi[GPW];
#if NG % GPW == 0 && GPW % 2 == 0
  u32 sw_lo[GPW / 2], sw_hi[GPW / 2];
  ld_vec<GPW / 2>(sw_lo, (const u32*)(sc + (size_t)row_lo * NG + j0));
  ld_vec<GPW / 2>(sw_hi, (const u32*)(sc + (size_t)row_hi * NG + j0));
#pragma unroll
  for (int j = 0; j < GPW; ++j) {
    s_lo[j] = ok_lo ? ((j % 2) ? hi_f(sw_lo[j / 2]) : lo_f(sw_lo[j / 2])) : 0.f;
    s_hi[j] = ok_hi ? ((j % 2) ? hi_f(sw_hi[j / 2]) : lo_f(sw_hi[j / 2])) : 0.f;
  }
#else
#pragma unroll
  for (int j = 0; j < GPW; ++j) {
    s_lo[j] = s_hi[j] = 0.f;
    if (j < ng) {
      s_lo[j] = ok_lo ? bf_f(sc[(size_t)row_lo * NG + j0 + j]) : 0.f;
      s_hi[j] = ok_hi ? bf_f(sc[(size_t)row_hi * NG + j0 + j]) : 0.f;
    }
  }
#endif
#pragma unroll
  for (int j = 0; j < GPW; ++j) c_lo[j] = c_hi[j] = 136.f;  // 128 + 8: symmetric
#if ZP
#if NG % GPW == 0
  u32 zw_lo[GPW], zw_hi[GPW];
  ld_vec<GPW>(zw_lo, zc + (size_t)(row_lo / 8) * NG + j0);
  ld_vec<GPW>(zw_hi, zc + (size_t)(row_hi / 8) * NG + j0);
#pragma unroll
  for (int j = 0; j < GPW; ++j) {
    c_lo[j] = 128.f + (float)((zw_lo[j] >> (4 * (row_lo % 8))) & 15u);
    c_hi[j] = 128.f + (float)((zw_hi[j] >> (4 * (row_hi % 8))) & 15u);
  }
#else
#pragma unroll
  for (int j = 0; j < GPW; ++j)
    if (j < ng) {
      c_lo[j] = 128.f + (float)((zc[(size_t)(row_lo / 8) * NG + j0 + j] >> (4 * (row_lo % 8))) & 15u);
      c_hi[j] = 128.f + (float)((zc[(size_t)(row_hi / 8) * NG + j0 + j] >> (4 * (row_hi % 8))) & 15u);
    }
#endif
#endif
#if PDL
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif

  // 2. The activations of this warp's slice: lane holds E consecutive ones (u32 words: bf16 pairs
  // or floats).
  const int kw = lane * E;            // within the slice
  const int kg = j0 * GROUP + kw;     // in K
  const bool live = kw < ng * GROUP;
#define AW (A_F32 ? E : E / 2)
  u32 araw[AW];
#pragma unroll
  for (int i = 0; i < AW; ++i) araw[i] = 0u;
#if NORM
  u32 graw[E / 2];
#pragma unroll
  for (int i = 0; i < E / 2; ++i) graw[i] = 0u;
#endif
  if (live) {
    ld_vec<AW>(araw, (const u32*)a_ + (A_F32 ? kg : kg / 2));
#if NORM
    ld_vec<E / 2>(graw, (const u32*)gain + kg / 2);
#endif
  }
#pragma unroll
  for (int j = PRE; j < GPW; ++j)
    if (j < ng) {
      ld_words<WPT>(qlo[j], plo + j * GW);
      ld_words<WPT>(qhi[j], phi + j * GW);
    }
  float ss = 0.f, gs = 0.f;
  u16* xh = (u16*)&xs[w][0][0][0][0];
#pragma unroll
  for (int e = 0; e < E; e += 2) {
#if A_F32
    float v0 = __int_as_float(araw[e]), v1 = __int_as_float(araw[e + 1]);
#else
    float v0 = lo_f(araw[e / 2]), v1 = hi_f(araw[e / 2]);
#endif
#if NORM
    ss += v0 * v0 + v1 * v1;
    v0 *= lo_f(graw[e / 2]); v1 *= hi_f(graw[e / 2]);
#endif
    const u32 pv = pack2(v0, v1);
    gs += lo_f(pv) + hi_f(pv);
    // column c of the slice: group jl, word wi = cc % GW (lane t = wi / WPT, word i = wi % WPT),
    // nibble n = cc / GW: step n % 4 / 2, b0 or b1 by n % 2, low or high half by n / 4
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = kw + e + h, jl = c / GROUP, cc = c % GROUP, wi = cc % GW, n = cc / GW;
      xh[((((jl * 4 + wi / WPT) * WPT + wi % WPT) * 2 + (n % 4) / 2) * 2 + (n % 2)) * 2 + n / 4] =
          (u16)(h ? pv >> 16 : pv & 0xffffu);
    }
  }
#pragma unroll
  for (int o = 1; o < LPG; o <<= 1) gs += __shfl_xor_sync(0xffffffffu, gs, o);
  if (lane % LPG == 0) sx[w][lane / LPG] = gs;
#if NORM
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) ssq[w] = ss;
#endif
  __syncwarp();

  // 3. Dequantize and multiply a group at a time; its scale and centre once.
  float acc_lo = 0.f, acc_hi = 0.f;
#pragma unroll
  for (int j = 0; j < GPW; ++j) {
    if (j < ng) {
      float c[4] = {0.f, 0.f, 0.f, 0.f}, d[4] = {0.f, 0.f, 0.f, 0.f};  // two chains of mma
#pragma unroll
      for (int i = 0; i < WPT; ++i) {
        u32 wl = qlo[j][i], wh = qhi[j][i];
        const q2 b0 = xs[w][j][t][i][0], b1 = xs[w][j][t][i][1];
        u32 a0 = nib2(wl), a1 = nib2(wh);
        wl >>= 4; wh >>= 4;
        u32 a2 = nib2(wl), a3 = nib2(wh);
        mma(c, a0, a1, a2, a3, b0.x, b0.y);
        wl >>= 4; wh >>= 4;
        a0 = nib2(wl); a1 = nib2(wh);
        wl >>= 4; wh >>= 4;
        a2 = nib2(wl); a3 = nib2(wh);
        mma(d, a0, a1, a2, a3, b1.x, b1.y);
      }
      const float S = sx[w][j];
      acc_lo += s_lo[j] * (c[0] + d[0] - c_lo[j] * S);
      acc_hi += s_hi[j] * (c[2] + d[2] - c_hi[j] * S);
    }
  }
  if (t == 0) {
    red[w][g] = acc_lo;
    red[w][g + 8] = acc_hi;
  }
  __syncthreads();

  // 4. Epilogue: the slices summed; the norm's scalar, the gate, the residual.
  if (threadIdx.x < 16) {
    float y = 0.f;
#pragma unroll
    for (int ww = 0; ww < WARPS; ++ww) y += red[ww][threadIdx.x];
#if NORM
    float tot = 0.f;
#pragma unroll
    for (int ww = 0; ww < WARPS; ++ww) tot += ssq[ww];
    y *= rsqrtf(tot / KDIM + eps);
#endif
    yv[threadIdx.x] = y;
  }
  __syncwarp();
#if GATED
  if (threadIdx.x < 8) {
    const int n = tile * 8 + threadIdx.x;
    if (n < N) {
      const float gt = yv[threadIdx.x], up = yv[threadIdx.x + 8];
      store(out_, n, gt / (1.f + __expf(-gt)) * up);
    }
  }
#else
  if (threadIdx.x < 16) {
    const int n = tile * 16 + threadIdx.x;
    if (n < N) {
      float o = yv[threadIdx.x];
#if RESID
      o += bf_f(resid[n]);
#endif
      store(out_, n, o);
    }
  }
#endif
}
"""

_LOCK = threading.Lock()
_FUNCTIONS: dict[tuple[Any, ...], Any] = {}  # (device, defines) -> (module, function)


def disabled() -> str | None:
    """Why this kernel cannot run in this process at all (None: it can)."""
    if os.environ.get("PHIOPS_W4A16_MMA", "1") == "0":
        return "PHIOPS_W4A16_MMA=0"
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return "needs CUDA"
    if torch.cuda.get_device_capability() < (8, 0):
        return "needs an sm_80+ GPU (mma.sync on bf16)"
    try:
        from cuda.bindings import driver, nvrtc  # noqa: F401
    except ImportError as exc:
        return f"cuda-bindings missing ({exc})"
    return None


def _aligned(t: torch.Tensor | None, size: int) -> bool:
    return t is None or t.data_ptr() % size == 0


def unsupported(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group: int,
                a: torch.Tensor, out: torch.Tensor, norm: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> str | None:
    """Why ``gemv_w4_mma`` cannot take this call (None: it can)."""
    reason = disabled()
    if reason:
        return reason
    k = a.numel()
    if group not in (32, 64, 128) or k % group:
        return f"group {group}, K {k}: groups of 32, 64 or 128, K a whole number of them"
    if a.dtype not in (torch.bfloat16, torch.float32) or out.dtype not in (torch.bfloat16, torch.float32):
        return f"input {a.dtype}, output {out.dtype}: bf16 or float32"
    if scale.dtype != torch.bfloat16 or packed.dtype != torch.int32 or (
            zero_point is not None and zero_point.dtype != torch.int32):
        return f"scales {scale.dtype}, words {packed.dtype}: bf16 scales, int32 words and zero points"
    for name, t in (("norm", norm), ("residual", residual)):
        if t is not None and t.dtype != torch.bfloat16:
            return f"{name} {t.dtype}: bf16"
    if residual is not None and out.dtype != torch.bfloat16:
        return f"output {out.dtype} with a residual: bf16"
    for t in (packed, scale, zero_point, a, out, norm, residual):
        if t is not None and (not t.is_cuda or not t.is_contiguous()):
            return "tensors must be contiguous, on CUDA"
    # vector loads: 16 bytes of words and activations, the scales' and zero points' runs
    if not (_aligned(packed, 16) and _aligned(a, 16) and _aligned(norm, 16) and _aligned(scale, 16)
            and _aligned(zero_point, 16)):
        return "tensors must start on 16-byte boundaries"
    return None


def _defines(k: int, group: int, config: tuple[int, int], *, zp: bool, norm: bool, gated: bool, residual: bool,
             a_f32: bool, pdl: bool, out_f32: bool = False) -> dict[str, int]:
    gpw, pre = config
    return {"KDIM": k, "GROUP": group, "GPW": gpw, "PRE": pre, "NORM": int(norm), "GATED": int(gated),
            "RESID": int(residual), "ZP": int(zp), "A_F32": int(a_f32), "OUT_F32": int(out_f32), "PDL": int(pdl)}


def build(defines: dict[str, int], arch: str, source: str | None = None) -> bytes:
    """The kernel's machine code for ``arch`` (``sm_90``) with these defines: NVRTC, no GPU needed.

    Args:
        defines: the compile-time values (``_defines``); arch: an NVRTC architecture.
        source: another kernel named ``gemv_w4_mma`` (default: ``SOURCE``).

    Returns:
        The cubin.

    Raises:
        RuntimeError: NVRTC refused the source (with its log).
    """
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram((source or SOURCE).encode(), b"gemv_w4_mma.cu", 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC: {err}")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"] + [
            f"-D{key}={value}".encode() for key, value in defines.items()]
        err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * n
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC: {err}: {log.decode(errors='replace')[:2000]}")
        _, size = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _check(err: Any, what: str) -> None:
    from cuda.bindings import driver as cu

    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what}: {err}")


def _function(defines: dict[str, int]) -> Any:
    """The built kernel, loaded into the current device's primary context (once per process)."""
    from cuda.bindings import driver as cu

    device = torch.cuda.current_device()
    key = (device, *sorted(defines.items()))
    with _LOCK:
        if key not in _FUNCTIONS:
            major, minor = torch.cuda.get_device_capability(device)
            cubin = build(defines, f"sm_{major}{minor}")
            torch.cuda.synchronize(device)  # the runtime makes the primary context current on this thread
            err, module = cu.cuModuleLoadData(cubin)
            _check(err, "cuModuleLoadData")
            err, fn = cu.cuModuleGetFunction(module, b"gemv_w4_mma")
            _check(err, "cuModuleGetFunction")
            _FUNCTIONS[key] = (module, fn)
        return _FUNCTIONS[key][1]


def gemv_w4_mma(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group: int,
                a: torch.Tensor, out: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0,
                gated: bool = False, residual: torch.Tensor | None = None,
                config: tuple[int, int] = CONFIGS[0]) -> torch.Tensor:
    """``kernels.gemv_w4``'s call on tensor cores: same weights, same fused stages; bf16 or float32 in and out
    (bf16 out with a residual).

    Args:
        packed, scale, zero_point, group: as ``kernels.gemv_w4`` takes them (``interleave_w4``'s words).
        a: the input, ``K`` elements; ``out``: ``N`` elements (may be ``residual`` itself).
        norm, eps, gated, residual: the fused stages, as in ``kernels.gemv_w4``.
        config: one of ``CONFIGS``.

    Returns:
        ``out``.

    Raises:
        ValueError: ``unsupported`` gives a reason, or the shapes disagree.
        RuntimeError: NVRTC or the driver refused the kernel (their message).
    """

    from phiops.serve import kernels as K

    reason = unsupported(packed, scale, zero_point, group, a, out, norm, residual)
    if reason:
        raise ValueError(f"gemv_w4_mma: {reason}")
    k = a.numel()
    K._w4_check(packed, scale, zero_point, k, group)
    n = packed.shape[0] // 2 if gated else packed.shape[0]
    if out.numel() != n or (residual is not None and residual.numel() != n):
        raise ValueError(f"gemv_w4_mma: {packed.shape[0]} weight rows, output {out.numel()}")
    pdl = K.pdl_enabled()
    fn = _function(_defines(k, group, config, zp=zero_point is not None, norm=norm is not None, gated=gated,
                            residual=residual is not None, a_f32=a.dtype == torch.float32, pdl=pdl,
                            out_f32=out.dtype == torch.float32))
    ptrs = [t.data_ptr() for t in (packed, scale, zero_point if zero_point is not None else scale, a,
                                   norm if norm is not None else a, residual if residual is not None else out, out)]
    launch(fn, -(-n // (8 if gated else 16)), 32 * -(-(k // group) // config[0]), ptrs, n, eps, pdl)
    return out


def launch(fn: Any, blocks: int, threads: int, ptrs: list[int], n: int, eps: float, pdl: bool) -> None:
    """``fn(*ptrs, n, eps)`` on the current torch stream (captured like any launch in a graph), with
    programmatic dependent launch when ``pdl``.

    Args:
        fn: a loaded kernel (``CUfunction``); blocks, threads: its grid and block sizes.
        ptrs: device pointers, in the kernel's order; n, eps: its last two arguments.

    Raises:
        RuntimeError: the driver refused the launch.
    """
    from cuda.bindings import driver as cu

    config = cu.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = blocks, 1, 1
    config.blockDimX, config.blockDimY, config.blockDimZ = threads, 1, 1
    config.sharedMemBytes = 0
    config.hStream = cu.CUstream(torch.cuda.current_stream().cuda_stream)
    if pdl:
        attr = cu.CUlaunchAttribute()
        attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        config.attrs = [attr]
        config.numAttrs = 1
    types = (ctypes.c_void_p,) * len(ptrs) + (ctypes.c_int, ctypes.c_float)
    err, = cu.cuLaunchKernelEx(config, fn, (tuple(ptrs) + (n, eps), types), 0)
    _check(err, "cuLaunchKernelEx")
