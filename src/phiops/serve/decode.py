"""Fast single-stream decoding: a static KV cache, the step compiled and replayed as one CUDA graph.

Batch-1 decoding of a model this size is bound by memory bandwidth: each token reads every
weight once. An eager forward cannot get near that bound, because launching ~30 small kernels
per layer from Python costs more than the GPU needs to run them. ``GraphDecoder`` removes that
cost the way gpt-fast and vLLM do:

1. a static KV cache (transformers ``StaticLayer``, one per decoder layer) preallocated for
   ``max_len`` tokens, so that every decode step has the same shapes and addresses;
2. the step (one token in, its logits out) compiled by ``torch.compile(fullgraph=True)``
   (inductor fuses the norms, rotary and activations into a few kernels);
3. that compiled step captured once as a CUDA graph and replayed per token: one launch.

The cache holds plain (non-sliding) layers, so a model with a sliding window (Phi-3's 2047) is
only decoded here while its whole sequence fits the window, where the window masks nothing;
``fits`` says so, and the engine keeps longer requests on its dynamic-cache path.

``int4_linears`` swaps compressed-tensors W4A16 linears (pack-quantized, group-wise, symmetric
or with zero points) for PyTorch's own int4 weight-only matmul, right after loading: on CUDA
``aten._weight_int4pack_mm`` (the tinygemm kernel), on CPU ``aten._weight_int4pack_mm_for_cpu``
(bf16 and float32 activations). Left alone, compressed-tensors decompresses each layer to full
precision at its first forward and keeps it so: the model then holds as much as the merged one.
Layers the kernel cannot take fall back to a dequantized ``nn.Linear`` (``DequantizedLinear``),
logged and counted (``weights_held``). On CPU, prefill-sized inputs (``PREFILL_ROWS``) dequantize
the layer for the call and run the dense GEMM, which beats the int4 kernel there.

``W4A16Linear`` keeps a W4A16 layer packed as compressed-tensors stores it and runs our Triton
kernels (``kernels.gemv_w4``, ``kernels.matmul_w4``); ``FusedDecoder`` streams such layers too.
It is the CUDA default for the llama-family models ``FusedDecoder`` covers (``w4a16_kernel`` says
when; ``PHIOPS_W4A16_KERNEL=tinygemm`` turns it off): ``int4_linears(..., kernel="triton")``.

On CPU the decoders run without the CUDA graph (tests check them against the plain forward).
This module needs only torch and transformers (and compressed-tensors for W4A16); it ships in
the bento inside the phiops wheel; the service's loader (phiops.serve.loader) imports it on every
device for the int4 swap, and on CUDA for the solo decoders.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

log = logging.getLogger("bentoml.phiops.decode")

# Inductor's coordinate-descent tuning: it also turns each batch-1 matmul into a fused Triton
# reduction (norm + GEMV in one kernel). On an H100 (Phi-3-mini shape, bench/decode_phi3_mini.py)
# the step ran 3.46-3.75 ms against 3.80-3.82 ms for cuBLAS GEMVs, for a compile of 62-87 s vs ~34 s.
INDUCTOR_OPTIONS: dict[str, Any] = {"coordinate_descent_tuning": True}


@contextlib.contextmanager
def capture(graph: Any, pool: Any = None) -> Iterator[None]:
    """``torch.cuda.graph`` for the decoders' captures, which run on the engine's thread while others
    live: in ``thread_local`` mode another thread's CUDA call (a graph freed there, say) does not
    invalidate this capture, and with Python's cyclic GC paused none of its passes frees a graph
    inside it. (With the default mode, the fused decoder's first capture in an engine was
    invalidated so on an H200 when other tests' engines had run in the process: "operation not
    permitted when stream is capturing (function reset)", and every later capture in the process
    failed.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            yield
    finally:
        if enabled:
            gc.enable()


def undispatch(model: Any, device: str) -> None:
    """Drop compressed-tensors' offload wrappers (present where llm-compressor loaded or made the
    model in this process): each wrapped forward moves its inputs, which torch.compile cannot
    trace. Every tensor ends up on ``device``; a model without wrappers is left as it is."""
    try:
        from compressed_tensors.offload.cache.base import OffloadCache
        from compressed_tensors.offload.dispatch import remove_dispatch
    except ImportError:
        return
    if any(isinstance(m._parameters, OffloadCache) for m in model.modules()):
        remove_dispatch(model, onload_tensors=True)
        model.to(device)


def sliding_window(model: Any) -> int | None:
    cfg = model.config.get_text_config(decoder=True)
    window = getattr(cfg, "sliding_window", None)
    return int(window) if window else None


class GraphDecoder:
    """Batch-1 prefill and decode over a static cache; on CUDA each decode step is a graph replay.

    Args:
        model: a loaded causal LM (eval mode) on ``device``.
        max_len: the most tokens (prompt and generated) one sequence may hold.
        device: ``"cuda"`` (compiled and captured) or ``"cpu"`` (eager, same cache logic).
        compile: torch.compile the step (default: on CUDA only).
        options: inductor options for that compile; default ``INDUCTOR_OPTIONS``.
        sdpa_backends: restrict the attention kernels the compiled step may use
            (``torch.nn.attention.SDPBackend`` values; None: PyTorch's choice).

    Use: ``logits = dec.prefill(ids)``, then ``logits = dec.step(token)`` per token; the logits
    (``[1, vocab]``) live in a buffer the next step overwrites.
    """

    def __init__(self, model: Any, max_len: int, device: str, *, compile: bool | None = None,
                 options: dict[str, Any] | None = None, sdpa_backends: list[Any] | None = None) -> None:
        from transformers.cache_utils import Cache, StaticLayer

        window = sliding_window(model)
        if window is not None and max_len > window:
            raise ValueError(f"max_len {max_len} exceeds the model's sliding window {window}: "
                             "a static cache of plain layers would attend past it")
        undispatch(model, device)
        self.model, self.device, self.max_len = model, device, max_len
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache = Cache(layers=[StaticLayer(max_cache_len=max_len) for _ in range(n_layers)])
        self.length = 0  # tokens now in the cache
        self._tok = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._pos = torch.zeros((1,), dtype=torch.long, device=device)
        self._graph: Any = None
        self._logits: Any = None
        self._cuda = device == "cuda"
        use_compile = self._cuda if compile is None else compile
        self._sdpa = sdpa_backends
        self._fn = (torch.compile(self._forward, fullgraph=True, dynamic=False,
                                  options=INDUCTOR_OPTIONS if options is None else options)
                    if use_compile else self._forward)

    def fits(self, tokens: int) -> bool:
        return tokens <= self.max_len

    def _forward(self, tok: Any, pos: Any) -> Any:
        out = self.model(input_ids=tok, cache_position=pos, position_ids=pos[None], past_key_values=self.cache,
                         use_cache=True)
        return out.logits[:, -1, :]

    def prefill(self, ids: list[int]) -> Any:
        """Reset the cache and run the prompt through it (eager); the last position's logits."""
        if not ids or not self.fits(len(ids)):
            raise ValueError(f"prompt of {len(ids)} tokens does not fit a cache of {self.max_len}")
        self.cache.reset()  # zeroes keys/values and each layer's write position, in place
        pos = torch.arange(len(ids), device=self.device)
        out = self.model(input_ids=torch.tensor([ids], device=self.device), cache_position=pos,
                         position_ids=pos[None], past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.length = len(ids)
        return out.logits[:, -1, :]

    def step(self, token: Any) -> Any:
        """Append ``token`` (a 0-d or 1-element tensor on the device) and return the next logits."""
        if self.length >= self.max_len:
            raise ValueError(f"the cache of {self.max_len} tokens is full")
        self._tok.copy_(token.view(1, 1))
        self._pos.fill_(self.length)
        if not self._cuda:
            self._logits = self._fn(self._tok, self._pos)
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        self.length += 1
        return self._logits

    def _capture(self) -> None:
        """Compile (warm-up runs on a side stream), then record one step as a CUDA graph."""
        from torch.nn.attention import sdpa_kernel

        # Each run advances every layer's write position; the graph must start where we are.
        saved = [layer.cumulative_length.clone() for layer in self.cache.layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # The attention kernel is chosen when the step is traced, so the restriction holds in the graph.
        with sdpa_kernel(self._sdpa) if self._sdpa else contextlib.nullcontext():
            with torch.cuda.stream(stream):
                for _ in range(3):  # the first call compiles; later ones settle allocator and autotuning
                    self._fn(self._tok, self._pos)
                    for layer, n in zip(self.cache.layers, saved):
                        layer.cumulative_length.copy_(n)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with capture(graph):
                self._logits = self._fn(self._tok, self._pos)
        self._graph = graph
        log.info("decode step captured as a CUDA graph (cache of %d tokens)", self.max_len)

    def export(self) -> Any:
        """The cached tokens as a ``DynamicCache`` (copies), for the batching engine to continue."""
        from transformers import DynamicCache

        out = DynamicCache()
        for i, layer in enumerate(self.cache.layers):
            out.update(layer.keys[:, :, :self.length].clone(), layer.values[:, :, :self.length].clone(), i)
        return out


# ---- the same step as hand-written Triton kernels (llama-family decoders) ------------------------

FUSED_MODEL_TYPES = ("llama", "phi3")


def fused_unsupported(model: Any) -> str | None:
    """Why ``FusedDecoder`` cannot decode ``model`` (None: it can)."""
    cfg = model.config.get_text_config(decoder=True)
    if cfg.model_type not in FUSED_MODEL_TYPES:
        return f"model type {cfg.model_type!r} (the kernels cover {', '.join(FUSED_MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"activation {getattr(cfg, 'hidden_act', None)!r}"
    if model.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {model.dtype}"
    for layer in model.model.layers:
        for group in (_attn_linears(layer), (layer.self_attn.o_proj,), _mlp_linears(layer), (layer.mlp.down_proj,)):
            reason = _matrix_unsupported(group)
            if reason:
                return reason
    if _matrix_unsupported((model.lm_head,)):
        return f"lm_head: {_matrix_unsupported((model.lm_head,))}"
    return None


def _matrix_unsupported(linears: tuple[Any, ...]) -> str | None:
    """Why linears applied to one input cannot be one GEMV: all plain bf16/fp linears, or all
    ``W4A16Linear`` of one group size and kind (symmetric or not); no biases."""
    for m in linears:
        if type(m) not in (nn.Linear, W4A16Linear) or m.bias is not None:
            return f"layer {type(m).__name__}{' with a bias' if getattr(m, 'bias', None) is not None else ''}"
    kinds = {(type(m), getattr(m, "group_size", None), getattr(m, "weight_zero_point", None) is None) for m in linears}
    if len(kinds) > 1:
        return f"layers {', '.join(type(m).__name__ for m in linears)} of different kinds on one input"
    return None


def _attn_linears(layer: Any) -> tuple[Any, ...]:
    a = layer.self_attn
    return (a.qkv_proj,) if hasattr(a, "qkv_proj") else (a.q_proj, a.k_proj, a.v_proj)


def _mlp_linears(layer: Any) -> tuple[Any, ...]:
    m = layer.mlp
    return (m.gate_up_proj,) if hasattr(m, "gate_up_proj") else (m.gate_proj, m.up_proj)


def _fuse_rows(ws: list[Any]) -> tuple[Any, list[Any] | None]:
    """One ``[sum(rows), cols]`` tensor of row-major 2-d tensors, and row views of it to put back
    (None: they already lie adjacent in one storage, and the fused tensor is a view of it)."""
    rows, k = sum(w.shape[0] for w in ws), ws[0].shape[1]
    first = ws[0]
    adjacent, offset = True, first.storage_offset()
    for w in ws:
        adjacent &= (w.is_contiguous() and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                     and w.storage_offset() == offset)
        offset += w.numel()
    if adjacent:
        return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, k), (k, 1)), None
    fused = torch.cat(ws).contiguous()
    views, start = [], 0
    for w in ws:
        views.append(fused[start:start + w.shape[0]])
        start += w.shape[0]
    return fused, views


def _fused_weight(linears: tuple[Any, ...]) -> Any:
    """One ``[sum(out), in]`` weight for linears applied to the same input (Llama's q/k/v, gate/up).

    The layers' own weights become row views of it, so the model keeps working and the memory
    is not doubled; a second call finds them already adjacent and returns the same storage.
    """
    fused, views = _fuse_rows([m.weight.data for m in linears])
    for m, v in zip(linears, views or ()):
        m.weight.data = v
    return fused


def _fused_matrix(linears: tuple[Any, ...]) -> Any:
    """``_fused_weight`` for dense layers; for ``W4A16Linear`` ones the same over their packed
    weights and scales (the layers keep row views), as ``(packed, scale, zero_point, group)``.
    Zero points are packed 8 rows to a word, so a fused set of them is repacked (a copy: they are
    1/512 of the weights at group 128)."""
    if type(linears[0]) is nn.Linear:
        return _fused_weight(linears)
    packed, views = _fuse_rows([m.weight_interleaved for m in linears])
    for m, v in zip(linears, views or ()):
        m.weight_interleaved = v
    scale, views = _fuse_rows([m.weight_scale for m in linears])
    for m, v in zip(linears, views or ()):
        m.weight_scale = v
    zp = linears[0].weight_zero_point
    if zp is not None and len(linears) > 1:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        zp = pack_to_int32(torch.cat([m.zero_point_codes() for m in linears]), 4, packed_dim=0).contiguous()
    return packed, scale, zp, linears[0].group_size


def rotary_tables(model: Any, max_len: int, device: str) -> tuple[Any, Any, int]:
    """cos and sin ``[max_len, head_dim]`` float32 (scaling applied) for the kernels' rotary: the
    model's own tables, padded with 1 and 0 past the rotated dimensions (Phi-3's partial rotary);
    and how many dimensions rotate."""
    inner = model.model
    head_dim = inner.layers[0].self_attn.head_dim
    cos, sin = inner.rotary_emb(torch.zeros(1, device=device), torch.arange(max_len, device=device)[None])
    rot = cos.shape[-1]
    full_cos = torch.ones((max_len, head_dim), dtype=torch.float32, device=device)
    full_sin = torch.zeros((max_len, head_dim), dtype=torch.float32, device=device)
    full_cos[:, :rot], full_sin[:, :rot] = cos[0], sin[0]
    return full_cos, full_sin, rot


def layer_matrices(model: Any) -> list[tuple[Any, ...]]:
    """Per decoder layer: its (q/k/v, o, gate/up, down) matrices fused as the kernels take them (a
    dense weight, or a packed W4A16 one: ``_fused_matrix``), both RMSNorm weights and their epsilon."""
    return [(_fused_matrix(_attn_linears(layer)), _fused_matrix((layer.self_attn.o_proj,)),
             _fused_matrix(_mlp_linears(layer)), _fused_matrix((layer.mlp.down_proj,)),
             layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data,
             float(layer.input_layernorm.variance_epsilon)) for layer in model.model.layers]


# The W4A16 roles whose packed words each layer's attention kernel requests into the L2 before its
# wait, while its latency-bound work leaves the memory bus idle. One H200, Phi-3-mini, every launch
# config held equal (bench/results/decode_l2_prefetch_ab_h200.json): W4A16 o_proj's 4.7 MB 1.011x
# through the engine (720.0 against 712.2 tok/s); with gate/up's 25 MB as well 0.954x; bf16 o_proj's
# 18.9 MB 0.993x (its preload config already streams them), so bf16 weights are never prefetched.
L2_PREFETCH = ("o",)

# The roles whose bf16 GEMV runs after a latency-bound kernel (o_proj after attention and its
# combine, a few microseconds in which the memory bus is idle): ``_tune`` times only the configs that
# request all of their K before waiting, so that the weights stream while attention runs. It used to
# time them beside the plain ones, and picked a plain one for 4 of the 5 bf16 decoders tuned for
# bench/results/decode_attn_prefetch*_h200.json: timed back to back, without attention between
# launches, the preload's gain cannot show. In the step, with the other roles' configs held equal,
# o_proj's preload config (8, 1024, 4, 4) ran the raw step 1.045x and 1.012x and the lone request
# through the engine 1.044x and 1.030x faster than its plain (8, 512, 4), in two runs
# (decode_attn_prefetch_ab_h200.json, ``no_prefetch_*``; decode_o_in_context_h200.json, ``fused_o_ab``).
PRELOAD_ROLES = ("o",)


class FusedDecoder(GraphDecoder):
    """``GraphDecoder`` whose step is five Triton kernels per layer (``phiops.serve.kernels``), not a compile.

    Each weight matrix is streamed by one kernel that also does the work around it: the RMSNorm
    before the q/k/v and gate/up projections, rotary embedding and the cache write inside the
    attention kernel, SiLU gating after gate/up, the residual adds after o and down. The step
    (5-6 launches a layer, with the attention splits' combine, and 3 more) is captured as one CUDA
    graph, as in ``GraphDecoder``; there is no torch.compile, so a decoder is ready after the
    kernels' first-call tuning and compiling (34 s on an H100 for Phi-3-mini, against 60-87 s).

    For llama-family models only (``fused_unsupported`` says why not); prefill runs the model's
    own forward into the same static cache, and ``export`` hands the cache over unchanged.
    """

    def __init__(self, model: Any, max_len: int, device: str, *, chunk: int | None = None, tune: bool = True,
                 preload: bool = True, l2_prefetch: tuple[str, ...] | None = None, mma: bool = True) -> None:
        """``chunk``: positions per attention split (default: ``kernels.Attention``'s choice).
        ``tune``: time each role's launch configs in a graph before capturing the step (``_tune``);
        False leaves them to Triton's autotuner (the benches' baseline). ``preload``: the bf16
        GEMVs of ``PRELOAD_ROLES`` request all of K before waiting (False: one tile, the benches' baseline).
        ``l2_prefetch``: the roles ("o", "gate_up") whose weights each layer's attention kernel
        requests into the L2 before it waits for q/k/v (W4A16: the packed words), () for none;
        None: ``L2_PREFETCH`` (o_proj's where it is W4A16). ``mma``: ``_tune`` also times the
        tensor-core W4A16 GEMV (``phiops.serve.mma``) where it can run (False: the benches' baseline)."""
        reason = fused_unsupported(model)
        if reason:
            raise ValueError(f"FusedDecoder does not support this model: {reason}")
        super().__init__(model, max_len, device, compile=False)
        from phiops.serve import kernels as K

        self._K = K
        cfg = model.config.get_text_config(decoder=True)
        inner = model.model
        attn0 = inner.layers[0].self_attn
        hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = attn0.head_dim
        self._cos, self._sin, rot = rotary_tables(model, max_len, device)
        self._attn = K.Attention(heads=hq, kv_heads=hkv, head_dim=head_dim, rotary_dim=rot,
                                 max_len=max_len, scaling=float(attn0.scaling), device=device, chunk=chunk)
        self._layers, self._lm_head = layer_matrices(model), _fused_matrix((model.lm_head,))
        self._embed = inner.embed_tokens.weight.data
        self._norm, self._norm_eps = inner.norm.weight.data, float(inner.norm.variance_epsilon)
        dtype = model.dtype
        new = lambda n, t=dtype: torch.empty((n,), dtype=t, device=device)
        # The inputs of o_proj and down_proj stay float32 when those are W4A16: their kernel then
        # reads them without a bf16 convert per activation (a tenth of its instructions).
        ao_dtype, h_dtype = (dtype if isinstance(self._layers[0][i], torch.Tensor) else torch.float32 for i in (1, 3))
        self._x, self._qkv = new(cfg.hidden_size), new((hq + 2 * hkv) * head_dim)
        self._ao, self._h = new(hq * head_dim, ao_dtype), new(inner.layers[0].mlp.down_proj.in_features, h_dtype)
        self._logits = torch.empty((1, model.lm_head.out_features), dtype=dtype, device=device)
        self._fn = self._fused_step
        self.tune, self.preload, self.mma = tune, preload, mma
        if l2_prefetch is None:
            l2_prefetch = tuple(r for r in L2_PREFETCH
                                if not isinstance(self._calls(self._layers[0])[r][0], torch.Tensor))
        self.l2_prefetch = l2_prefetch
        # per layer, the tensors its attention prefetches: a dense weight, or a W4A16 one's packed words
        self._prefetch = [tuple(w if isinstance(w, torch.Tensor) else w[0]
                                for w in (self._calls(layer)[r][0] for r in l2_prefetch)) for layer in self._layers]
        # launch config per matrix role (_tune); ("mma", groups a warp, groups before the wait): the
        # tensor-core W4A16 kernel
        self.gemv_configs: dict[str, tuple[Any, ...]] = {}

    def _mv(self, w: Any, a: Any, out: Any, role: str = "", config: Any = None, **fused: Any) -> Any:
        config = config or self.gemv_configs.get(role)
        if isinstance(w, torch.Tensor):
            return self._K.gemv(w, a, out, config=config, **fused)
        if config and config[0] == "mma":
            from phiops.serve import mma

            return mma.gemv_w4_mma(*w, a, out, config=tuple(config[1:]), **fused)
        return self._K.gemv_w4(*w, a, out, config=config, **fused)

    def _specs(self, role: str) -> list[tuple[Any, Any, Any, dict[str, Any]]]:
        """Every launch of one role in a step, as (weight, input, output, fused stages)."""
        if role == "lm_head":
            return [(self._lm_head, self._x, self._logits, {"norm": self._norm, "eps": self._norm_eps})]
        return [self._calls(layer)[role] for layer in self._layers]

    def _calls(self, layer: tuple[Any, ...]) -> dict[str, tuple[Any, Any, Any, dict[str, Any]]]:
        """A layer's four weight matrices as (weight, input, output, fused stages), by role."""
        qkv, o, gate_up, down, ln1, ln2, eps = layer
        x = self._x
        return {"qkv": (qkv, x, self._qkv, {"norm": ln1, "eps": eps}),
                "o": (o, self._ao, x, {"residual": x}),
                "gate_up": (gate_up, x, self._h, {"norm": ln2, "eps": eps, "gated": True}),
                "down": (down, self._h, x, {"residual": x})}

    def _fused_step(self, tok: Any, pos: Any) -> Any:
        x, mv = self._x, self._mv
        torch.index_select(self._embed, 0, tok.view(1), out=x.view(1, -1))
        for cache, layer, prefetch in zip(self.cache.layers, self._layers, self._prefetch):
            calls = self._calls(layer)
            mv(*calls["qkv"][:3], role="qkv", **calls["qkv"][3])
            self._attn(self._qkv, cache.keys, cache.values, pos, self._cos, self._sin, self._ao, prefetch=prefetch)
            for role in ("o", "gate_up", "down"):
                mv(*calls[role][:3], role=role, **calls[role][3])
        return mv(self._lm_head, x, self._logits, role="lm_head", norm=self._norm, eps=self._norm_eps)

    def _capture(self) -> None:
        if self._cuda and self.tune:
            self._tune()
        super()._capture()

    def candidates(self, role: str) -> list[tuple[Any, ...]]:
        """The launch configs ``_tune`` times for a role: the bf16 GEMV's (those that request all of
        K before the wait alone, for ``PRELOAD_ROLES`` unless ``preload`` is off) or the W4A16 ones
        (``gemv_w4``'s, and the tensor-core kernel's where ``mma`` is on and ``mma.unsupported``
        finds nothing in any of the role's calls); none where the role's layers mix the two."""
        specs = self._specs(role)
        dense = [isinstance(w, torch.Tensor) for w, *_ in specs]
        if any(dense) != all(dense):
            return []
        if all(dense):
            return self._K.gemv_candidates(self.preload and role in PRELOAD_ROLES)
        configs: list[tuple[Any, ...]] = list(self._K.w4_candidates(specs[0][1].numel()))
        if self.mma:
            from phiops.serve import mma

            reasons = {mma.unsupported(*w[:3], w[3], a, out, fused.get("norm"), fused.get("residual"))
                       for w, a, out, fused in specs}
            if reasons == {None}:
                configs += [("mma", *c) for c in mma.CONFIGS]
            else:
                log.info("W4A16 %s: no tensor-core kernel (%s)", role, "; ".join(sorted(r for r in reasons if r)))
        return configs

    def _tune(self, replays: int = 5) -> None:
        """Each role's launch config (q/k/v, o, gate/up, down, LM head; bf16 and W4A16): the one whose
        GEMVs over all the layers run fastest back to back in a CUDA graph with PDL, as in the step
        (every layer's weights: far more than the L2).

        Triton's autotuner (``kernels.gemv`` / ``gemv_w4`` without a config) times one launch alone
        after flushing the L2, so it favours big register footprints that leave the next kernel no
        room to start early: on the H200 its W4A16 picks ran up to 1.2x slower in a graph than the
        best config (bench/results/decode_kernels_w4a16_h200.json, ``sweep``); timed this way, the
        whole bf16 step ran 1.02x and the W4A16 one 1.03x faster than on the autotuner's picks
        (bench/results/decode_solo_overlap_h200.json). The buffers this scribbles on are
        overwritten by the step.
        """
        import statistics

        for buf in (self._x, self._ao, self._h):
            buf.normal_()
        for role in ("qkv", "o", "gate_up", "down", "lm_head"):
            specs = self._specs(role)
            candidates = self.candidates(role)
            if not candidates:
                continue  # bf16 and W4A16 layers mixed: each launch left to its autotuner
            times = {}
            for cfg in candidates:
                for w, a, out, fused in specs[:1]:  # compiles outside the capture
                    self._mv(w, a, out, config=cfg, **fused)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with capture(graph):
                    for w, a, out, fused in specs:
                        self._mv(w, a, out, config=cfg, **fused)
                graph.replay()
                runs = []
                for _ in range(replays):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    runs.append(start.elapsed_time(end) * 1000 / len(specs))
                times[cfg] = statistics.median(runs)
                del graph
            best = self.gemv_configs[role] = min(times, key=times.get)
            kind = "bf16" if isinstance(specs[0][0], torch.Tensor) else "W4A16"
            log.info("%s %s: config %s, %.2f us a layer (%s)", kind, role, best, times[best],
                     ", ".join(f"{c}: {t:.2f}" for c, t in times.items()))


# ---- W4A16 through PyTorch's int4 kernel ---------------------------------------------------------

# The group sizes the int4 kernels take (both devices); llm-compressor writes 32-256.
INT4_GROUPS = (32, 64, 128, 256)
# From this many rows on, a CPU Int4Linear dequantizes its weight for the call and runs the dense
# GEMM: the int4 kernel re-decodes the weights for every few rows, and took 20 ms for 512 rows of a
# 1536x576 layer against 0.5 ms dense bf16 on AMX (0.19 vs 0.08 ms at 16 rows, where the dequantizing,
# ~2-3 ms a layer, would cost more than it saves). Decode steps stay on the kernel.
PREFILL_ROWS = 128


class Int4Linear(nn.Module):
    """``x @ ((weight_q - zero_point) * scale).T + bias`` through PyTorch's int4 weight-only kernel.

    Args:
        weight_q: int8 ``[out, in]`` in [-8, 7] (compressed-tensors' unpacked codes).
        scale: ``[out, in // group]``.
        group: columns per scale, one of ``INT4_GROUPS``.
        bias: ``[out]`` or None.
        device: ``cuda`` (tinygemm, ``aten._weight_int4pack_mm``) or ``cpu``
            (``aten._weight_int4pack_mm_for_cpu``).
        zero_point: ``[out, in // group]`` in [-8, 7] (asymmetric schemes), or None (symmetric).
        dtype: the activations' dtype, in and out. The kernel itself computes in 16 bits, as
            the scheme's name says (W4 weights, A16 activations): bfloat16 on CUDA (tinygemm's
            only input), bfloat16 or float16 on CPU. Float32 activations (``serve.dtype: auto``
            on CPUs without AMX) are rounded to bfloat16 on the way in: PyTorch's CPU kernel
            vectorizes only its 16-bit inputs, and with float32 ones it ran a 576x1536 layer
            ~200x slower (7.4-9.7 ms against 27-45 us a row, also under ATEN_CPU_CAPABILITY=avx2).
            The rounding (2^-9 relative) is far below the weights' int4 rounding.

    Raises:
        ValueError: a shape the kernel cannot tile (:func:`int4_unsupported` says which first).
    """

    def __init__(self, weight_q: Any, scale: Any, group: int, bias: Any, device: str,
                 zero_point: Any = None, dtype: Any = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_q.shape
        reason = _shape_unsupported(self.out_features, self.in_features, group, device)
        if reason:
            raise ValueError(f"Int4Linear: {reason}")
        self.group_size = group
        self.dtype = dtype
        self.compute_dtype = dtype if device == "cpu" and dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        u = weight_q.to(device=device, dtype=torch.int32).add_(8)  # the kernels' codes are unsigned: w = (u - 8) * s + z
        if device == "cuda":
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)  # group >= 32 divides it
            packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8),
                                                                inner_k_tiles)
            self._mm = torch.ops.aten._weight_int4pack_mm
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)  # the CPU op ignores the tiles
            self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        # Prefill-sized inputs go through a transient dequantized copy where the layout is the blocked one.
        self._cpu_blocked = device == "cpu" and self.out_features % 64 == 0
        s = scale.to(device=device, dtype=torch.float32)
        # (q - zp) * s = (u - 8) * s - zp * s: the zero point becomes the kernel's additive offset.
        z = torch.zeros_like(s) if zero_point is None else -zero_point.to(device=device, dtype=torch.float32) * s
        self.register_buffer("weight_int4pack", packed)
        self.register_buffer("scales_and_zeros",
                             torch.stack([s, z], -1).transpose(0, 1).contiguous().to(self.compute_dtype))
        self.bias = None if bias is None else nn.Parameter(bias.to(device=device, dtype=self.dtype), requires_grad=False)

    def forward(self, x: Any) -> Any:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= PREFILL_ROWS and self._cpu_blocked:
            # A prefill: dequantize this layer once (transient) and let the dense GEMM (AMX / MKL) run it.
            y = nn.functional.linear(x2.to(self.dtype), self._dequantized()).to(x.dtype)
        else:
            y = self._mm(x2.to(self.compute_dtype), self.weight_int4pack, self.group_size,
                         self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _dequantized(self) -> Any:
        """The weight as ``[out, in]`` in ``self.dtype``, from the CPU kernel's packed layout: blocks of 64
        output rows, ``[out / 64, in, 32]`` bytes, byte j holding row j (low nibble) and row j + 32."""
        n, k, g = self.out_features, self.in_features, self.group_size
        p = self.weight_int4pack.view(n // 64, k, 32)
        u = torch.cat([p & 15, p >> 4], dim=-1).transpose(1, 2).reshape(n, k // g, g)
        sz = self.scales_and_zeros.to(self.dtype)  # [in / group, out, 2]
        w = (u.to(self.dtype) - 8) * sz[:, :, 0].T.unsqueeze(-1) + sz[:, :, 1].T.unsqueeze(-1)
        return w.reshape(n, k)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"int4, computes in {str(self.compute_dtype).removeprefix('torch.')}")


class DequantizedLinear(nn.Linear):
    """A W4A16 layer the int4 kernel cannot take, dequantized once at load to the model's dtype.

    ``reason`` says why; :func:`weights_held` counts these. The weight is what compressed-tensors
    itself decompresses (its ``PackedQuantizationCompressor``), so outputs equal its own.
    """

    reason: str = ""


class W4A16Linear(nn.Module):
    """A compressed-tensors W4A16 layer kept as it is stored, run by our Triton kernels (CUDA).

    The buffers are compressed-tensors' own, the weight's nibbles reordered within each group
    (``kernels.interleave_w4``, int4-sized still), so the model holds int4-sized weights once; ``FusedDecoder`` streams them through ``kernels.gemv_w4``
    with its fused stages, and this module's own forward (prefill, the batched engine) runs
    ``kernels.gemv_w4`` for one row and ``kernels.matmul_w4`` for more.

    Args:
        packed: compressed-tensors' ``weight_packed``, int32 ``[out, in / 8]``; held interleaved
            (``weight_interleaved``).
        scale: ``[out, in / group]``, stored in ``dtype``.
        zero_point: int32 ``[ceil(out / 8), in / group]`` (``weight_zero_point``, asymmetric
            schemes) or None.
        group, in_features: the scheme's group size and the layer's input width.
        bias: ``[out]`` or None. dtype: the activations' dtype, in and out.
    """

    def __init__(self, packed: Any, scale: Any, zero_point: Any, group: int, in_features: int, bias: Any,
                 dtype: Any) -> None:
        super().__init__()
        self.out_features, self.in_features, self.group_size, self.dtype = packed.shape[0], in_features, group, dtype
        from phiops.serve.kernels import interleave_w4

        self.register_buffer("weight_interleaved", interleave_w4(packed, in_features, group))
        self.register_buffer("weight_scale", scale.to(dtype).contiguous())
        self.register_buffer("weight_zero_point", None if zero_point is None else zero_point.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def zero_point_codes(self) -> Any:
        """The zero points as int8 ``[out, ceil(in / group)]`` in [-8, 7]."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        return unpack_from_int32(self.weight_zero_point, 4, (self.out_features, self.weight_scale.shape[1]),
                                 packed_dim=0)

    def forward(self, x: Any) -> Any:
        from phiops.serve import kernels as K

        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        out = torch.empty((x2.shape[0], self.out_features), dtype=self.dtype, device=x.device)
        w = (self.weight_interleaved, self.weight_scale, self.weight_zero_point, self.group_size)
        if x2.shape[0] == 1:
            K.gemv_w4(*w, x2[0], out[0])
        elif x2.shape[0] > 1:
            K.matmul_w4(*w, x2, out)
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"int4 {'asymmetric' if self.weight_zero_point is not None else 'symmetric'}, Triton kernels")


def _shape_unsupported(out_features: int, in_features: int, group: int, device: str) -> str | None:
    if group not in INT4_GROUPS:
        return f"group size {group} (the kernel takes {', '.join(map(str, INT4_GROUPS))})"
    if in_features % group:
        return f"{in_features} input features are not a whole number of groups of {group}"
    # The kernels' tiling: the CPU one packs 16 output rows at a time (_convert_weight_to_int4pack_cpu
    # refuses others), tinygemm 8.
    rows = 16 if device == "cpu" else 8
    if out_features % rows:
        return f"{out_features} output features are not a multiple of {rows} ({device} kernel tiling)"
    return None


def int4_unsupported(module: Any, device: str) -> str | None:
    """Why a compressed-tensors packed linear cannot run on the int4 kernel on ``device`` (None: it can)."""
    reason = _scheme_unsupported(module)
    if reason:
        return reason
    w = module.quantization_scheme.weights
    shape = [int(v) for v in module.weight_shape.tolist()]
    return _shape_unsupported(shape[0], shape[1], w.group_size, device)


def w4a16_unsupported(module: Any) -> str | None:
    """Why a compressed-tensors packed linear cannot be a ``W4A16Linear`` (None: it can).

    The Triton kernels take any number of rows and whole groups of a multiple of 32 columns
    (llm-compressor writes 32-256, and K a multiple of the group).
    """
    reason = _scheme_unsupported(module)
    if reason:
        return reason
    group = module.quantization_scheme.weights.group_size
    if group % 32:
        return f"group size {group} (the Triton kernel takes multiples of 32)"
    if int(module.weight_shape[1]) % group:
        return f"{int(module.weight_shape[1])} input features are not a whole number of groups of {group}"
    if module.weight_packed.dtype != torch.int32:
        return f"weight_packed of {module.weight_packed.dtype}"
    return None


def _scheme_unsupported(module: Any) -> str | None:
    w = getattr(getattr(module, "quantization_scheme", None), "weights", None)
    if w is None:
        return "no weight quantization scheme"
    if w.num_bits != 4 or w.type != "int":  # compressed-tensors' enums are str enums
        return f"{w.num_bits}-bit {w.type} weights (the kernel takes int4)"
    if w.strategy != "group":
        return f"strategy {w.strategy} (the kernel takes group-wise scales)"
    # Activation-order "group" permutes columns across groups (weight_g_idx); the kernel's groups
    # are contiguous. "static" and "weight" reorder only during calibration and leave no g_idx.
    g_idx = getattr(module, "weight_g_idx", None)
    if g_idx is not None and not torch.equal(g_idx.cpu(), torch.arange(g_idx.numel()) // w.group_size):
        return f"activation order {w.actorder} (weight_g_idx permutes the groups)"
    if getattr(module, "input_scale", None) is not None or getattr(module, "input_zero_point", None) is not None:
        return "quantized activations"
    return None


def _unpacked(module: Any) -> tuple[Any, Any, Any]:
    """The int8 codes, scales and (asymmetric) zero points of a compressed-tensors packed linear."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w = module.quantization_scheme.weights
    shape = [int(v) for v in module.weight_shape.tolist()]
    q = unpack_from_int32(module.weight_packed, w.num_bits, shape)
    zp = None
    if not w.symmetric:
        zp = unpack_from_int32(module.weight_zero_point, w.num_bits, (shape[0], module.weight_scale.shape[-1]),
                               packed_dim=0)
    return q, module.weight_scale, zp


def _dequantized_linear(module: Any, dtype: Any, device: str, reason: str) -> DequantizedLinear:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    state = {n: t for n, t in module.named_parameters(recurse=False)}
    state.update({n: t for n, t in module.named_buffers(recurse=False)})
    weight = PackedQuantizationCompressor.decompress(state, module.quantization_scheme)["weight"]
    bias = getattr(module, "bias", None)
    new = DequantizedLinear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False)
    new.reason = reason
    return new


def w4a16_kernel(model: Any, device: str) -> str:
    """Which kernel ``int4_linears`` should give a W4A16 model's layers on ``device``.

    ``"triton"`` (``W4A16Linear``, our kernels, ``FusedDecoder`` for a lone request) on CUDA for the
    llama-family model types ``FusedDecoder`` covers when every packed layer fits, unless
    ``PHIOPS_W4A16_KERNEL=tinygemm`` asks for PyTorch's (``Int4Linear``, ``GraphDecoder``). The
    default since the H200 run in bench/results/decode_w4a16_h200.json (Phi-3-mini shape): the fused
    Triton step decoded 717 tokens/s against tinygemm's 455 in the compiled graph, and a lone
    request through the engine 520 against 355. The CPU and Phi-2 always take tinygemm.
    """
    import os

    choice = os.environ.get("PHIOPS_W4A16_KERNEL", "triton")
    if choice not in ("triton", "tinygemm"):
        raise ValueError(f"PHIOPS_W4A16_KERNEL={choice!r}: triton or tinygemm")
    cfg = model.config.get_text_config(decoder=True)
    packed = [m for m in model.modules() if hasattr(m, "weight_packed")]
    if (device != "cuda" or choice != "triton" or cfg.model_type not in FUSED_MODEL_TYPES or not packed
            or any(w4a16_unsupported(m) for m in packed)):
        return "tinygemm"
    return "triton"


def int4_linears(model: Any, device: str, dtype: Any = None, kernel: str = "tinygemm") -> tuple[int, int]:
    """Replace every compressed-tensors W4A16 linear by an int4-kernel one, or a dequantized one.

    Call it before the model's first forward: compressed-tensors decompresses every layer to full
    precision then, and keeps it so. A layer the kernel cannot take (:func:`int4_unsupported`)
    becomes a :class:`DequantizedLinear` once, here, and a log line says why.

    Args:
        model: a causal LM loaded by transformers (its W4A16 layers still packed).
        device: where it runs (``cuda`` or ``cpu``).
        dtype: the activations' dtype (default: the model's).
        kernel: ``"tinygemm"`` (:class:`Int4Linear`) or ``"triton"`` (:class:`W4A16Linear`, the
            packed tensors kept as they are; :func:`w4a16_kernel` says which the service uses).

    Returns:
        ``(packed, dequantized)``: how many layers run on an int4 kernel, how many fell back.
    """
    if kernel not in ("tinygemm", "triton"):
        raise ValueError(f"unknown W4A16 kernel {kernel!r} (tinygemm or triton)")
    if not any(hasattr(m, "weight_packed") for m in model.modules()):
        return 0, 0
    dtype = dtype or model.dtype
    undispatch(model, device)
    packed, fallback = 0, 0
    # Names, not modules: a list of the modules would keep every replaced layer alive to the end.
    for name in [n for n, m in model.named_modules() if hasattr(m, "weight_packed")]:
        module = model.get_submodule(name)
        if kernel == "triton" and w4a16_unsupported(module) is None:
            w = module.quantization_scheme.weights
            new: nn.Module = W4A16Linear(module.weight_packed.data, module.weight_scale.data,
                                         None if w.symmetric else module.weight_zero_point.data, w.group_size,
                                         int(module.weight_shape[1]), getattr(module, "bias", None), dtype)
            packed += 1
        elif (reason := int4_unsupported(module, device)) is None:
            q, scale, zp = _unpacked(module)
            new = Int4Linear(q, scale, module.quantization_scheme.weights.group_size,
                             getattr(module, "bias", None), device, zero_point=zp, dtype=dtype)
            packed += 1
        else:
            new = _dequantized_linear(module, dtype, device, reason)
            log.warning("W4A16 layer %s dequantized to %s: %s", name, str(dtype).removeprefix("torch."), reason)
            fallback += 1
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        del module, new
    # Each layer's unpacked codes (5 bytes a weight, freed at once) leave glibc's heap fragmented:
    # SmolLM2-135M's swap left 513 MB more RSS than its 116 MB of weights until trimmed.
    # And the replaced modules sit in reference cycles holding the checkpoint's mmapped pages
    # (170 MB of RSS) until a collection.
    import gc

    from phiops.serve.engine import _TRIM

    gc.collect()
    if device == "cpu" and _TRIM is not None:
        _TRIM(0)
    return packed, fallback


def weights_held(model: Any) -> str:
    """How the model's linear layers hold their weights, for the eval table and the service's log.

    Returns:
        e.g. ``int4 packed 210/210 linears``, ``int4 packed 200/210 linears; 10 dequantized``,
        ``dequantized 210/210 linears`` (compressed-tensors decompressed them), or
        ``bfloat16 dense`` for a model without W4A16 layers.
    """
    total = int4 = fallback = ct_packed = 0
    for m in model.modules():
        if isinstance(m, (Int4Linear, W4A16Linear)):
            int4 += 1
        elif isinstance(m, DequantizedLinear):
            fallback += 1
        elif hasattr(m, "weight_packed"):
            ct_packed += 1
        elif getattr(m, "quantization_scheme", None) is not None and isinstance(m, nn.Linear):
            fallback += 1  # compressed-tensors' own module, decompressed at its first forward
        else:
            continue
        total += 1
    if total == 0:
        return f"{str(model.dtype).removeprefix('torch.')} dense"
    parts = []
    if int4:
        parts.append(f"int4 packed {int4}/{total} linears")
    if ct_packed:
        parts.append(f"compressed-tensors packed {ct_packed}/{total} (dequantized at the first forward)")
    if fallback:
        parts.append(f"{fallback} dequantized" if parts else f"dequantized {fallback}/{total} linears")
    return "; ".join(parts)  # no commas: it is a cell of the eval table's CSV
