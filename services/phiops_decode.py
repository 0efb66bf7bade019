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

``int4_linears`` swaps compressed-tensors W4A16 linears (pack-quantized, symmetric, grouped)
for PyTorch's own int4 weight-only matmul (``aten._weight_int4pack_mm``, the tinygemm kernel):
the compressed-tensors module dequantizes its whole weight on every call, which reads more
bytes than the bf16 model it replaces.

On CPU the same code runs without the CUDA graph (tests check it against the plain forward).
This module needs only torch and transformers (and compressed-tensors for W4A16); it ships in
the bento beside service.py, which imports it on CUDA only.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("bentoml.phiops.decode")

# Inductor's coordinate-descent tuning: it also turns each batch-1 matmul into a fused Triton
# reduction (norm + GEMV in one kernel). On an H100 (Phi-3-mini shape, bench/decode_phi3_mini.py)
# the step ran 3.46-3.75 ms against 3.80-3.82 ms for cuBLAS GEMVs, for a compile of 62-87 s vs ~34 s.
INDUCTOR_OPTIONS: dict[str, Any] = {"coordinate_descent_tuning": True}


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
            with torch.cuda.graph(graph):
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


# ---- W4A16 through PyTorch's int4 kernel ---------------------------------------------------------


class Int4Linear(nn.Module):
    """``x @ (weight_q * scale).T + bias`` through PyTorch's int4 weight-only kernel.

    weight_q: int8 ``[out, in]`` in [-8, 7]; scale: ``[out, in // group]``.
    """

    def __init__(self, weight_q: Any, scale: Any, group: int, bias: Any, device: str) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_q.shape
        self.group_size = group
        inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)  # group >= 32 divides it
        u = (weight_q.to(torch.int32) + 8).to(device)  # the kernel's codes are unsigned: w = (u - 8) * s + z
        if device == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8),
                                                                inner_k_tiles)
            self._mm = torch.ops.aten._weight_int4pack_mm
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, inner_k_tiles)
            self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        s = scale.to(device=device, dtype=torch.bfloat16)
        self.register_buffer("weight_int4pack", packed)
        self.register_buffer("scales_and_zeros", torch.stack([s, torch.zeros_like(s)], -1).transpose(0, 1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(device=device, dtype=torch.bfloat16),
                                                            requires_grad=False)

    def forward(self, x: Any) -> Any:
        y = self._mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight_int4pack, self.group_size,
                     self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, int4"


def int4_linears(model: Any, device: str) -> int:
    """Replace every compressed-tensors W4A16 linear (symmetric int4, group-wise) by an int4-kernel one.

    Returns how many were replaced; layers in any other format are left as they are.
    """
    if not any(hasattr(m, "weight_packed") for m in model.modules()):
        return 0
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    undispatch(model, device)
    swapped = 0
    for name, module in list(model.named_modules()):
        scheme = getattr(module, "quantization_scheme", None)
        w = getattr(scheme, "weights", None)
        if w is None or not hasattr(module, "weight_packed"):
            continue
        if not (w.num_bits == 4 and w.symmetric and str(w.strategy).endswith("group") and w.group_size in (32, 64, 128, 256)
                and w.actorder in (None, "static") and getattr(module, "weight_g_idx", None) is None):
            continue
        shape = [int(v) for v in module.weight_shape.tolist()]
        if shape[0] % 8 or shape[1] % w.group_size:  # the kernel's tiling
            continue
        q = unpack_from_int32(module.weight_packed, 4, shape)
        new = Int4Linear(q, module.weight_scale, w.group_size, getattr(module, "bias", None), device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped += 1
    return swapped
