"""Load the stored model a service serves: verify it, load it, pick its dtype and decoder.

Compressed-tensors W4A16 linears (the GPTQ/AWQ candidates) are swapped for an int4 kernel
(``decode.int4_linears``) right after loading, before the first forward (``PHIOPS_INT4=0`` turns
it off): on CUDA, for the llama-family models ``FusedDecoder`` covers, our Triton kernels on the
packed tensors (``decode.W4A16Linear``; ``decode.w4a16_kernel`` says when, and
``PHIOPS_W4A16_KERNEL=tinygemm`` turns them off), else PyTorch's int4 weight-only kernel
(``decode.Int4Linear``). Otherwise compressed-tensors
decompresses every layer at the first forward and serves a full-precision model: SmolLM2-135M's
173 MB GPTQ file then held 544.7 MB on a float32 CPU. A layer the kernel cannot take (a shape it
cannot tile, activation-order groups) is dequantized once at load instead, and logged; the
weights' form is logged too (``decode.weights_held``). The CPU kernel runs bf16 and float32
activations, so ``dtype: auto`` keeps its meaning (bench/w4a16_cpu.py measures both).

On CUDA one more thing happens at load (``PHIOPS_CUDA_FASTPATH=0`` turns it off): a request
that is alone decodes over a static cache of ``max_prompt_tokens + max_new_tokens`` tokens, one
CUDA graph replay per token: through ``decode.FusedDecoder`` (Triton kernels, ``kernels``) for
llama-family models in bf16/fp16/fp32 (SmolLM2, Phi-3, Phi-4-mini, Phi-4; their W4A16 checkpoints
too), else through ``decode.GraphDecoder`` (the step compiled by
torch.compile; W4A16 on ``Int4Linear``, Phi-2); the warm-up generation tunes or compiles it and
captures the graph. Concurrent requests (two or more rows) decode over a paged KV pool, a
``kv_cache_fraction`` of the memory left free after loading, with the batched step captured as
CUDA graphs at load (``paged.PagedDecoder``, ``cuda_paged``; ``PHIOPS_PAGED=0`` turns it off), for
the same llama-family models; Phi-2 keeps the dynamic cache and the model's own forward.

``dtype: auto`` means bfloat16 on CUDA, and on CPUs with AMX tiles (their bf16 matrix units):
there the batched forward passes that serving runs measured 1.5x (decode, 32 rows) to 3.3x
(prefill) faster than float32 for SmolLM2-135M; float32 on other CPUs (bf16 emulated there is
slower).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from phiops.serve.checkpoint import CHECKPOINT_SUBDIR, eos_ids, lineage, verify_checkpoint
from phiops.serve.settings import Settings

log = logging.getLogger("bentoml.phiops")

# bf16 matmuls on CPU (oneDNN) JIT-compile a kernel per matrix shape, and every prefill brings new
# ones (rows x prompt length). Two caches keep each kernel with its scratchpad (~0.25 MB, more
# for more rows), both 1024 entries by default: oneDNN's primitive cache and, in front of it,
# PyTorch's ideep cache (LRU_CACHE_CAPACITY), which keeps alive what the first evicts. With only
# the first capped, the served worker grew 13.6 MB per 192 requests of bench/serve_cpu_load.py
# and still rose after 1,700; with both capped, 0.7 MB per 192 (no trend) after the warm-up
# round (bench/README.md). 256 still holds every decode shape (1-32 rows x the model's few
# weight shapes), and a kernel evicted and needed again costs ~1 ms to rebuild.
KERNEL_CACHE_CAPACITY = "256"


def cap_kernel_caches() -> None:
    """Cap both CPU kernel caches (see above); the environment still wins.

    Both are read at the first bf16 matmul, so call this before any (the service does at import).
    """
    for cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(cache, KERNEL_CACHE_CAPACITY)


def pick_dtype(setting: str, device: str) -> str:
    """The weights' dtype for `setting` on `device` (module doc)."""
    if setting != "auto":
        return setting
    if device == "cuda":
        return "bfloat16"
    import torch

    return "bfloat16" if torch.cpu._is_amx_tile_supported() else "float32"


@dataclass
class Loaded:
    """A model ready to serve, and what the API reports about it."""

    model: Any
    tokenizer: Any
    eos_ids: list[int]
    device: str
    dtype: str
    solo: Any  # a decoder for a lone request (CUDA), or None
    model_tag: str
    created: int  # unix time the model was stored
    lineage: dict[str, Any]
    paged: Any = None  # the batched rows' KV page pool and graph-captured step (CUDA), or None


def load_stored(stored: Any, settings: Settings) -> Loaded:
    """Verify and load a model from BentoML's model store.

    Args:
        stored: the ``bentoml.Model`` (the service's ``BentoModel`` reference).
        settings: the service's settings (dtype, and the cache length of the solo decoder).

    Returns:
        The loaded model, on CUDA when one is visible.

    Raises:
        RuntimeError: no safetensors checkpoint, files that differ from the sha256 manifest
            saved with the model, or a tokenizer without a chat template.
    """
    tag = str(stored.tag)
    meta = dict(stored.info.metadata or {})
    path = stored.path_of(CHECKPOINT_SUBDIR)
    if not os.path.isdir(path) or not any(n.endswith(".safetensors") for n in os.listdir(path)):
        raise RuntimeError(f"{tag}: no safetensors checkpoint at {path}")
    t0 = time.perf_counter()
    verify_checkpoint(path, (meta.get("phiops") or {}).get("files"), tag)
    log.info("%s: checkpoint matches its sha256 manifest (%.1fs)", tag, time.perf_counter() - t0)

    model, tokenizer, ids, device, dtype = load_checkpoint(path, settings.dtype, label=tag)
    solo = cuda_fastpath(model, settings, device) if device == "cuda" else None
    paged = cuda_paged(model, settings, device) if device == "cuda" else None
    return Loaded(model=model, tokenizer=tokenizer, eos_ids=ids, device=device, dtype=dtype, solo=solo, paged=paged,
                  model_tag=tag, created=int(stored.info.creation_time.timestamp()), lineage=lineage(meta))


def load_checkpoint(path: str, dtype_setting: str = "auto", device: str | None = None,
                    label: str | None = None, require_chat_template: bool = True,
                    ) -> tuple[Any, Any, list[int], str, str]:
    """Load a checkpoint directory the way the service serves it (the evaluate stage uses it too).

    Args:
        path: a safetensors checkpoint directory with its tokenizer (already verified).
        dtype_setting: ``serve.dtype`` (``auto``: :func:`pick_dtype`).
        device: ``cuda`` or ``cpu``; None: CUDA when one is visible.
        label: how log lines and errors name the model (default: the path).
        require_chat_template: refuse a tokenizer without one (the service does; evaluate applies
            the configured template to the base model after loading).

    Returns:
        ``(model, tokenizer, eos_ids, device, dtype)``; the model is in eval mode on ``device``.

    Raises:
        RuntimeError: the tokenizer has no chat template.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    label = label or str(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = pick_dtype(dtype_setting, device)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{label}: the tokenizer has no chat template; save one with the checkpoint")
    # compressed-tensors W4A16 (GPTQ/AWQ) checkpoints load through the same call: the
    # quantization_config in config.json selects transformers' compressed-tensors quantizer.
    # Its layers stay packed until their first forward (then a hook decompresses the whole model
    # for good), so the int4 swap below sees the packed codes and full-precision weights never
    # exist. (transformers 5.17: CompressedTensorsConfig(dequantize=False), the default;
    # run_compressed is deprecated and there is no CompressedLinear module any more.)
    model = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, trust_remote_code=False, dtype=getattr(torch, dtype)
    ).to(device).eval()
    ids = eos_ids(model, tokenizer)
    if os.environ.get("PHIOPS_INT4", "1") != "0":
        from phiops.serve.decode import int4_linears, w4a16_kernel

        kernel = w4a16_kernel(model, device)
        packed, fallback = int4_linears(model, device, kernel=kernel)
        if packed or fallback:
            log.info("%s: %d W4A16 linear layers run on the int4 kernel (%s), %d dequantized "
                     "(the kernel cannot take them; see the warnings above)", label, packed,
                     "Triton, packed as stored" if kernel == "triton" else "PyTorch's weight-only int4", fallback)
    if device == "cpu":
        # Batched decode steps read each grouped-query key/value head once (phiops.serve.batched);
        # measured on CPU only, so CUDA keeps transformers' SDPA path.
        from phiops.serve.batched import use_grouped_decode

        use_grouped_decode(model)
    from phiops.serve.decode import weights_held

    log.info("loaded %s on %s (%s; weights: %s) in %.1fs", label, device, dtype, weights_held(model),
             time.perf_counter() - t0)
    return model, tokenizer, ids, device, dtype


def cuda_fastpath(model: Any, settings: Settings, device: str) -> Any:
    """The solo-request decoder (module doc); None when off."""
    if os.environ.get("PHIOPS_CUDA_FASTPATH", "1") == "0":
        return None
    from phiops.serve.decode import FusedDecoder, GraphDecoder, fused_unsupported, sliding_window

    max_len = settings.max_prompt_tokens + settings.max_new_tokens
    # Longer than the sliding window: those requests take the batched (dynamic cache) path.
    max_len = min(max_len, sliding_window(model) or max_len)
    reason = fused_unsupported(model)
    if reason is None:
        log.info("a lone request decodes through the Triton kernels (FusedDecoder)")
        return FusedDecoder(model, max_len, device)
    log.info("a lone request decodes through the compiled step (GraphDecoder): no Triton kernels for %s", reason)
    return GraphDecoder(model, max_len, device)


def cuda_paged(model: Any, settings: Settings, device: str) -> Any:
    """The batched rows' paged KV pool and graph-captured step (``paged.PagedDecoder``); None when off
    (``PHIOPS_CUDA_FASTPATH=0`` or ``PHIOPS_PAGED=0``) or not possible (logged): the engine then
    batches over a dynamic cache through the model's own forward."""
    if os.environ.get("PHIOPS_CUDA_FASTPATH", "1") == "0" or os.environ.get("PHIOPS_PAGED", "1") == "0":
        return None
    import torch

    from phiops.serve.decode import fused_unsupported, sliding_window
    from phiops.serve.paged import PAGE, PagedDecoder, cdiv, page_bytes, pages_for_budget

    reason = fused_unsupported(model)
    max_len = settings.max_prompt_tokens + settings.max_new_tokens
    window = sliding_window(model)
    if reason is None and window is not None and max_len > window:
        reason = f"prompt + new tokens ({max_len}) exceed the model's sliding window ({window})"
    if reason:
        log.info("batched rows decode over a dynamic cache: no paged KV pool for %s", reason)
        return None
    free, _ = torch.cuda.mem_get_info()
    pages = pages_for_budget(model, int(free * settings.kv_cache_fraction), settings.max_batch_size, max_len)
    if pages < cdiv(max_len, PAGE):
        log.warning("batched rows decode over a dynamic cache: %.0f%% of the %.1f GiB free holds %d KV pages, "
                    "fewer than one request of %d tokens needs", 100 * settings.kv_cache_fraction, free / 2**30, pages,
                    max_len)
        return None
    t0 = time.perf_counter()
    dec = PagedDecoder(model, device, pages=pages, max_len=max_len, max_rows=settings.max_batch_size)
    dec.warm()
    log.info("KV page pool: %d pages of %d positions (%.2f GiB, %.0f%% of the free memory), batched decode "
             "captured for %s rows in %.1fs", pages, PAGE, pages * page_bytes(model) / 2**30,
             100 * settings.kv_cache_fraction, ",".join(map(str, dec.buckets)), time.perf_counter() - t0)
    return dec
