// W4A16 GEMV at batch 1 on tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate), on weights
// repacked into mma tiles (w4a16_mma_probe.pack_tiles): a second copy beside interleave_w4's.
//
// Each block takes one tile of 16 weight rows (gated: 8 gate rows over their 8 up rows, so that one
// thread holds both halves of an output) and all of K, one warp per slice of CPW chunks of 64
// columns. Lane (g, t)'s word of k-step s holds, low nibble first: A[g][2t], A[g+8][2t], A[g][2t+8],
// A[g+8][2t+8] in bits 0-15 and the same rows at 2t+1, 2t+9 in bits 16-31, and a chunk's words lie
// [lane][4]: one 16-byte load a lane, 512 contiguous bytes a warp. Three shifts and four LOP3s a word:
// (w & 0x000f000f) | 0x43004300 is the bf16 pair (128 + u_lo, 128 + u_hi), exact. The activations
// are the B operand, the same vector in all 8 of its columns, so every lane's accumulator holds its
// rows' sums; the 128 + centre offset comes off once per group through the group's sum of
// activations. Scales (and centres) are stored [tile][group][g] as bf16 pairs (row g, row g + 8).
//
// Built after phiops.serve.mma.HELPERS (types, nib2, mma, conversions), by NVRTC. Compile-time: KDIM, GROUP,
// CPW, PRE (chunks requested before the activations), NORM, GATED, RESID, ZP, A_F32, PDL.

#define NCH (KDIM / 64)
#define NG (KDIM / GROUP)
#define GPC (GROUP / 64)
#define WARPS ((NCH + CPW - 1) / CPW)
#define E (CPW * 2)
#define GPW (CPW / GPC)
#define LPG (GROUP / E)

__device__ __forceinline__ q4 ld_stream(const q4* p) {
  q4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ q4 ld_vol(const q4* p) {  // in program order with the weights' loads
  q4 r;
  asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
gemv_w4_mma(const q4* __restrict__ wq, const u32* __restrict__ sc, const u32* __restrict__ zc,
            const void* __restrict__ a_, const u16* __restrict__ gain, const u16* resid, u16* out, int N,
            float eps) {
  __shared__ q2 xs[WARPS][CPW * 4][4];
  __shared__ float sx[WARPS][GPW];
  __shared__ float red[WARPS][16];
  __shared__ float ssq[WARPS];
  __shared__ float yv[16];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, tile = blockIdx.x;
  const int g = lane >> 2, t = lane & 3;
  const int c0 = w * CPW;
  const int nch = min(CPW, NCH - c0);

  // 1. PRE chunks of this warp's weights requested first (under PDL: before the previous kernel's
  // output can be read), then the activations, then the rest of the weights: the activations'
  // loads are not queued behind the whole slice, and the first chunks land first.
  q4 q[CPW];
  const q4* wp = wq + ((size_t)tile * NCH + c0) * 32 + lane;
#pragma unroll
  for (int i = 0; i < PRE && i < CPW; ++i)
    if (i < nch) q[i] = ld_stream(wp + i * 32);
  u32 s2[GPW];
#pragma unroll
  for (int j = 0; j < GPW; ++j)
    if (j * GPC < nch) s2[j] = sc[((size_t)tile * NG + c0 / GPC + j) * 8 + g];
#if ZP
  u32 z2[GPW];
#pragma unroll
  for (int j = 0; j < GPW; ++j)
    if (j * GPC < nch) z2[j] = zc[((size_t)tile * NG + c0 / GPC + j) * 8 + g];
#endif
#if PDL
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif

  // 2. The activations of this warp's slice: lane holds E consecutive ones.
  const int kw = lane * E;            // within the slice
  const int kg = c0 * 64 + kw;        // in K
  const bool live = kw < nch * 64;
  u32 araw[A_F32 ? E : E / 2];
#if NORM
  u32 graw[E / 2];
#endif
#pragma unroll
  for (int i = 0; i < (A_F32 ? E : E / 2); ++i) araw[i] = 0u;
  if (live) {
#pragma unroll
    for (int i = 0; i < (A_F32 ? E : E / 2); i += 4) {
      const q4 v = ld_vol(((const q4*)a_) + (kg * (A_F32 ? 4 : 2) + i * 4) / 16);
      araw[i] = v.x; araw[i + 1] = v.y; araw[i + 2] = v.z; araw[i + 3] = v.w;
    }
#if NORM
#pragma unroll
    for (int i = 0; i < E / 2; i += 4) {
      const q4 v = ld_vol(((const q4*)gain) + (kg * 2 + i * 4) / 16);
      graw[i] = v.x; graw[i + 1] = v.y; graw[i + 2] = v.z; graw[i + 3] = v.w;
    }
#endif
  }
#pragma unroll
  for (int i = PRE; i < CPW; ++i)
    if (i < nch) q[i] = ld_stream(wp + i * 32);
  float ss = 0.f, gs = 0.f;
  u32 pk[E / 2];
#pragma unroll
  for (int i = 0; i < E; i += 2) {
#if A_F32
    float v0 = __int_as_float(araw[i]), v1 = __int_as_float(araw[i + 1]);
#else
    float v0 = lo_f(araw[i / 2]), v1 = hi_f(araw[i / 2]);
#endif
#if NORM
    ss += v0 * v0 + v1 * v1;
    v0 *= lo_f(graw[i / 2]); v1 *= hi_f(graw[i / 2]);
#endif
    pk[i / 2] = pack2(v0, v1);
    gs += lo_f(pk[i / 2]) + hi_f(pk[i / 2]);
  }
  // fragments: k-step s (16 columns), thread t: {x[2t], x[2t+1]}, {x[2t+8], x[2t+9]}; pair P of the
  // slice (columns 2P, 2P+1) is k-step P / 8, t = P % 4, half (P / 4) % 2
  u32* xw = (u32*)&xs[w][0][0];
#pragma unroll
  for (int p = 0; p < E / 2; ++p) {
    const int P = kw / 2 + p;
    xw[(P / 8) * 8 + (P % 4) * 2 + (P / 4) % 2] = pk[p];
  }
#pragma unroll
  for (int o = 1; o < LPG; o <<= 1) gs += __shfl_xor_sync(0xffffffffu, gs, o);
  if (lane % LPG == 0 && lane / LPG < GPW) sx[w][lane / LPG] = gs;
#if NORM
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) ssq[w] = ss;
#endif
  __syncwarp();

  // 3. Dequantize and multiply, one group at a time; scale and centre once a group.
  float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
  for (int j = 0; j < GPW; ++j) {
    if (j * GPC < nch) {
#if ZP
      const u32 cz = z2[j];
#else
      const u32 cz = 0x43084308u;  // 128 + 8, both rows
#endif
      float c[4] = {0.f, 0.f, 0.f, 0.f}, d[4] = {0.f, 0.f, 0.f, 0.f};  // two chains of mma
#pragma unroll
      for (int ci = 0; ci < GPC; ++ci) {
        const int i = j * GPC + ci;
        const u32 wd[4] = {q[i].x, q[i].y, q[i].z, q[i].w};
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          u32 x = wd[m];
          u32 a0 = nib2(x); x >>= 4;
          u32 a1 = nib2(x); x >>= 4;
          u32 a2 = nib2(x); x >>= 4;
          u32 a3 = nib2(x);
          const q2 b = xs[w][i * 4 + m][t];
          mma(m % 2 ? d : c, a0, a1, a2, a3, b.x, b.y);
        }
      }
      const float S = sx[w][j];
      acc0 += lo_f(s2[j]) * (c[0] + d[0] - lo_f(cz) * S);
      acc1 += hi_f(s2[j]) * (c[2] + d[2] - hi_f(cz) * S);
    }
  }
  if (t == 0) {
    red[w][g] = acc0;
    red[w][g + 8] = acc1;
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
