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
// (groups requested before the activations), NORM, GATED, RESID, ZP, A_F32, PDL, STAGE.

typedef unsigned int u32;
typedef unsigned short u16;
struct alignas(16) q4 { u32 x, y, z, w; };
struct alignas(8) q2 { u32 x, y; };

#define KW (KDIM / 8)
#define NG (KDIM / GROUP)
#define GW (GROUP / 8)
#define WPT (GW / 4)                       // words a thread reads of each row, each group
#define WARPS ((NG + GPW - 1) / GPW)
#define E (GPW * GROUP / 32)               // activations a lane prepares
#define LPG (GROUP / E)                    // lanes a group's activations span
// STAGE 1: the slice's 16 rows are copied into shared memory (cp.async, 16-byte pieces, each row's
// run of GPW * GROUP / 2 bytes contiguous in a warp's requests), then read from there; rows padded
// so that the lanes of one shared-memory phase meet distinct banks.
#define RUN (GPW * GROUP / 2)
#define RB (RUN + ((16 * WPT - RUN % 128) + 128) % 128)
#ifndef STAGE
#define STAGE 0
#endif

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

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

__device__ __forceinline__ void cp16(u32 dst, const void* src, bool ok) {  // 16 bytes, zeros where !ok
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}

__device__ __forceinline__ u32 ld_u32(const u32* p) {  // in program order with the weights' loads
  u32 r;
  asm volatile("ld.global.u32 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
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
__device__ __forceinline__ u16 f_bf(float v) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
  return r;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
gemv_w4_mma(const u32* __restrict__ wq, const u16* __restrict__ sc, const u32* __restrict__ zc,
            const void* __restrict__ a_, const u16* __restrict__ gain, const u16* resid, u16* out, int N,
            float eps) {
  // B fragments: [warp][group][t][word][step] -> {b0, b1}
  __shared__ q2 xs[WARPS][GPW][4][WPT][2];
  __shared__ float sx[WARPS][GPW];
  __shared__ float red[WARPS][16];
  __shared__ float ssq[WARPS];
  __shared__ float yv[16];
#if STAGE
  __shared__ alignas(16) unsigned char wst[WARPS][16][RB];
#endif
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, tile = blockIdx.x;
  const int g = lane >> 2, t = lane & 3;
  const int j0 = w * GPW;                        // this warp's first group
  const int ng = min(GPW, NG - j0);              // its groups
#if GATED
  const int row_lo = tile * 8 + g, row_hi = N + tile * 8 + g;
  const bool ok_lo = tile * 8 + g < N, ok_hi = ok_lo;
#else
  const int row_lo = tile * 16 + g, row_hi = tile * 16 + 8 + g;
  const bool ok_lo = row_lo < N, ok_hi = row_hi < N;
#endif

  // 1. PRE groups of this warp's weights first (under PDL: before the previous kernel's output can
  // be read), the scales and centres, then the activations, then the rest of the weights.
#if STAGE
  // piece p of row r (r < 8: row g = r of the low half; else the high half), within [p0, p1)
  auto stage = [&](int p0, int p1) {
    const int per = (p1 - p0);
#pragma unroll
    for (int i = 0; i < (16 * (GPW * GROUP / 32) + 31) / 32; ++i) {
      const int idx = i * 32 + lane;
      if (idx < 16 * per) {
        const int r = idx / per, pc = p0 + idx % per;
        const int grow = r < 8 ? (GATED ? tile * 8 + r : tile * 16 + r) : (GATED ? N + tile * 8 + r - 8 : tile * 16 + r);
        const bool ok = (GATED ? tile * 8 + (r % 8) : grow) < N && pc * 4 < ng * GW;
        const u32* src = wq + (size_t)(ok ? grow : 0) * KW + j0 * GW + (ok ? pc * 4 : 0);
        cp16(smem_addr(&wst[w][r][pc * 16]), src, ok);
      }
    }
    asm volatile("cp.async.commit_group;");
  };
  stage(0, min(PRE, GPW) * (GROUP / 32));
#else
  u32 qlo[GPW][WPT], qhi[GPW][WPT];
  const u32* plo = wq + (size_t)row_lo * KW + j0 * GW + t * WPT;
  const u32* phi = wq + (size_t)row_hi * KW + j0 * GW + t * WPT;
#pragma unroll
  for (int j = 0; j < GPW; ++j)
#pragma unroll
    for (int i = 0; i < WPT; ++i) qlo[j][i] = qhi[j][i] = 0u;
#pragma unroll
  for (int j = 0; j < PRE && j < GPW; ++j)
    if (j < ng) {
      if (ok_lo) ld_words<WPT>(qlo[j], plo + j * GW);
      if (ok_hi) ld_words<WPT>(qhi[j], phi + j * GW);
    }
#endif
  float s_lo[GPW], s_hi[GPW], c_lo[GPW], c_hi[GPW];
#pragma unroll
  for (int j = 0; j < GPW; ++j) {
    s_lo[j] = s_hi[j] = 0.f;
    c_lo[j] = c_hi[j] = 136.f;  // 128 + 8: symmetric
    if (j < ng) {
      if (ok_lo) s_lo[j] = bf_f(sc[(size_t)row_lo * NG + j0 + j]);
      if (ok_hi) s_hi[j] = bf_f(sc[(size_t)row_hi * NG + j0 + j]);
#if ZP
      if (ok_lo) c_lo[j] = 128.f + (float)((zc[(size_t)(row_lo / 8) * NG + j0 + j] >> (4 * (row_lo % 8))) & 15u);
      if (ok_hi) c_hi[j] = 128.f + (float)((zc[(size_t)(row_hi / 8) * NG + j0 + j] >> (4 * (row_hi % 8))) & 15u);
#endif
    }
  }
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
#pragma unroll
    for (int i = 0; i < AW; ++i) araw[i] = ld_u32((const u32*)a_ + (A_F32 ? kg : kg / 2) + i);
#if NORM
#pragma unroll
    for (int i = 0; i < E / 2; ++i) graw[i] = ld_u32((const u32*)gain + kg / 2 + i);
#endif
  }
#if STAGE
  if (PRE < GPW) stage(PRE * (GROUP / 32), GPW * (GROUP / 32));
#else
#pragma unroll
  for (int j = PRE; j < GPW; ++j)
    if (j < ng) {
      if (ok_lo) ld_words<WPT>(qlo[j], plo + j * GW);
      if (ok_hi) ld_words<WPT>(qhi[j], phi + j * GW);
    }
#endif
  float ss = 0.f, gs = 0.f;
  u16* xh = (u16*)&xs[w][0][0][0][0];
#pragma unroll
  for (int e = 0; e < E; ++e) {
#if A_F32
    float v = __int_as_float(araw[e]);
#else
    float v = (e % 2) ? hi_f(araw[e / 2]) : lo_f(araw[e / 2]);
#endif
#if NORM
    ss += v * v;
    v *= (e % 2) ? hi_f(graw[e / 2]) : lo_f(graw[e / 2]);
#endif
    const u16 vb = f_bf(v);
    gs += bf_f(vb);
    // column c of the slice: group jl, word wi = cc % GW (lane t = wi / WPT, word i = wi % WPT),
    // nibble n = cc / GW: step n % 4 / 2, b0 or b1 by n % 2, low or high half by n / 4
    const int c = kw + e, jl = c / GROUP, cc = c % GROUP, wi = cc % GW, n = cc / GW;
    xh[((((jl * 4 + wi / WPT) * WPT + wi % WPT) * 2 + (n % 4) / 2) * 2 + (n % 2)) * 2 + n / 4] = vb;
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
#if STAGE
    if (j == 0 || j == PRE) {  // the stage holding group j has landed (every lane's pieces)
      if (j == 0 && PRE < GPW) asm volatile("cp.async.wait_group 1;" ::: "memory");
      else asm volatile("cp.async.wait_group 0;" ::: "memory");
      __syncwarp();
    }
    u32 qlo_j[WPT], qhi_j[WPT];
#pragma unroll
    for (int i = 0; i < WPT; ++i) {
      qlo_j[i] = *(const u32*)&wst[w][g][j * (GROUP / 2) + (t * WPT + i) * 4];
      qhi_j[i] = *(const u32*)&wst[w][g + 8][j * (GROUP / 2) + (t * WPT + i) * 4];
    }
#define QLO(j, i) qlo_j[i]
#define QHI(j, i) qhi_j[i]
#else
#define QLO(j, i) qlo[j][i]
#define QHI(j, i) qhi[j][i]
#endif
    if (j < ng) {
      float c[4] = {0.f, 0.f, 0.f, 0.f}, d[4] = {0.f, 0.f, 0.f, 0.f};  // two chains of mma
#pragma unroll
      for (int i = 0; i < WPT; ++i) {
        u32 wl = QLO(j, i), wh = QHI(j, i);
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
      out[n] = f_bf(gt / (1.f + __expf(-gt)) * up);
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
      out[n] = f_bf(o);
    }
  }
#endif
}
