"""Triton kernels for batch-1 decoding of llama-family decoders (Llama, SmolLM2, Phi-3, Phi-4-mini).

One decode step of such a model reads every weight once, so its speed is set by how close the
weight reads come to the memory bandwidth, and by how little else runs between them. Five
kernels per layer, each streaming one weight matrix with the step's small work fused around it:

- ``gemv``: ``y = W @ a`` for a ``[N, K]`` row-major weight, fp32 accumulation, with optional
  fused stages: an RMSNorm of the input (``NORM``: ``W @ (g * a) * rsqrt(mean(a^2) + eps)``,
  the norm's scalar applied once per row, so the normalized vector is never written), a
  SiLU-gated pair of row blocks (``GATED``: rows ``[0, N)`` are the gate and ``[N, 2N)`` the up
  projection, output ``silu(gate) * up``), and a residual add (``RESIDUAL``: ``y += r``, in place
  on the residual stream);
- ``decode_attention``: rotary embedding of the new query and key, the new key and value written
  into the static cache at the step's position, and attention over the cache, split over the
  sequence (flash-decoding) so that a short sequence still spreads over the GPU;
- ``combine``: the splits' partial softmax sums merged into the attention output (launched only
  when there is more than one split);
- ``gemv_w4`` / ``matmul_w4``: the GEMV (same fused stages) and a small-M matmul over W4A16 weights in
  compressed-tensors' packing, dequantized in registers (section at the end).

The position is read from a device tensor, so a CUDA graph of the whole step replays for every
token. On Hopper the kernels are chained by programmatic dependent launch (``pdl_enabled``). Everything runs under Triton's interpreter on CPU (``TRITON_INTERPRET=1``), which is how
the tests check the kernels against the transformers forward on machines without a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"  # where the kernels' tensors live


def pdl_enabled() -> bool:
    """Programmatic dependent launch: Hopper and later, on unless ``PHIOPS_PDL=0``.

    Each kernel lets the next one start as soon as all its programs are running; the next one
    streams its first weight tile while this one finishes, and waits (``gdc_wait``) before it
    reads anything a previous kernel wrote. Inside the step's CUDA graph this hides most of the
    ramp-up and tail of ~200 back-to-back kernels.
    """
    return (not INTERPRET and os.environ.get("PHIOPS_PDL", "1") != "0" and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (9, 0))


# bf16 GEMV launch configs: (rows a program, columns a tile, warps)
GEMV_CONFIGS = [(1, 1024, 4), (2, 1024, 4), (2, 2048, 8), (4, 512, 4), (4, 1024, 4), (4, 1024, 8),
                (8, 256, 4), (8, 512, 4), (8, 512, 8), (16, 256, 8), (16, 512, 8)]
GEMV_INTERPRET_CONFIG = (128, 128, 4)  # one config: the interpreter has no timing to tune on
# Configs that request all of a K of up to 4 tiles before waiting for the previous kernel:
# (rows, columns, warps, tiles before the wait). For the GEMV after a latency-bound kernel (o_proj
# after attention): its weights stream while attention runs, instead of one tile of them.
GEMV_PRELOAD_CONFIGS = [(2, 1024, 4, 4), (4, 1024, 4, 4), (8, 1024, 4, 4), (8, 1024, 8, 4), (16, 1024, 8, 4),
                        (4, 2048, 8, 4), (8, 512, 4, 4)]
GEMV_INTERPRET_PRELOAD_CONFIG = (128, 32, 4, 4)  # the tests' K of 200: four tiles before the wait, three after


def gemv_candidates(preload: bool = False) -> list[tuple[int, ...]]:
    """The launch configs ``gemv(config=...)`` takes here (``FusedDecoder._tune`` times them);
    ``preload``: those requesting up to four tiles before the wait instead."""
    if INTERPRET:
        return [GEMV_INTERPRET_PRELOAD_CONFIG if preload else GEMV_INTERPRET_CONFIG]
    return GEMV_PRELOAD_CONFIGS if preload else GEMV_CONFIGS


def _gemv_configs() -> list[Any]:
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in gemv_candidates()]


@triton.jit
def _gemv_tile(w_ptr, rows, rmask, N, K: tl.constexpr, k0: tl.constexpr, GATED: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """One ``[BLOCK_N, BLOCK_K]`` tile of the weight (and of its up rows when ``GATED``) from column ``k0``."""
    cols = k0 + tl.arange(0, BLOCK_K)
    wmask = rmask[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=wmask, other=0.0, eviction_policy="evict_first")
    u = w
    if GATED:
        u = tl.load(w_ptr + (rows[:, None] + N) * K + cols[None, :], mask=wmask, other=0.0,
                    eviction_policy="evict_first")
    return w, u


@triton.jit
def _gemv_acc(w, u, a_ptr, g_ptr, acc, acc_up, sumsq, K: tl.constexpr, k0: tl.constexpr, NORM: tl.constexpr,
              GATED: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc += w * a`` (and ``acc_up += u * a``) over one tile's columns; the norm's sum of squares."""
    cols = k0 + tl.arange(0, BLOCK_K)
    cmask = cols < K
    a = tl.load(a_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if NORM:
        sumsq += a * a
        a = a * tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc += w.to(tl.float32) * a[None, :]
    if GATED:
        acc_up += u.to(tl.float32) * a[None, :]
    return acc, acc_up, sumsq


@triton.jit
def _gemv_kernel(w_ptr, a_ptr, g_ptr, r_ptr, out_ptr, N, eps,
                 K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
                 PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRE: tl.constexpr = 1):
    """``PRE`` (1-4) tiles of weights requested before, under PDL, waiting for the previous kernel
    (whose output, the activations, is read only after); the rest of K tile after tile."""
    if PDL:
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
    NT: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    P: tl.constexpr = PRE if PRE < NT else NT  # tiles in flight before the wait
    # Weights first: they do not depend on the previous kernel.
    w0, u0 = _gemv_tile(w_ptr, rows, rmask, N, K, 0, GATED, BLOCK_K)
    if P > 1:
        w1, u1 = _gemv_tile(w_ptr, rows, rmask, N, K, BLOCK_K, GATED, BLOCK_K)
    if P > 2:
        w2, u2 = _gemv_tile(w_ptr, rows, rmask, N, K, 2 * BLOCK_K, GATED, BLOCK_K)
    if P > 3:
        w3, u3 = _gemv_tile(w_ptr, rows, rmask, N, K, 3 * BLOCK_K, GATED, BLOCK_K)
    if PDL:
        gdc_wait()
    acc, acc_up, sumsq = _gemv_acc(w0, u0, a_ptr, g_ptr, acc, acc_up, sumsq, K, 0, NORM, GATED, BLOCK_K)
    if P > 1:
        acc, acc_up, sumsq = _gemv_acc(w1, u1, a_ptr, g_ptr, acc, acc_up, sumsq, K, BLOCK_K, NORM, GATED, BLOCK_K)
    if P > 2:
        acc, acc_up, sumsq = _gemv_acc(w2, u2, a_ptr, g_ptr, acc, acc_up, sumsq, K, 2 * BLOCK_K, NORM, GATED,
                                       BLOCK_K)
    if P > 3:
        acc, acc_up, sumsq = _gemv_acc(w3, u3, a_ptr, g_ptr, acc, acc_up, sumsq, K, 3 * BLOCK_K, NORM, GATED,
                                       BLOCK_K)
    # K is a compile-time constant: the loop unrolls and the weight loads can all be in flight.
    for k0 in tl.static_range(P * BLOCK_K, K, BLOCK_K):
        w, u = _gemv_tile(w_ptr, rows, rmask, N, K, k0, GATED, BLOCK_K)
        acc, acc_up, sumsq = _gemv_acc(w, u, a_ptr, g_ptr, acc, acc_up, sumsq, K, k0, NORM, GATED, BLOCK_K)
    y = tl.sum(acc, axis=1)
    if NORM:
        scale = tl.rsqrt(tl.sum(sumsq, axis=0) / K + eps)
        y = y * scale
    if GATED:
        up = tl.sum(acc_up, axis=1)
        if NORM:
            up = up * scale
        y = y * tl.sigmoid(y) * up
    if RESIDUAL:
        y += tl.load(r_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


_gemv = triton.autotune(configs=_gemv_configs(), key=["N", "K", "NORM", "GATED", "RESIDUAL"],
                        restore_value=["out_ptr"])(_gemv_kernel)


def gemv(w: torch.Tensor, a: torch.Tensor, out: torch.Tensor, *, norm: torch.Tensor | None = None,
         eps: float = 0.0, gated: bool = False, residual: torch.Tensor | None = None,
         config: tuple[int, ...] | None = None) -> torch.Tensor:
    """``out = W @ a`` with the fused stages of the module doc; ``w`` is ``[N, K]`` (``[2N, K]`` gated).

    ``residual`` may be ``out`` itself (each output row is read, then written, by one program).
    ``config``: (rows a program, columns a tile, warps[, tiles requested before the wait, 1-4]),
    one of ``gemv_candidates()``; None: Triton's autotuner picks per shape.
    """
    rows, k = w.shape
    n = rows // 2 if gated else rows
    if not (w.is_contiguous() and a.numel() == k and out.numel() == n):
        raise ValueError(f"gemv: weight {tuple(w.shape)}, input {a.numel()}, output {out.numel()} do not agree")
    pdl = pdl_enabled()
    args = (w, a, norm if norm is not None else a, residual if residual is not None else out, out, n, eps)
    meta = dict(K=k, NORM=norm is not None, GATED=gated, RESIDUAL=residual is not None, PDL=pdl,
                **({"launch_pdl": True} if pdl else {}))
    if config is None:
        _gemv[lambda m: (triton.cdiv(n, m["BLOCK_N"]),)](*args, **meta)
    else:
        block_n, block_k, warps, *pre = config
        _gemv_kernel[(triton.cdiv(n, block_n),)](*args, **meta, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                                                 PRE=pre[0] if pre else 1)
    return out


@triton.jit
def _rotated_query(qkv_ptr, cos_ptr, sin_ptr, pos, kvh, sm_scale, HQ: tl.constexpr, HKV: tl.constexpr,
                   D: tl.constexpr, ROT: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """The decode attention kernels' common start, for key/value head ``kvh`` of one row at ``pos``:
    the head dims (``d``, ``dmask``), each dim's rotary partner and sign and the position's cos and sin
    (for the key), and the head's query heads (``qh``, ``gmask``, ``qmask``) with their queries
    rotated and scaled by ``sm_scale * log2(e)`` (the kernels' softmax is in exp2)."""
    GROUP: tl.constexpr = HQ // HKV
    HALF: tl.constexpr = ROT // 2
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    # rotate_half within the first ROT dims (transformers' convention), the rest passes through
    partner = tl.where(d < HALF, d + HALF, tl.where(d < ROT, d - HALF, d))
    sign = tl.where(d < HALF, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * D + d, mask=dmask, other=1.0)
    sin = tl.load(sin_ptr + pos * D + d, mask=dmask, other=0.0)
    g = tl.arange(0, GROUP_P)
    gmask = g < GROUP
    qh = kvh * GROUP + g  # this program's query heads
    qmask = gmask[:, None] & dmask[None, :]
    q = tl.load(qkv_ptr + qh[:, None] * D + d[None, :], mask=qmask, other=0.0).to(tl.float32)
    q_rot = tl.load(qkv_ptr + qh[:, None] * D + partner[None, :], mask=qmask, other=0.0).to(tl.float32)
    q = (q * cos[None, :] + q_rot * sign[None, :] * sin[None, :]) * (sm_scale * 1.4426950408889634)
    return d, dmask, partner, sign, cos, sin, gmask, qh, qmask, q


L2_LINE = 128  # bytes an L2 prefetch brings


@triton.jit
def _l2_prefetch(ptr, lines, pid, nprog, BLOCK: tl.constexpr):
    """This program's share of ``lines`` 128-byte lines from ``ptr`` requested into the L2
    (PTX ``prefetch.global.L2::evict_last``: nothing comes back to registers, nothing waits)."""
    base = ptr.to(tl.pointer_type(tl.int8))
    per = tl.cdiv(lines, nprog)
    for j in range(0, per, BLOCK):
        line = tl.minimum(pid * per + j + tl.arange(0, BLOCK), lines - 1).to(tl.int64)
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                  [base + line * 128], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _decode_attention(qkv_ptr, k_cache, v_cache, pos_ptr, cos_ptr, sin_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr,
                      sm_scale, MAX_LEN, pf0_ptr, pf0_lines, pf1_ptr, pf1_lines,
                      CHUNK: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                      GROUP_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                      SPLITS: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr = 0):
    """One program per (key/value head, sequence split, batch row); it serves the head's GROUP query heads.

    The cache is ``[rows, HKV, MAX_LEN, D]``, row ``r`` its own (a paged pool: ``_paged_attention``).
    ``PREFETCH`` (0-2): regions (``pf*_ptr``, ``pf*_lines`` lines of 128 bytes) the programs request
    into the L2 first, before the wait: the next kernels' weights, streamed while attention's
    latency-bound work leaves the memory bus idle.
    """
    if PDL:
        gdc_launch_dependents()
    if PREFETCH > 0:
        pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
        nprog = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
        _l2_prefetch(pf0_ptr, pf0_lines, pid, nprog, 64)
        if PREFETCH > 1:
            _l2_prefetch(pf1_ptr, pf1_lines, pid, nprog, 64)
    if PDL:
        gdc_wait()
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    qkv_ptr += row * ((HQ + 2 * HKV) * D)
    pos = tl.load(pos_ptr + row)
    d, dmask, partner, sign, cos, sin, gmask, qh, qmask, q = _rotated_query(
        qkv_ptr, cos_ptr, sin_ptr, pos, kvh, sm_scale, HQ, HKV, D, ROT, GROUP_P, BLOCK_D)

    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, pos + 1)
    head_off = (row * HKV + kvh) * MAX_LEN * D
    new_off = head_off + pos * D
    if (pos >= lo) & (pos < lo + CHUNK):  # this split holds the new position: write its key and value
        k_base = qkv_ptr + (HQ + kvh) * D
        k = tl.load(k_base + d, mask=dmask, other=0.0).to(tl.float32)
        k_rot = tl.load(k_base + partner, mask=dmask, other=0.0).to(tl.float32)
        k = k * cos + k_rot * sign * sin
        v = tl.load(qkv_ptr + (HQ + HKV + kvh) * D + d, mask=dmask, other=0.0)
        tl.store(k_cache + new_off + d, k.to(k_cache.dtype.element_ty), mask=dmask)
        tl.store(v_cache + new_off + d, v, mask=dmask)
    tl.debug_barrier()  # the program's own writes above are read back in the loop below

    m = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GROUP_P], dtype=tl.float32)
    acc = tl.zeros([GROUP_P, BLOCK_D], dtype=tl.float32)
    # A fixed trip count, blocks past the position skipped: the loop bound is known at compile time.
    for i in range(0, CHUNK, BLOCK_T):
        if lo + i < hi:
            t = lo + i + tl.arange(0, BLOCK_T)
            tmask = t < hi
            kvmask = tmask[:, None] & dmask[None, :]
            offs = head_off + t[:, None] * D + d[None, :]
            kb = tl.load(k_cache + offs, mask=kvmask, other=0.0).to(tl.float32)
            vb = tl.load(v_cache + offs, mask=kvmask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * kb[None, :, :], axis=2)  # [GROUP_P, BLOCK_T], in log2 units
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], axis=1)
            m = m_new
    qh += row * HQ  # the output and partials are [rows, HQ, ...]
    if SPLITS == 1:
        tl.store(out_ptr + qh[:, None] * D + d[None, :], (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=qmask)
    else:  # unnormalized partials; an empty split leaves m = -inf, l = 0, acc = 0, which weigh nothing
        part = qh * SPLITS + split
        tl.store(po_ptr + part[:, None] * D + d[None, :], acc, mask=qmask)
        tl.store(pm_ptr + part, m, mask=gmask)
        tl.store(pl_ptr + part, l, mask=gmask)


@triton.jit
def _paged_attention(qkv_ptr, k_cache, v_cache, pos_ptr, cos_ptr, sin_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr,
                     table_ptr, sm_scale, TW, CHUNK: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr,
                     D: tl.constexpr, ROT: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_D: tl.constexpr,
                     PAGE: tl.constexpr, SPLITS: tl.constexpr, STAGES: tl.constexpr, DOT_F32: tl.constexpr,
                     PDL: tl.constexpr):
    """Decode attention of batch rows over a paged pool, on tensor cores; one program per (key/value
    head, sequence split, row), serving the head's query heads (padded to ``GROUP_P`` >= 16 rows of a dot).

    The cache is ``[pages, HKV, PAGE, D]``; row ``r``'s position ``t`` lies in page ``table[r, t // PAGE]``.
    The new position's key and value are written to the cache and also taken from registers: the
    loop reads only the positions before it (no read-back of this program's own write), page by page,
    the scores and the weighted values as two ``tl.dot`` per page, which lets Triton pipeline the page
    loads (``STAGES``). The scores of one query head are those of ``_decode_attention`` (the same
    online softmax in log2 units); the dots take the query and the probabilities in the cache's dtype,
    as flash attention does (``DOT_F32``: in float32, for float32 caches and the interpreter).
    """
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    qkv_ptr += row * ((HQ + 2 * HKV) * D)
    table_ptr += row * TW
    pos = tl.load(pos_ptr + row)
    d, dmask, partner, sign, cos, sin, gmask, qh, qmask, q = _rotated_query(
        qkv_ptr, cos_ptr, sin_ptr, pos, kvh, sm_scale, HQ, HKV, D, ROT, GROUP_P, BLOCK_D)
    k_base = qkv_ptr + (HQ + kvh) * D
    k_new = tl.load(k_base + d, mask=dmask, other=0.0).to(tl.float32)
    k_new = k_new * cos + tl.load(k_base + partner, mask=dmask, other=0.0).to(tl.float32) * sign * sin
    v_new = tl.load(qkv_ptr + (HQ + HKV + kvh) * D + d, mask=dmask, other=0.0)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, pos)  # cached positions this split reads (the new one apart)
    mine = (pos >= lo) & (pos < lo + CHUNK)  # this split holds the new position
    if mine:
        new_off = (tl.load(table_ptr + pos // PAGE) * HKV + kvh) * (PAGE * D) + (pos % PAGE) * D
        tl.store(k_cache + new_off + d, k_new.to(k_cache.dtype.element_ty), mask=dmask)
        tl.store(v_cache + new_off + d, v_new, mask=dmask)

    m = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GROUP_P], dtype=tl.float32)
    acc = tl.zeros([GROUP_P, BLOCK_D], dtype=tl.float32)
    t_in = tl.arange(0, PAGE)
    qd = q if DOT_F32 else q.to(k_cache.dtype.element_ty)
    for blk in tl.range(lo // PAGE, tl.cdiv(hi, PAGE), num_stages=STAGES):
        page = tl.load(table_ptr + blk)
        offs = (page * HKV + kvh) * (PAGE * D) + t_in[:, None] * D + d[None, :]
        tmask = blk * PAGE + t_in < hi
        kb = tl.load(k_cache + offs, mask=tmask[:, None] & dmask[None, :], other=0.0)
        vb = tl.load(v_cache + offs, mask=tmask[:, None] & dmask[None, :], other=0.0)
        if DOT_F32:
            s = tl.dot(qd, tl.trans(kb.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(qd, tl.trans(kb))  # [GROUP_P, PAGE], log2 units
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            acc = tl.dot(p, vb.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(vb.dtype), vb, acc * alpha[:, None])
        m = m_new
    if mine:  # the new position, from registers
        s_new = tl.sum(q * k_new[None, :], axis=1)
        m_new = tl.maximum(m, s_new)
        alpha = tl.exp2(m - m_new)
        p_new = tl.exp2(s_new - m_new)
        l = l * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        m = m_new
    qh += row * HQ
    if SPLITS == 1:
        tl.store(out_ptr + qh[:, None] * D + d[None, :], (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=qmask)
    else:
        part = qh * SPLITS + split
        tl.store(po_ptr + part[:, None] * D + d[None, :], acc, mask=qmask)
        tl.store(pm_ptr + part, m, mask=gmask)
        tl.store(pl_ptr + part, l, mask=gmask)


@triton.jit
def _combine(po_ptr, pm_ptr, pl_ptr, out_ptr, D: tl.constexpr, SPLITS: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    h = tl.program_id(0)  # row * HQ + query head
    s = tl.arange(0, BLOCK_S)
    smask = s < SPLITS
    d = tl.arange(0, BLOCK_D)
    m = tl.load(pm_ptr + h * SPLITS + s, mask=smask, other=float("-inf"))
    w = tl.exp2(m - tl.max(m, axis=0))
    l = tl.sum(tl.load(pl_ptr + h * SPLITS + s, mask=smask, other=0.0) * w, axis=0)
    o = tl.load(po_ptr + (h * SPLITS + s)[:, None] * D + d[None, :], mask=smask[:, None] & (d < D)[None, :], other=0.0)
    tl.store(out_ptr + h * D + d, (tl.sum(o * w[:, None], axis=0) / l).to(out_ptr.dtype.element_ty), mask=d < D)


class Attention:
    """Launches decode attention for a fixed cache size and row count; the partial buffers are allocated once.

    ``rows``: batch rows a call serves (``qkv`` ``[rows, (HQ + 2 HKV) D]``, ``pos`` ``[rows]``, ``out``
    ``[rows, HQ D]``). ``page``: the positions a page of a paged pool holds (``__call__``'s ``table``;
    ``_paged_attention``), None for a contiguous ``[rows, HKV, max_len, D]`` cache (``_decode_attention``);
    ``max_len`` is then the positions a row's table can address.
    """

    # Launch settings from bench/decode_kernels.py --attention-sweep (bench/results/
    # decode_attention_sweep_h200.json): 2 warps and 32-position blocks were fastest at every
    # length tried (cache 392, 1152, 2047), and 32 splits or fewer per head.
    BLOCK_T, NUM_WARPS, MAX_SPLITS = 32, 2, 32
    # With several rows, split a row's sequence only until the launch has about this many programs:
    # each (key/value head, row) is already one, and a split adds a combine over the partials.
    FILL_PROGRAMS = 1024
    # The paged kernel (two tensor-core dots a page, its page loads pipelined): bench/batched_step.py.
    # Phi-3-mini at 32 rows of 192 tokens, one H200: 29 us a layer with 2 warps (2.6 TB/s of keys and
    # values), 34 with 4; the stages 3 and 4 alike; one split (more added a combine and no speed).
    PAGED_WARPS, PAGED_STAGES = 2, 3

    def __init__(self, *, heads: int, kv_heads: int, head_dim: int, rotary_dim: int, max_len: int,
                 scaling: float, device: Any, chunk: int | None = None, block_t: int | None = None,
                 num_warps: int | None = None, rows: int = 1, page: int | None = None,
                 stages: int | None = None) -> None:
        if heads % kv_heads or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"unsupported attention shape: {heads} heads, {kv_heads} kv heads, "
                             f"head_dim {head_dim}, rotary {rotary_dim}")
        if page is not None and (page < 16 or page & (page - 1) or max_len % page):
            raise ValueError(f"page {page}: a power of two of at least 16 that divides max_len {max_len}")
        self.hq, self.hkv, self.d, self.rot, self.max_len, self.scaling = (heads, kv_heads, head_dim, rotary_dim,
                                                                           max_len, scaling)
        self.rows, self.page = rows, page
        # Splits: enough programs to fill the GPU for a short sequence, each scanning at most `chunk`.
        splits = self.MAX_SPLITS if rows == 1 else max(1, min(self.MAX_SPLITS, self.FILL_PROGRAMS // (kv_heads * rows)))
        smallest = page or self.BLOCK_T
        self.chunk = chunk or max(smallest, triton.next_power_of_2(triton.cdiv(max_len, splits)))
        if page is not None and self.chunk % page:
            raise ValueError(f"chunk {self.chunk}: a paged cache's splits are whole pages of {page}")
        self.splits = triton.cdiv(max_len, self.chunk)
        self.block_t = page or block_t or min(self.BLOCK_T, triton.next_power_of_2(self.chunk))
        self.num_warps = num_warps or (self.PAGED_WARPS if page else self.NUM_WARPS)
        self.stages = stages or self.PAGED_STAGES
        n = rows * heads * self.splits
        self.po = torch.empty((n, head_dim), dtype=torch.float32, device=device)
        self.pm = torch.empty((n,), dtype=torch.float32, device=device)
        self.pl = torch.empty((n,), dtype=torch.float32, device=device)

    def __call__(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
                 table: torch.Tensor | None = None, prefetch: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """``prefetch``: up to two contiguous CUDA tensors (the next GEMVs' weights) the unpaged
        kernel requests into the L2 before it waits for ``qkv``; ignored by the interpreter."""
        if (table is None) != (self.page is None):
            raise ValueError("a page table goes with a paged cache (Attention(page=...)), and only with one")
        if len(prefetch) > 2 or (prefetch and table is not None):
            raise ValueError("prefetch: up to two tensors, for the unpaged kernel")
        pf = [] if INTERPRET else [(t, triton.cdiv(t.numel() * t.element_size(), L2_LINE)) for t in prefetch]
        regions = [x for t, lines in pf for x in (t, lines)] + [qkv, 1] * (2 - len(pf))
        block_d = triton.next_power_of_2(self.d)
        pdl = pdl_enabled()
        launch = {"launch_pdl": True} if pdl else {}
        group_p = triton.next_power_of_2(self.hq // self.hkv)
        if table is None:
            _decode_attention[(self.hkv, self.splits, self.rows)](
                qkv, k_cache, v_cache, pos, cos, sin, out, self.po, self.pm, self.pl, self.scaling, self.max_len,
                *regions, CHUNK=self.chunk, HQ=self.hq, HKV=self.hkv, D=self.d, ROT=self.rot, GROUP_P=group_p,
                BLOCK_D=block_d, BLOCK_T=self.block_t, SPLITS=self.splits, PDL=pdl, PREFETCH=len(pf),
                num_warps=self.num_warps, **launch)
        else:
            # float32 caches (and the interpreter, which multiplies bf16 dot operands as raw bits) dot in float32
            _paged_attention[(self.hkv, self.splits, self.rows)](
                qkv, k_cache, v_cache, pos, cos, sin, out, self.po, self.pm, self.pl, table, self.scaling,
                table.shape[1], CHUNK=self.chunk, HQ=self.hq, HKV=self.hkv, D=self.d, ROT=self.rot,
                GROUP_P=max(16, group_p), BLOCK_D=max(16, block_d), PAGE=self.page, SPLITS=self.splits,
                STAGES=self.stages, DOT_F32=INTERPRET or k_cache.dtype == torch.float32, PDL=pdl,
                num_warps=self.num_warps, **launch)
        if self.splits > 1:
            _combine[(self.rows * self.hq,)](self.po, self.pm, self.pl, out, D=self.d, SPLITS=self.splits,
                                             BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(self.splits), PDL=pdl,
                                             num_warps=4, **launch)
        return out


# ---- the batched step's elementwise work (phiops.serve.paged) ------------------------------------
#
# A batched decode step's matmuls go to cuBLAS (or ``matmul_w4``); what lies between them is one
# kernel each here instead of the ~8 PyTorch ops of an RMSNorm and 2 of a SiLU gating, each
# rounded as transformers' Llama/Phi-3 modules round (float32 inside, the model's dtype out).


@triton.jit
def _rms_norm(x_ptr, w_ptr, out_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < N
    x = tl.load(x_ptr + row * N + c, mask=m, other=0.0).to(tl.float32)
    y = (x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)).to(out_ptr.dtype.element_ty)  # hidden.to(input_dtype)
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    tl.store(out_ptr + row * N + c, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """``out = weight * (x * rsqrt(mean(x^2) + eps))`` per row of a contiguous ``[rows, N]`` ``x``."""
    rows, n = x.shape
    _rms_norm[(rows,)](x, weight, out, eps, N=n, BLOCK=triton.next_power_of_2(n), num_warps=8 if n > 2048 else 4)
    return out


@triton.jit
def _silu_mul(gu_ptr, out_ptr, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < I
    g = tl.load(gu_ptr + row * 2 * I + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * I + I + c, mask=m, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * I + c, (s * u).to(out_ptr.dtype.element_ty), mask=m)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = silu(gate) * up`` for ``gate_up`` ``[rows, 2 I]`` (gate first, as the fused weights are)."""
    rows, two_i = gate_up.shape
    block = 1024
    _silu_mul[(rows, triton.cdiv(two_i // 2, block))](gate_up, out, I=two_i // 2, BLOCK=block, num_warps=4)
    return out


# ---- W4A16: the same GEMV over packed int4 weights -------------------------------------------------
#
# compressed-tensors' pack-quantized layout, as llm-compressor writes it: ``weight_packed`` int32
# ``[N, K / 8]``, input column ``k`` in word ``k // 8`` at bits ``4 * (k % 8)`` (low nibble first) as
# the unsigned code ``u = q + 8``; ``weight_scale`` ``[N, K / G]``; asymmetric schemes add
# ``weight_zero_point``, int32 ``[ceil(N / 8), K / G]``, packed the same way along the *output* dim.
# The weight is ``(q - z) * s = (u - 8 - z) * s``.
#
# ``interleave_w4`` repacks the weights once at load, int4-sized still: within each group of ``G``
# columns, word ``w`` (of ``G / 8``) holds columns ``w, w + G/8, ..., w + 7 G/8``. Then nibble ``j``
# of a tile's words meets a contiguous run of activations (one vector load per nibble position,
# shared by the thread's rows), and each word lies in one group (one scale per word).
#
# A batch-1 GEMV at 4.8 TB/s leaves little ALU time per weight (~10^13 weights/s against ~3.3 * 10^13
# fp32 lane-instructions/s on an H200), so each weight gets two instructions:
#   1. ``word & (15 << e)``: one LOP3 leaves the code where it sits, at bit ``e`` (nibbles 0-4 of the
#      word; 5-7 of ``word >> 12``, so that ``e <= 16``), which read as a float is the denormal
#      ``u * 2^(e - 149)``: exact, with no int->float convert (a quarter-rate instruction) and no
#      subtract (OR-ing the code into 2^23's mantissa, the usual trick, costs that FADD, and its OR
#      and AND do not merge into one LOP3 when both masks are immediates);
#   2. an FMA with the activation lifted by ``2^(80 - e)`` (once per column, shared by the thread's
#      rows), so each product is ``u * a * 2^-69``, a normal float for any activation above ~1e-17
#      and far from overflow. Triton's FMAs keep denormals (PTX ``fma.rn.f32``, no ``.ftz``).
# The scale and the centre ``8 + z`` are applied once per four words (one group), through the sums of the
# activations: ``sum_k (u_k - c) s a_k = s (sum_k u_k a_k - c sum_k a_k)``.
#
# Bytes in flight: a 4-bit matrix is small (Phi-3-mini's o_proj is 4.9 MB, a few microseconds at full
# bandwidth), so a program must not walk K tile after tile. Each program takes a block of rows and
# requests all of its K at once, as up to four tiles of ``BW`` words before it computes any (and,
# under PDL, before it waits for the previous kernel); only a K longer than four tiles loops. Small
# row blocks give every matrix several programs per SM: ~600-1,200 for a Phi-3-mini layer's four.


def interleave_w4(packed: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """compressed-tensors' ``weight_packed`` (``[N, K / 8]`` int32) in the kernels' order (above)."""
    if group % 32 or k % group or packed.dtype != torch.int32 or tuple(packed.shape[1:]) != (k // 8,):
        raise ValueError(f"W4A16: packed {tuple(packed.shape)} {packed.dtype}, K {k}, group {group}: the kernels "
                         "take compressed-tensors' int32 packing, K a whole number of groups, groups of 32n")
    n, gw = packed.shape[0], group // 8
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    u = (packed[:, :, None] >> shifts) & 15  # [N, K/8, 8]: column order
    u = u.reshape(n, k // group, 8, gw).transpose(2, 3)  # [N, groups, word, nibble]
    return (u << shifts).sum(-1, dtype=torch.int32).reshape(n, k // 8).contiguous()


MAX_TILES = 4  # tiles a program requests before computing; more registers than this spill


# (rows a program, words a tile, warps), words = 128 x warps: the tile's chunks of four words span
# the program's lanes exactly, so each thread holds four words of every row of the program (and of
# its up rows, gated) and an activation it loads serves all of them. More rows a thread spend fewer
# instructions per weight on the activations (bench/w4a16_sass.py counts them in the sm_90a build: ~3.8
# a weight at 8 rows, ~4.9 at 4, for a norm-fused K of 3,072) but hold more registers: 8 rows x 3
# tiles take ~240. The interpreter's one config makes the tests' small K take several tiles and,
# past four, the loop: 8 words (64 or 128 columns) a tile.
W4_INTERPRET_CONFIG = (64, 8, 4)
W4_CONFIGS = [(2, 128, 1), (4, 128, 1), (8, 128, 1), (2, 256, 2), (4, 256, 2), (4, 512, 4), (8, 512, 4)]


def _gemv_w4_configs() -> list[Any]:
    shapes = [W4_INTERPRET_CONFIG] if INTERPRET else W4_CONFIGS
    return [triton.Config({"BLOCK_N": n, "BW": w}, num_warps=nw) for n, w, nw in shapes]


def _w4_tiles(args: dict[str, Any]) -> int:
    return min(MAX_TILES, triton.cdiv(args["K"] // 8, args["BW"]))


def _w4_batches(args: dict[str, Any]) -> int:
    return triton.cdiv(args["K"] // 8, _w4_tiles(args) * args["BW"])


def w4_candidates(k: int) -> list[tuple[int, int, int]]:
    """The configs worth timing for a K: one batch of tiles where any config has it (a second batch
    is requested only after the first is computed), and at most a third more words than K holds
    (else the least padded): K = 3,072 (384 words) keeps its 512-word tiles, a quarter idle,
    which won in graphs on the H200 (bench/results/decode_kernels_w4a16_h200.json, ``sweep``)."""
    def cost(c: tuple[int, int, int]) -> tuple[int, int]:
        args = {"K": k, "BW": c[1]}
        return _w4_batches(args), _w4_batches(args) * _w4_tiles(args) * c[1]

    configs = [W4_INTERPRET_CONFIG] if INTERPRET else W4_CONFIGS
    batches = min(cost(c)[0] for c in configs)
    one = [c for c in configs if cost(c)[0] == batches]
    least = min(cost(c)[1] for c in one)
    return [c for c in one if cost(c)[1] <= max(least, 4 * (k // 8) // 3)]


def _w4_prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    keep = w4_candidates(kwargs["K"])
    return [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BW"], c.num_warps) in keep]


@triton.jit
def _w4_tile(q_ptr, s_ptr, z_ptr, rows, rmask, c, i, KW: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr,
             ZP: tl.constexpr):
    """One tile: the words of ``rows`` (``[1, R, P, 1]``) in chunks ``c`` (``[BC, 1, 1, 1]``) of four
    (``i``, ``[1, 1, 1, 4]``: one 16-byte load), one scale and zero-point word a chunk (its four
    words lie in one group); nothing past K is read. The chunk axis comes first: Triton lays
    threads along the first of the axes it cannot tell apart, and the chunks must get them (so that
    a thread holds every row of its chunk, and an activation it loads serves all of them)."""
    w = c * 4 + i
    q = tl.load(q_ptr + rows * KW + w, mask=rmask & (w < KW), other=0, eviction_policy="evict_first")
    cmask = rmask & (c * 4 < KW)  # K is a whole number of groups: chunks are all in or all out
    s = tl.load(s_ptr + rows * NG + (c * 4) // GW, mask=cmask, other=0.0)
    if ZP:
        zw = tl.load(z_ptr + (rows // 8) * NG + (c * 4) // GW, mask=cmask, other=0)
    else:
        zw = tl.zeros([1, 1, 1, 1], dtype=tl.int32)
    return q, s, zw


@triton.jit
def _w4_code(q, qh, J: tl.constexpr):
    """Nibble ``J`` of each word, left where it is and read as a float: ``u * 2^(e - 149)``, a
    denormal, exactly (step 1 above; ``e`` is its bit position, ``qh`` the word shifted right 12)."""
    if J < 5:
        return (q & (15 << (4 * J))).to(tl.float32, bitcast=True)
    else:
        return (qh & (15 << (4 * J - 12))).to(tl.float32, bitcast=True)


@triton.jit
def _w4_lift(a, J: tl.constexpr):
    """The activation that multiplies nibble ``J``'s denormal: ``a * 2^(80 - e)``, so that every
    product is ``u * a * 2^-69`` (step 2 above)."""
    if J < 5:
        return a * (1.2089258196146292e24 / (1 << (4 * J)))  # 2^80 / 2^e
    else:
        return a * (1.2089258196146292e24 / (1 << (4 * J - 12)))


@triton.jit
def _w4_dot(q, s, zw, rows, c, i, a_ptr, g_ptr, acc, sumsq, KW: tl.constexpr, G: tl.constexpr,
            GW: tl.constexpr, ZP: tl.constexpr, NORM: tl.constexpr, DRY: tl.constexpr):
    """``acc += s * (sum u a - c * sum a)`` per (row, chunk) of one tile, the sums over the chunk's
    32 weights; the norm's sum of squares of the activations on the way. The activations are
    ``[BC, 1, 1, 4]`` tensors in the tile's own layout (no shuffle through shared memory).
    ``DRY`` (bench only): the loads alone, one add a word."""
    if DRY:
        return acc + tl.sum(q.to(tl.float32, bitcast=True), axis=3, keep_dims=True) + s.to(tl.float32), sumsq
    w = c * 4 + i
    cmask = w < KW
    # column of nibble 0 of each word: runs of four contiguous columns
    col0 = tl.max_contiguous(tl.multiple_of((w // GW) * G + w % GW, [1, 1, 1, 4]), [1, 1, 1, 4])
    qh = q >> 12
    p = tl.zeros(q.shape, dtype=tl.float32)
    asum = tl.zeros(w.shape, dtype=tl.float32)
    for j in tl.static_range(8):
        cols = col0 + j * GW
        a = tl.load(a_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if NORM:
            sumsq += a * a
            a = a * tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        asum += a
        p += _w4_code(q, qh, j) * _w4_lift(a, j)
    if ZP:  # the stored nibble is 8 + z: the code's centre (a small integer, exact through the float trick)
        centre = (((zw >> ((rows % 8) * 4)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        centre = 8.0
    return acc + s.to(tl.float32) * (tl.sum(p, axis=3, keep_dims=True) * 5.902958103587057e20  # 2^69
                                     - centre * tl.sum(asum, axis=3, keep_dims=True)), sumsq


@triton.jit
def _gemv_w4_kernel(q_ptr, s_ptr, z_ptr, a_ptr, g_ptr, r_ptr, out_ptr, N, eps,
                    K: tl.constexpr, G: tl.constexpr, ZP: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
                    RESIDUAL: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BW: tl.constexpr,
                    T: tl.constexpr, NB: tl.constexpr, DRY: tl.constexpr = False):
    """``BLOCK_N`` output rows a program (and their up rows when ``GATED``: the weight's row pairs
    ``n``, ``N + n`` sit along a second axis ``P``), all of K as ``NB`` batches of ``T`` tiles of
    ``BW`` words."""
    if PDL:
        gdc_launch_dependents()
    KW: tl.constexpr = K // 8  # int32 words per row
    NG: tl.constexpr = K // G  # groups (scales) per row
    GW: tl.constexpr = G // 8  # words per group
    P: tl.constexpr = 2 if GATED else 1
    BC: tl.constexpr = BW // 4  # chunks of four words a tile
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    pair = tl.arange(0, P)
    rows = (n[:, None] + pair[None, :] * N)[None, :, :, None]  # [1, BLOCK_N, P, 1] weight rows
    rmask = (n[:, None] < N)[None, :, :, None] & (pair[None, :] < P)[None, :, :, None]
    c = tl.arange(0, BC)[:, None, None, None]
    i = tl.arange(0, 4)[None, None, None, :]
    acc = tl.zeros([BC, BLOCK_N, P, 1], dtype=tl.float32)
    sumsq = tl.zeros([BC, 1, 1, 4], dtype=tl.float32)
    r = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b in range(NB):  # one batch unless K is longer than T tiles
        c0 = b * (T * BC)
        # Every tile's weights requested before any is used; under PDL, before waiting for the
        # previous kernel, whose output (the activations, the residual) is read only after.
        q0, s0, z0 = _w4_tile(q_ptr, s_ptr, z_ptr, rows, rmask, c0 + c, i, KW, NG, GW, ZP)
        if T > 1:
            q1, s1, z1 = _w4_tile(q_ptr, s_ptr, z_ptr, rows, rmask, c0 + BC + c, i, KW, NG, GW, ZP)
        if T > 2:
            q2, s2, z2 = _w4_tile(q_ptr, s_ptr, z_ptr, rows, rmask, c0 + 2 * BC + c, i, KW, NG, GW, ZP)
        if T > 3:
            q3, s3, z3 = _w4_tile(q_ptr, s_ptr, z_ptr, rows, rmask, c0 + 3 * BC + c, i, KW, NG, GW, ZP)
        if PDL:
            gdc_wait()  # returns at once after the first batch
        if RESIDUAL:  # requested early: its latency overlaps the arithmetic
            r = tl.load(r_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        acc, sumsq = _w4_dot(q0, s0, z0, rows, c0 + c, i, a_ptr, g_ptr, acc, sumsq, KW, G, GW, ZP, NORM, DRY)
        if T > 1:
            acc, sumsq = _w4_dot(q1, s1, z1, rows, c0 + BC + c, i, a_ptr, g_ptr, acc, sumsq, KW, G, GW, ZP, NORM,
                                 DRY)
        if T > 2:
            acc, sumsq = _w4_dot(q2, s2, z2, rows, c0 + 2 * BC + c, i, a_ptr, g_ptr, acc, sumsq, KW, G, GW, ZP,
                                 NORM, DRY)
        if T > 3:
            acc, sumsq = _w4_dot(q3, s3, z3, rows, c0 + 3 * BC + c, i, a_ptr, g_ptr, acc, sumsq, KW, G, GW, ZP,
                                 NORM, DRY)
    y = tl.sum(tl.sum(acc, axis=3), axis=0)  # [BLOCK_N, P]
    if NORM:
        y = y * tl.rsqrt(tl.sum(tl.sum(tl.sum(tl.sum(sumsq, axis=3), axis=2), axis=1), axis=0) / K + eps)
    if GATED:
        gate = tl.sum(tl.where(pair[None, :] == 0, y, 0.0), axis=1)
        up = tl.sum(tl.where(pair[None, :] == 1, y, 0.0), axis=1)
        o = gate * tl.sigmoid(gate) * up
    else:
        o = tl.sum(y, axis=1)
    if RESIDUAL:
        o += r
    tl.store(out_ptr + n, o.to(out_ptr.dtype.element_ty), mask=nmask)


_gemv_w4_fixed = triton.heuristics({"T": _w4_tiles, "NB": _w4_batches})(_gemv_w4_kernel)
# Tuned once per shape and fused stages, at the first call (a decoder's warm-up, before its graph is
# captured); short timing runs: the configs differ by microseconds and the warm-up should not.
_gemv_w4 = triton.autotune(
    configs=_gemv_w4_configs(), key=["N", "K", "G", "ZP", "NORM", "GATED", "RESIDUAL"], restore_value=["out_ptr"],
    prune_configs_by={"early_config_prune": _w4_prune},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles),
)(_gemv_w4_fixed)


def _w4_check(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, k: int, group: int) -> None:
    n = packed.shape[0]
    if group % 32 or k % group or packed.dtype != torch.int32 or not packed.is_contiguous() or packed.shape[1] != k // 8:
        raise ValueError(f"W4A16: packed {tuple(packed.shape)} {packed.dtype}, K {k}, group {group}: not an "
                         "interleave_w4 weight of whole groups of 32n")
    if tuple(scale.shape) != (n, k // group) or not scale.is_contiguous():
        raise ValueError(f"W4A16: scale {tuple(scale.shape)} for {n} rows and {k // group} groups")
    if zero_point is not None and (tuple(zero_point.shape) != (triton.cdiv(n, 8), scale.shape[1])
                                   or zero_point.dtype != torch.int32 or not zero_point.is_contiguous()):
        raise ValueError(f"W4A16: zero point {tuple(zero_point.shape)} {zero_point.dtype} for scale {tuple(scale.shape)}")


def gemv_w4(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group: int,
            a: torch.Tensor, out: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0,
            gated: bool = False, residual: torch.Tensor | None = None,
            config: tuple[int, int, int] | None = None, dry: bool = False) -> torch.Tensor:
    """``out = dequant(W) @ a`` for a packed W4A16 weight (layout above), with ``gemv``'s fused stages.

    Args:
        packed: ``interleave_w4`` of the layer's ``weight_packed`` (``[N, K / 8]``; ``[2N, ...]`` gated).
        scale, zero_point, group: the layer's compressed-tensors scales, packed zero points (None
            when symmetric) and group size.
        a: the input, ``K`` elements; ``out``: ``N`` elements (may be ``residual`` itself).
        config: ``(rows a program, words a tile, warps)`` instead of the tuned choice (tests, bench).
        dry: the weight loads without the arithmetic (bench only: the output is meaningless).
    """
    k = a.numel()
    _w4_check(packed, scale, zero_point, k, group)
    rows = packed.shape[0]
    n = rows // 2 if gated else rows
    if out.numel() != n:
        raise ValueError(f"gemv_w4: {rows} weight rows, output {out.numel()}")
    pdl = pdl_enabled()
    args = (packed, scale, zero_point if zero_point is not None else packed, a,
            norm if norm is not None else a, residual if residual is not None else out, out, n, eps)
    meta = dict(K=k, G=group, ZP=zero_point is not None, NORM=norm is not None, GATED=gated,
                RESIDUAL=residual is not None, PDL=pdl, **({"launch_pdl": True} if pdl else {}))
    if config is None and not dry:
        _gemv_w4[lambda m: (triton.cdiv(n, m["BLOCK_N"]),)](*args, **meta)
    else:
        block_n, bw, warps = config or W4_CONFIGS[0]
        _gemv_w4_fixed[(triton.cdiv(n, block_n),)](*args, **meta, BLOCK_N=block_n, BW=bw, num_warps=warps, DRY=dry)
    return out


@triton.jit
def _matmul_w4(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K: tl.constexpr, G: tl.constexpr, ZP: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """``out[M, N] = x[M, K] @ dequant(W).T``: tiles dequantized in registers, then a tensor-core dot."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kw: tl.constexpr = K // 8
    ng: tl.constexpr = K // G
    gw: tl.constexpr = G // 8
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm < M)[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & (rn < N)[None, :]
        grp, r = rk // G, rk % G
        word_of = grp * gw + r % gw  # the interleaved order: column r of a group is nibble r // gw of word r % gw
        word = tl.load(q_ptr + rn[None, :] * kw + word_of[:, None], mask=wmask, other=0)  # [BLOCK_K, BLOCK_N]
        u = (word >> ((r // gw) * 4)[:, None]) & 15
        s = tl.load(s_ptr + rn[None, :] * ng + grp[:, None], mask=wmask, other=0.0).to(tl.float32)
        if ZP:
            zw = tl.load(z_ptr + (rn[None, :] // 8) * ng + grp[:, None], mask=wmask, other=0)
            u = u - ((zw >> ((rn % 8) * 4)[None, :]) & 15)
        else:
            u = u - 8
        w = u.to(tl.float32) * s
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _dequant_w4(q_ptr, s_ptr, z_ptr, w_ptr, N, K: tl.constexpr, G: tl.constexpr, ZP: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """``w[N, K] = (u - c) * s`` for one group of ``BLOCK_N`` rows: each packed word read once, its
    eight nibbles put back in column order (the interleaved word ``w`` of a group holds columns
    ``w + j * G / 8``), one scale and centre a row."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    KW: tl.constexpr = K // 8
    NG: tl.constexpr = K // G
    GW: tl.constexpr = G // 8
    nmask = rn < N
    q = tl.load(q_ptr + rn[:, None] * KW + (g * GW + tl.arange(0, GW))[None, :], mask=nmask[:, None], other=0)
    u = (q[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15  # [BLOCK_N, word, nibble]
    u = tl.reshape(tl.permute(u, (0, 2, 1)), [BLOCK_N, G])  # column j * GW + w of the group
    s = tl.load(s_ptr + rn * NG + g, mask=nmask, other=0.0).to(tl.float32)
    if ZP:  # the stored nibble is 8 + z
        c = (tl.load(z_ptr + (rn // 8) * NG + g, mask=nmask, other=0) >> ((rn % 8) * 4)) & 15
    else:
        c = tl.full([BLOCK_N], 8, tl.int32)
    w = (u - c[:, None]).to(tl.float32) * s[:, None]
    tl.store(w_ptr + rn[:, None] * K + (g * G + tl.arange(0, G))[None, :], w.to(w_ptr.dtype.element_ty),
             mask=nmask[:, None])


def dequant_w4(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group: int, k: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The ``[N, K]`` weight in ``dtype`` from its packed form (``interleave_w4``'s order)."""
    _w4_check(packed, scale, zero_point, k, group)
    n = packed.shape[0]
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    _dequant_w4[(triton.cdiv(n, 32), k // group)](packed, scale, zero_point if zero_point is not None else packed, w,
                                                  n, K=k, G=group, ZP=zero_point is not None, BLOCK_N=32,
                                                  num_warps=4)
    return w


# ``matmul_w4``'s two paths. Its own tiles re-read each packed word for each of its nibbles and run
# one program of 32 (64) rows per row block, K walked in sequence; the other dequantizes the weight
# into a scratch matrix (each word read once, the bf16 weight written at ~3.5 TB/s: ~20 us for a
# 9,216 x 3,072 matrix on an H200) and hands it to cuBLAS. Measured per matrix of Phi-3-mini on an
# H200 (bench/results/matmul_w4_h200.json): from 64 rows the scratch matrix wins for the four
# matrices of a layer together (1.25x at 64, 1.8x at 128, 4.2-4.7x at a prefill's 1,024-4,096 rows);
# below that it wins only where the tiles leave multiprocessors idle (o and down, 3,072 rows: 96
# row blocks for 132 SMs; 1.31-1.44x at 8 and 32 rows), and loses on qkv and gate_up (0.76-0.99x).
# The same trade as the CPU int4 layer's prefill (``decode.Int4Linear``, ``PREFILL_ROWS``), on this layout.
DEQUANT_ROWS = 64


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tiles_config(m: int, n: int) -> tuple[int, int, int, int, int]:
    """The tiles' default launch: bench/batched_step.py's sweep on an H200 (Phi-3-mini's matrices, M =
    8, 32, 128): narrow tiles, so that even a 3072-row matrix spreads over the GPU (96 programs of 32 rows)."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    return block_m, 64 if n >= 16384 else 32, 128 if block_m <= 32 else 64, 4, 4 if block_m == 16 else 3


def matmul_w4_dequantizes(m: int, n: int, device: torch.device) -> bool:
    """Whether ``matmul_w4`` takes the scratch matrix for ``m`` rows of an ``n``-row weight (above)."""
    if m >= DEQUANT_ROWS:
        return True
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.cdiv(n, _tiles_config(m, n)[1]) < _sm_count(index)


def matmul_w4(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group: int,
              x: torch.Tensor, out: torch.Tensor,
              config: tuple[int, int, int, int, int] | None = None, dequant: bool | None = None) -> torch.Tensor:
    """``out = x @ dequant(W).T`` for ``x`` ``[M, K]`` (contiguous) and ``out`` ``[M, N]``: the layer's
    forward for more than one row (prefill, the batched engine); a batch-1 step uses ``gemv_w4``.
    From ``DEQUANT_ROWS`` rows, or where the tiles' row blocks are fewer than the GPU's
    multiprocessors, the weight is dequantized into a scratch matrix for ``torch.mm`` (above);
    ``dequant`` forces either path (tests, bench). ``config``: ``(BLOCK_M, BLOCK_N, BLOCK_K, warps,
    stages)`` of the tiles instead of their default (bench)."""
    m, k = x.shape
    _w4_check(packed, scale, zero_point, k, group)
    n = packed.shape[0]
    if not x.is_contiguous() or tuple(out.shape) != (m, n):
        raise ValueError(f"matmul_w4: input {tuple(x.shape)}, output {tuple(out.shape)}, {n} weight rows")
    if dequant is None:
        dequant = config is None and matmul_w4_dequantizes(m, n, x.device)
    if dequant:
        return torch.mm(x, dequant_w4(packed, scale, zero_point, group, k, x.dtype).t(), out=out)
    block_m, block_n, block_k, warps, stages = config or _tiles_config(m, n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _matmul_w4[grid](x, packed, scale, zero_point if zero_point is not None else packed, out, m, n, k,
                     G=group, ZP=zero_point is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                     # Triton 3.6's interpreter multiplies bf16 operands of a dot as their raw 16-bit
                     # patterns (it stores bf16 as uint16): there, the dot runs in float32
                     UPCAST=INTERPRET and x.dtype == torch.bfloat16,
                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                     **({} if INTERPRET else {"num_stages": stages}))
    return out
