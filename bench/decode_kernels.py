"""The decode kernels of services/phiops_kernels.py against what PyTorch runs for the same work.

    python bench/decode_kernels.py --out bench/results/decode_kernels_h100.json
    python bench/decode_kernels.py --w4a16 --w4a16-sweep --skip-gemv --skip-attention \
        --out bench/results/decode_kernels_w4a16_h200.json

Phi-3-mini's shapes, bf16, one GPU. Each row is one stage of a decode step:

- the four weight-streaming stages of a layer and the LM head, as ``phiops_kernels.gemv`` with
  its fused prologue/epilogue, against the same work in PyTorch (``F.linear``, i.e. cuBLAS, plus
  the separate norm, SiLU-gating or residual-add kernels eager PyTorch launches);
- decode attention at the bench's sequence length and at the sliding window (2047), as
  ``phiops_kernels.Attention`` (rotary, cache write and split-KV attention) against
  ``F.scaled_dot_product_attention`` over the same static cache with a mask (PyTorch's choice of
  kernel; the rotary and the cache write not counted on that side).

Timing: many calls captured in one CUDA graph and replayed (launch gaps as in the decoder's own
graph), the median over replays; the weights rotate over enough copies that the 50 MB L2 holds
none of them between uses. TB/s counts the bytes each stage must read (weights, and the cache for
attention) over that time, against the bound in `bench/decode_phi3_mini.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from _common import machine, versions

HIDDEN, INTER, HEADS, HEAD_DIM, VOCAB = 3072, 8192, 32, 96, 32064


def graph_time_us(fns: list[Callable[[], Any]], replays: int = 30) -> float:
    """Median microseconds per call of `fns` (one call each per replay), from CUDA-graph replays."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # first calls: Triton compiles and tunes here, outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(fns))
    return statistics.median(times)


def gemv_rows(copies_bytes: int = 400_000_000) -> list[dict[str, Any]]:
    stages = [  # name, weight rows, K, norm, gated, residual
        ("qkv_proj (norm fused)", 3 * HIDDEN, HIDDEN, True, False, False),
        ("o_proj (+ residual)", HIDDEN, HIDDEN, False, False, True),
        ("gate_up_proj (norm, SiLU gate fused)", 2 * INTER, HIDDEN, True, True, False),
        ("down_proj (+ residual)", HIDDEN, INTER, False, False, True),
        ("lm_head (norm fused)", VOCAB, HIDDEN, True, False, False),
    ]
    return [_gemv_stage(*stage, copies_bytes=copies_bytes) for stage in stages]


def _gemv_stage(name: str, rows: int, k: int, norm: bool, gated: bool, residual: bool, *,
                copies_bytes: int) -> dict[str, Any]:
    from phiops.serve import kernels as K
    import torch
    import torch.nn.functional as F

    dev, bf, eps = "cuda", torch.bfloat16, 1e-5
    nbytes = rows * k * 2
    n_copies = max(2, -(-copies_bytes // nbytes))
    ws = [torch.randn(rows, k, device=dev, dtype=bf) * 0.02 for _ in range(n_copies)]
    a = torch.randn(k, device=dev, dtype=bf)
    g = torch.rand(k, device=dev, dtype=bf) + 0.5
    n = rows // 2 if gated else rows
    y = torch.empty(n, device=dev, dtype=bf)
    x = torch.randn(n, device=dev, dtype=bf)

    def ours(w: Any) -> Callable[[], Any]:
        return lambda: K.gemv(w, a, x if residual else y, norm=g if norm else None, eps=eps, gated=gated,
                              residual=x if residual else None)

    def torch_eager(w: Any) -> Callable[[], Any]:
        def run() -> Any:
            v = a
            if norm:  # transformers' RMSNorm: float32 statistics, then the gain in bf16
                f = a.float()
                v = g * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(bf)
            h = F.linear(v[None], w)[0]
            if gated:
                gate, up = h.chunk(2)
                h = F.silu(gate) * up
            return x.add_(h) if residual else h
        return run

    # correctness on this shape before timing it (bf16 operands: ~1e-2 relative)
    x0 = x.clone()
    ours(ws[0])()
    got = (x - x0 if residual else y).float()
    x.copy_(x0)
    want = torch_eager(ws[0])().float() - (x0.float() if residual else 0)
    x.copy_(x0)
    rel = float((got - want).norm() / want.norm())
    t_ours = graph_time_us([ours(w) for w in ws])
    t_torch = graph_time_us([torch_eager(w) for w in ws])
    cfg = [str(c) for key, c in K._gemv.cache.items() if key[:2] == (n, k)]
    row = {"stage": name, "weight_bytes": nbytes, "rel_err_vs_torch": round(rel, 5),
           "phiops_us": round(t_ours, 2), "phiops_tbs": round(nbytes / t_ours / 1e6, 3),
           "torch_us": round(t_torch, 2), "torch_tbs": round(nbytes / t_torch / 1e6, 3),
           "speedup": round(t_torch / t_ours, 3), "phiops_config": cfg[-1] if cfg else None}
    print(json.dumps(row), flush=True)
    del ws
    torch.cuda.empty_cache()
    return row


# Phi-3-mini's W4A16 GEMV stages: name, weight rows, K, norm, gated, residual, symmetric
W4A16_STAGES = [
    ("qkv_proj (norm fused)", 3 * HIDDEN, HIDDEN, True, False, False, True),
    ("qkv_proj (norm fused), asymmetric", 3 * HIDDEN, HIDDEN, True, False, False, False),
    ("o_proj (+ residual)", HIDDEN, HIDDEN, False, False, True, True),
    ("gate_up_proj (norm, SiLU gate fused)", 2 * INTER, HIDDEN, True, True, False, True),
    ("down_proj (+ residual)", HIDDEN, INTER, False, False, True, True),
]


def w4a16_rows(copies_bytes: int = 400_000_000, sweep: bool = False,
               done: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """The same stages through ``gemv_w4`` on compressed-tensors' packed int4 layout (group 128), against
    tinygemm (``aten._weight_int4pack_mm``, the matmul alone, what ``Int4Linear`` runs), and the
    per-launch floor: a 256x256 W4A16 GEMV (32 KB), whose time is launch and ramp only.

    Each stage also runs ``dry`` (the tuned config's weight loads without the arithmetic: what the
    memory system and the launch give that tiling) and, with ``sweep``, every config of
    ``kernels.W4_CONFIGS`` that takes K in one batch of tiles."""
    stages = W4A16_STAGES + [("launch floor: 256x256", 256, 256, False, False, True, True)]
    rows = []
    for stage in stages:
        rows.append(_w4a16_stage(*stage, copies_bytes=copies_bytes, sweep=sweep))
        if done:
            done(rows[-1])
    return rows


def w4a16_problem(rows: int, k: int, norm: bool, gated: bool, residual: bool, symmetric: bool, group: int = 128,
                  eps: float = 1e-5) -> Any:
    """One W4A16 GEMV stage on random codes, as the benches time it: compressed-tensors' packing
    (``ct``, ``zp``: words and zero points as saved; ``w4``: what W4A16Linear holds), the
    activations as FusedDecoder holds them (the residual stream in bf16 for the norm-fused stages,
    the attention output and the gated product in float32 for o_proj's and down_proj's), the output
    ``out`` (the residual itself when there is one) and ``error(run)``: a kernel call's relative
    error against the weight dequantized in float32, with the residual put back after."""
    import types

    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from phiops.serve import kernels as K
    import torch

    dev, bf = "cuda", torch.bfloat16
    q = torch.randint(-8, 8, (rows, k), device=dev, dtype=torch.int8)
    scale = (torch.rand(rows, k // group, device=dev) * 0.01 + 0.001).to(bf)
    z = None if symmetric else torch.randint(-8, 8, (rows, k // group), device=dev, dtype=torch.int8)
    ct = pack_to_int32(q, 4).contiguous()
    zp = None if z is None else pack_to_int32(z, 4, packed_dim=0).contiguous()
    w4 = (K.interleave_w4(ct, k, group), scale, zp)
    a = torch.randn(k, device=dev, dtype=bf if norm else torch.float32)
    g = torch.rand(k, device=dev, dtype=bf) + 0.5
    n = rows // 2 if gated else rows
    y = torch.empty(n, device=dev, dtype=bf)
    x = torch.randn(n, device=dev, dtype=bf)
    cols = torch.arange(k, device=dev) // group
    wf = (q.float() - (0 if z is None else z.float()[:, cols])) * scale.float()[:, cols]
    v = a.float() * torch.rsqrt(a.float().pow(2).mean() + eps) * g.float() if norm else a.float()
    want = wf @ v
    if gated:
        want = torch.nn.functional.silu(want[:n]) * want[n:]
    x0 = x.clone()

    def error(run: Callable[[], Any]) -> float:  # timed runs leave x drifted: start from x0
        x.copy_(x0)
        y.fill_(float("nan"))
        run()
        got = (x.float() - x0.float()) if residual else y.float()
        x.copy_(x0)
        return round(float((got - want).norm() / want.norm()), 5)

    return types.SimpleNamespace(q=q, ct=ct, zp=zp, scale=scale, w4=w4, a=a, g=g, n=n, x=x, y=y,
                                 out=x if residual else y, error=error,
                                 nbytes=sum(t.numel() * t.element_size() for t in w4 if t is not None))


def _w4a16_stage(name: str, rows: int, k: int, norm: bool, gated: bool, residual: bool, symmetric: bool, *,
                 copies_bytes: int, group: int = 128, sweep: bool = False) -> dict[str, Any]:
    from phiops.serve import kernels as K
    import torch

    bf, eps = torch.bfloat16, 1e-5
    prob = w4a16_problem(rows, k, norm, gated, residual, symmetric, group, eps)
    q, scale, w4, a, g, n = prob.q, prob.scale, prob.w4, prob.a, prob.g, prob.n
    x, y, nbytes = prob.x, prob.y, prob.nbytes
    n_copies = max(2, -(-copies_bytes // nbytes))
    copies = [w4] + [tuple(None if t is None else t.clone() for t in w4) for _ in range(n_copies - 1)]

    def ours(w: Any, **kw: Any) -> Callable[[], Any]:
        return lambda: K.gemv_w4(*w, group, a, x if residual else y, norm=g if norm else None, eps=eps,
                                 gated=gated, residual=x if residual else None, **kw)

    def error(**kw: Any) -> float:  # correctness on this shape, every config
        return prob.error(ours(w4, **kw))

    rel = error()
    t_ours = graph_time_us([ours(w) for w in copies])
    row: dict[str, Any] = {"stage": name, "weight_bytes": nbytes, "rel_err_vs_float32": rel,
                           "w4a16_us": round(t_ours, 2), "w4a16_tbs": round(nbytes / t_ours / 1e6, 3)}
    tuned = [c for key, c in K._gemv_w4.cache.items() if key[:2] == (n, k)]
    chosen = (tuned[-1].kwargs["BLOCK_N"], tuned[-1].kwargs["BW"], tuned[-1].num_warps) if tuned else K.W4_CONFIGS[0]
    row["w4a16_config"] = {"block_n": chosen[0], "words_per_tile": chosen[1], "num_warps": chosen[2],
                           "tiles": K._w4_tiles({"K": k, "BW": chosen[1]}), "programs": -(-n // chosen[0])}
    t_dry = graph_time_us([ours(w, config=chosen, dry=True) for w in copies])
    row.update(dry_us=round(t_dry, 2), dry_tbs=round(nbytes / t_dry / 1e6, 3))
    if sweep:
        row["sweep"] = []
        for cfg in K.W4_CONFIGS:
            if K._w4_batches({"K": k, "BW": cfg[1]}) > 1:
                continue
            t = graph_time_us([ours(w, config=cfg) for w in copies])
            row["sweep"].append({"config": list(cfg), "us": round(t, 2), "tbs": round(nbytes / t / 1e6, 3),
                                 "rel_err": error(config=cfg)})
    try:  # tinygemm on the same weights: the bare matmul, no fused stages
        u = (q.to(torch.int32) + 8)
        packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8), 8)
        sz = torch.stack([scale.float(), torch.zeros_like(scale, dtype=torch.float32)], -1).transpose(0, 1).contiguous().to(bf)
        tg = [(packed.clone(), sz.clone()) for _ in range(n_copies)]
        abf = a.to(bf)
        t_tg = graph_time_us([lambda p=p, s=s: torch.ops.aten._weight_int4pack_mm(abf[None], p, group, s) for p, s in tg])
        row.update(tinygemm_us=round(t_tg, 2), tinygemm_tbs=round(nbytes / t_tg / 1e6, 3), speedup=round(t_tg / t_ours, 3))
        del tg
    except Exception as exc:  # recorded, not fatal
        row["tinygemm_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps(row), flush=True)
    del copies
    torch.cuda.empty_cache()
    return row


def attention_rows(lengths: list[tuple[int, int]], sweep: bool) -> list[dict[str, Any]]:
    return [_attention_stage(max_len, pos, sweep) for max_len, pos in lengths]


def _attention_stage(max_len: int, pos: int, sweep: bool) -> dict[str, Any]:
    from phiops.serve import kernels as K
    import torch
    import torch.nn.functional as F

    dev, bf = "cuda", torch.bfloat16
    layers = 32  # one step's worth of layers, so the caches do not sit in L2 between calls
    kc = [torch.randn(1, HEADS, max_len, HEAD_DIM, device=dev, dtype=bf) for _ in range(layers)]
    vc = [torch.randn(1, HEADS, max_len, HEAD_DIM, device=dev, dtype=bf) for _ in range(layers)]
    qkv = torch.randn(3 * HEADS * HEAD_DIM, device=dev, dtype=bf)
    p = torch.tensor([pos], device=dev)
    cos = torch.randn(max_len, HEAD_DIM, device=dev)
    sin = torch.randn(max_len, HEAD_DIM, device=dev)
    o = torch.empty(HEADS * HEAD_DIM, device=dev, dtype=bf)
    def make(**kw: Any) -> Any:
        return K.Attention(heads=HEADS, kv_heads=HEADS, head_dim=HEAD_DIM, rotary_dim=HEAD_DIM, max_len=max_len,
                           scaling=HEAD_DIM ** -0.5, device=dev, **kw)

    attn = make()
    q = qkv[:HEADS * HEAD_DIM].view(1, HEADS, 1, HEAD_DIM)
    mask = (torch.arange(max_len, device=dev) <= pos).view(1, 1, 1, max_len)

    def ours(i: int) -> Callable[[], Any]:
        return lambda: attn(qkv, kc[i], vc[i], p, cos, sin, o)

    def sdpa(i: int) -> Callable[[], Any]:
        return lambda: F.scaled_dot_product_attention(q, kc[i], vc[i], attn_mask=mask)

    # check against SDPA on the same cache (rotary made the identity: cos 1, sin 0)
    cos_id, sin_id = torch.ones_like(cos), torch.zeros_like(sin)
    attn(qkv, kc[0], vc[0], p, cos_id, sin_id, o)
    # the reference reads the new key and value where they belong, written here independently
    kc[0][0, :, pos] = qkv[HEADS * HEAD_DIM:2 * HEADS * HEAD_DIM].view(HEADS, HEAD_DIM)
    vc[0][0, :, pos] = qkv[2 * HEADS * HEAD_DIM:].view(HEADS, HEAD_DIM)
    want = F.scaled_dot_product_attention(q, kc[0], vc[0], attn_mask=mask).reshape(-1).float()
    rel = float((o.float() - want).norm() / want.norm())
    nbytes = 2 * HEADS * (pos + 1) * HEAD_DIM * 2
    t_ours = graph_time_us([ours(i) for i in range(layers)])
    t_sdpa = graph_time_us([sdpa(i) for i in range(layers)])
    row = {"stage": f"attention, cache {max_len}, position {pos}", "kv_bytes": nbytes,
           "splits": attn.splits, "chunk": attn.chunk, "block_t": attn.block_t, "num_warps": attn.num_warps,
           "rel_err_vs_sdpa": round(rel, 5),
           "phiops_us": round(t_ours, 2), "sdpa_us": round(t_sdpa, 2), "speedup": round(t_sdpa / t_ours, 3)}
    if sweep:  # the launch settings around the default, same data
        row["sweep"] = []
        for chunk in (32, 64, 128, 256):
            for block_t in (32, 64):
                for warps in (2, 4, 8):
                    a = make(chunk=chunk, block_t=min(block_t, chunk), num_warps=warps)
                    t = graph_time_us([lambda i=i, a=a: a(qkv, kc[i], vc[i], p, cos, sin, o) for i in range(layers)])
                    row["sweep"].append({"chunk": chunk, "block_t": a.block_t, "num_warps": warps, "us": round(t, 2)})
        row["sweep"].sort(key=lambda r: r["us"])
        row["sweep_best"] = row["sweep"][0]
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--attention-sweep", action="store_true", help="also time attention's launch settings")
    ap.add_argument("--skip-gemv", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--w4a16", action="store_true", help="also time the W4A16 GEMV (gemv_w4) per stage")
    ap.add_argument("--w4a16-sweep", action="store_true", help="with --w4a16: time every W4A16 config per stage")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the kernels run on CPU only under Triton's interpreter, in the tests)")
    result: dict[str, Any] = {
        "bench": "decode_kernels",
        "command": " ".join(["python", "bench/decode_kernels.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "versions": versions(("torch", "triton")), "dtype": "bfloat16",
        "gemv": [] if args.skip_gemv else gemv_rows(),
        "attention": [] if args.skip_attention else attention_rows([(392, 256), (1152, 1000), (2047, 2000)],
                                                                   args.attention_sweep),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.w4a16:  # the file is rewritten after each stage: a run stopped by a time limit keeps what finished
        result["w4a16_gemv"] = []

        def done(row: dict[str, Any]) -> None:
            result["w4a16_gemv"].append(row)
            args.out.write_text(json.dumps(result, indent=2) + "\n")

        w4a16_rows(sweep=args.w4a16_sweep, done=done)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
