"""Decode speed of a Phi-3-mini-shaped model on one GPU: batch 1 against the memory-bandwidth bound.

    python bench/decode_phi3_mini.py --out bench/results/decode_phi3_mini_h100.json
    python bench/decode_phi3_mini.py --tiny --out /tmp/decode_tiny.json     # CPU smoke test
    python bench/decode_phi3_mini.py --skip-cb --profile --out bench/results/decode_w4a16_h200.json \
        --only fused,engine_solo_fused,int4_graph,w4a16_fused,w4a16_engine_solo_fused,w4a16_accuracy

The model is Phi-3-mini-4k-instruct's public shape (configs/phi-3-mini.yaml: hidden 3072, 32
layers, intermediate 8192, 32 heads, vocab 32064) with random weights built on the GPU: no hub,
no tokenizer files (the batching engine gets a word-level tokenizer made in code over the same
vocabulary size, so it decodes text per step as it does in the service).

Measured, each after a warm-up, on random prompt ids (the numbers do not depend on the values):

1. bf16, batch 1, greedy decode of `--steps` tokens after a `--prompt-len` prefill:
   - `eager`: DynamicCache, one plain forward per token (what `model.generate` does);
   - `graph`: the service's solo decoder (services/phiops_decode.py `GraphDecoder`): a static
     cache, the step compiled by inductor and replayed as one CUDA graph (the gpt-fast recipe);
     fed its own argmax on the GPU, no host sync per token;
   - `engine_solo`: one request through the service's engine (services/phiops_engine.py) with
     that decoder: adds sampling, the host sync, detokenizing and the event per token;
   - `fused` / `engine_solo_fused`: the same with `FusedDecoder`, the service's choice for
     llama-family models on CUDA: the step as Triton kernels (services/phiops_kernels.py, five
     per layer: norm-fused GEMVs, rotary + cache write + split-KV attention, gated and residual
     epilogues), captured as one CUDA graph, no torch.compile; `fused_no_pdl`: those kernels
     without programmatic dependent launch (`PHIOPS_PDL=0`), each starting after the last ends;
     `fused_autotuned`: the launch configs left to Triton's autotuner instead of timed per role in a
     graph (`FusedDecoder(tune=False)`); `fused_no_preload`: o_proj's GEMV requesting one tile of its
     weights before waiting for attention, not all of K (`FusedDecoder(preload=False)`);
     `fused_o_ab`: o_proj on a preload config and on a plain one, the other roles' configs the
     tuned decoder's, each raw and through the engine, two rounds; `engine_solo_fused_sync`: the
     engine recording each token before queueing the next step (`Engine(overlap=False)`, its way
     before the solo overlap) as the baseline of `engine_solo_fused`.
   `bf16_accuracy`: eager bf16 and `fused` logits against a float32 copy of the model.
   Each as tokens/s and as a fraction of the bound `bandwidth / bytes read per token`, where the
   bytes are every weight a decode step reads (all linear layers and the LM head; one embedding
   row, so the embedding table is left out). Goal: >= 70 % for bf16.
2. The same for W4A16 (llm-compressor `QuantizationModifier`, scheme W4A16, group 128, LM head
   kept bf16), saved as a compressed-tensors checkpoint and loaded back through
   `from_pretrained`, the service's path:
   - `compressed_tensors_eager`: as compressed-tensors runs it (it dequantizes every layer to
     bf16 at the first forward: a bf16-sized model, so its bound is the bf16 one);
   - `int4_graph` / `int4_engine_solo`: after `phiops_decode.int4_linears` (PyTorch's int4
     weight-only kernel on the packed weights, the service's CUDA path before the Triton one and
     still with `PHIOPS_W4A16_KERNEL=tinygemm`), through the solo decoder. Their bound uses the
     bytes the int4 model holds (packed weights, scales, the bf16 LM head).
   - `w4a16_eager` / `w4a16_fused` / `w4a16_fused_no_pdl` / `w4a16_engine_solo_fused`: after
     `int4_linears(kernel="triton")` (`W4A16Linear`: the packed tensors kept, interleaved within
     each group, run by our Triton kernels `kernels.gemv_w4` / `matmul_w4`), the step through
     `FusedDecoder` (one `gemv_w4` per weight matrix, norm / gating / residual fused; the
     service's CUDA path for llama-family W4A16 checkpoints; `w4a16_configs`: the launch configs
     it picked); bound over that model's bytes. `w4a16_fused_mma_ab`: the tuner with the tensor-core
     kernel (`phiops.serve.mma`) among its candidates and without (`FusedDecoder(mma=False)`), each raw
     and through the engine, two rounds. `w4a16_accuracy`: its logits against the dequantized model in
     float32. `summary` puts the W4A16 paths over bf16 `fused`, `engine_solo_fused` and `int4_graph`.
3. The concurrency curve (`--concurrency`, default 1,8,32,128,256; `--only concurrent` runs it
   alone), for bf16 and for the W4A16 model as the service loads it: n requests of
   `--prompt-len` tokens at once, `--gen-tokens` each, through the service's engine
   (`phiops.serve.engine.Engine`, max_batch_size = n; a lone request through its solo decoder on
   CUDA, as the service does) and then through transformers' continuous batching manager, each
   after a 2-token round of the same requests. Output tokens/s, time to first token and
   inter-token latency p50/p99 (the engine's per-request event times; transformers' per-token
   timestamps), peak GPU memory; a failure at some size (an out-of-memory) is recorded in its
   point. At `--breakdown-at` (32) the engine's step is taken apart: each part timed with a sync
   around it (prefill, decode forward, sampling, detokenize/stop checks/events, cache bookkeeping)
   and a few decode forwards traced by torch.profiler (GPU kernel time against the forward's wall).
   `--cudnn-sdpa-baseline` runs each point a second time through an engine whose batched passes
   may use cuDNN attention, as they did before issue 15's fix (`phiops_engine_cudnn_sdpa`).
   `--paged` runs each point through the engine with a `PagedDecoder` too (`phiops_engine_paged`: the
   paged KV pool and the batched step captured as CUDA graphs, the service's CUDA path for llama-family
   models), with `paged_over_dynamic`; with `--breakdown-at`, its step taken apart as well (`breakdown_paged`).

    python bench/decode_phi3_mini.py --only concurrent --out bench/results/concurrency_curve_h200.json

The JSON (GPU name, package versions, each figure) is rewritten after each step, so a run stopped
by a time limit keeps what finished. Needs torch, transformers, and for W4A16 llmcompressor and
compressed-tensors. About 5 minutes on one H100 (most of it torch.compile).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]

from _common import drive_engine, machine, versions

from phiops.models import word_tokenizer

# Peak HBM bandwidth, TB/s, by GPU name (data sheets); --bandwidth-tbs overrides.
BANDWIDTH_TBS = {"H100": 3.35, "H200": 4.8, "A100": 2.04}


def _versions() -> dict[str, str | None]:
    return versions(("torch", "transformers", "accelerate", "llmcompressor", "compressed-tensors", "tokenizers"))


def _arch(tiny: bool) -> dict[str, Any]:
    from phiops import config

    arch = dict(config.load(ROOT / "configs/phi-3-mini.yaml").model.architecture)
    arch.pop("architectures", None)
    if tiny:  # 128 wide: W4A16 quantizes groups of 128 input features
        arch.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4)
    return arch


def bytes_per_token(model: Any) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer but the embedding table."""
    emb = model.get_input_embeddings().weight
    total = 0
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t is emb:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb:
        total += emb.numel() * emb.element_size()  # tied: the LM head reads the whole table
    return total


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _prompt(vocab: int, n: int) -> list[int]:
    import torch

    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def _timing(mode: str, prompt_len: int, steps: int, prefill_s: float, warm_s: float, wall: float,
            ids_out: list[int]) -> dict[str, Any]:
    return {"mode": mode, "prompt_len": prompt_len, "steps": steps,
            "prefill_s": round(prefill_s, 4), "warmup_s": round(warm_s, 2), "decode_s": round(wall, 4),
            "tokens_per_s": round(steps / wall, 2), "ms_per_token": round(wall / steps * 1000, 3),
            "first_tokens": ids_out}


def decode_eager(model: Any, *, prompt_len: int, steps: int, device: str) -> dict[str, Any]:
    """Greedy batch-1 decode with a DynamicCache, one plain forward per token."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([_prompt(model.config.vocab_size, prompt_len)], device=device),
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        produced = [tok]
        t0 = time.perf_counter()
        tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)  # warm-up
        produced.append(tok)
        _sync(device)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            produced.append(tok)
        _sync(device)
        wall = time.perf_counter() - t0
    return _timing("eager", prompt_len, steps, prefill_s, warm_s, wall, [int(t) for t in produced[:16]])


def decode_graph(dec: Any, *, prompt_len: int, steps: int, device: str, mode: str = "graph") -> dict[str, Any]:
    """Greedy batch-1 decode through a `GraphDecoder`: its argmax fed back on the GPU, one sync at the end."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = dec.prefill(_prompt(dec.model.config.vocab_size, prompt_len))
        tok = logits.argmax(-1)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        produced = [tok]
        t0 = time.perf_counter()
        tok = dec.step(tok).argmax(-1)  # compile and capture happen here
        produced.append(tok)
        _sync(device)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = dec.step(tok).argmax(-1)  # argmax: a new tensor, so the graph may overwrite its logits
            produced.append(tok)
        _sync(device)
        wall = time.perf_counter() - t0
    return _timing(mode, prompt_len, steps, prefill_s, warm_s, wall, [int(t) for t in produced[:16]])


def decode_engine_solo(model: Any, dec: Any, *, prompt_len: int, steps: int, device: str,
                       mode: str = "engine_solo", overlap: bool = True) -> dict[str, Any]:
    """One greedy request through the service's engine with the solo decoder: tokens/s after its first.
    ``overlap=False``: the engine records each token before queueing the next step (its old way)."""
    import threading

    from phiops.serve.engine import Engine, Event, Request

    tok = word_tokenizer(model.config.vocab_size)
    marks: list[tuple[float, int]] = []
    done = threading.Event()

    def emit(ev: Event) -> None:
        marks.append((time.perf_counter(), ev.completion_tokens))
        if ev.finish_reason or ev.error:
            done.set()

    # EOS: an id past the vocabulary, never sampled: the request runs its full length (random weights
    # do produce id 0: bf16 Phi-3-mini stopped after 235 of 257 tokens). One request: no padding with it.
    engine = Engine(model, tok, [model.config.vocab_size], device, max_wait_ms=0, solo=dec, overlap=overlap)
    if getattr(dec, "_graph", True) is None:  # a decoder not yet captured: capture (and tune) it untimed
        warm = threading.Event()
        engine.submit(Request(prompt=_prompt(model.config.vocab_size, prompt_len), max_new_tokens=3,
                              emit=lambda ev: (ev.finish_reason or ev.error) and warm.set()))
        warm.wait()
    t0 = time.perf_counter()
    engine.submit(Request(prompt=_prompt(model.config.vocab_size, prompt_len), max_new_tokens=steps + 1, emit=emit))
    done.wait()
    engine.close()
    (t_first, n_first), (t_last, n_last) = marks[0], marks[-1]
    if n_last != steps + 1:
        raise RuntimeError(f"the request ended after {n_last} of {steps + 1} tokens")
    n, wall = n_last - n_first, t_last - t_first
    return {"mode": mode, "prompt_len": prompt_len, "steps": n, "decode_s": round(wall, 4),
            "tokens_per_s": round(n / wall, 2), "ms_per_token": round(wall / n * 1000, 3),
            "prefill_s_incl_first_token": round(t_first - t0, 4)}


def accuracy(model: Any, decoders: dict[str, Any], *, prompt_len: int, steps: int, device: str,
             reference: Any = None) -> dict[str, Any]:
    """Each path's logits against a float32 copy of the model (or `reference`), teacher-forced on one token sequence.

    Random weights give near-tied logits, so greedy ids drift apart between bf16 paths from
    rounding alone; the error against float32 says whether a path is as exact as eager bf16.
    """
    import copy

    import torch
    from transformers import DynamicCache

    prompt = _prompt(model.config.vocab_size, prompt_len)

    def plain(m: Any, feed: list[int] | None) -> tuple[list[Any], list[int]]:
        cache, logits, ids = DynamicCache(), [], torch.tensor([prompt], device=device)
        with torch.inference_mode():
            for i in range(steps):
                out = m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                logits.append(out.logits[0, -1].float())
                nxt = int(out.logits[0, -1].argmax()) if feed is None else feed[i]
                ids = torch.tensor([[nxt]], device=device)
        return logits, [int(x.argmax()) for x in logits]

    _, feed = plain(model, None)  # the eager bf16 greedy sequence, fed to every path
    ref, _ = plain(copy.deepcopy(model).float() if reference is None else reference, feed)
    torch.cuda.empty_cache()
    scale = max(float(x.abs().max()) for x in ref)
    paths: dict[str, list[Any]] = {"eager": plain(model, feed)[0]}
    for name, dec in decoders.items():
        with torch.inference_mode():
            out = [dec.prefill(prompt).float().reshape(-1).clone()]
            for i in range(steps - 1):
                out.append(dec.step(torch.tensor(feed[i], device=device)).float().reshape(-1).clone())
        paths[name] = out
    return {"steps": steps, "reference": "float32 copy of the model, plain forward", "max_abs_logit": round(scale, 4),
            **{name: {"max_abs_err_over_max_logit": round(max(float((a - b).abs().max()) for a, b in zip(got, ref)) / scale, 5),
                      "argmax_equal_float32": sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(got, ref))}
               for name, got in paths.items()}}


# Ablations of the compiled step: inductor options, attention implementation (None: as loaded).
# `graph` itself uses phiops_decode.INDUCTOR_OPTIONS (coordinate-descent tuning) and PyTorch's SDPA choice.
VARIANTS: dict[str, tuple[dict[str, Any], str | None, str | None]] = {
    "cublas": ({}, None, None),  # no coordinate-descent tuning: batch-1 matmuls stay cuBLAS GEMVs
    "autotune": ({"coordinate_descent_tuning": True, "max_autotune": True}, None, None),
    "autotune_cublas": ({"max_autotune": True}, None, None),
    "eager_attn": ({"coordinate_descent_tuning": True}, "eager", None),
    "no_cudnn_sdpa": ({"coordinate_descent_tuning": True}, None, "no_cudnn"),
}


def profile_steps(dec: Any, device: str, steps: int = 32) -> dict[str, Any]:
    """GPU kernel time of `steps` graph replays (torch.profiler): per step, and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return {}
    tok = torch.zeros((1,), dtype=torch.long, device=device)
    with torch.inference_mode():
        dec.prefill(_prompt(dec.model.config.vocab_size, 128))
        dec.step(tok)
        _sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                dec.step(tok)
            _sync(device)
    rows = []
    total_us, kernels = 0.0, 0
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
        if us <= 0 or e.key.startswith("cudaGraph") or e.key.startswith("Memcpy"):
            continue
        total_us += us
        kernels += e.count
        rows.append({"kernel": e.key[:90], "calls_per_step": round(e.count / steps, 1),
                     "us_per_step": round(us / steps, 1)})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"steps": steps, "gpu_kernel_us_per_step": round(total_us / steps, 1),
            "kernels_per_step": round(kernels / steps, 1), "top": rows[:25]}


def _percentiles(xs: list[float]) -> dict[str, float | None]:
    """p50 and p99 (linear interpolation between order statistics), in milliseconds."""
    if not xs:
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    xs = sorted(xs)

    def q(f: float) -> float:
        pos = f * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return {"p50_ms": round(q(0.50) * 1000, 2), "p99_ms": round(q(0.99) * 1000, 2), "n": len(xs)}


def latencies(streams: list[tuple[float, list[tuple[float, int]]]]) -> dict[str, Any]:
    """Time to first token and inter-token latency over every request.

    Args:
        streams: per request, (submit time, [(time, tokens so far), ...]) in perf_counter seconds.

    Returns:
        {"ttft": {p50_ms, p99_ms, n}, "itl": {...}}: TTFT from submit to the first token's arrival;
        ITL over every token after the first (an arrival carrying k tokens counts as k gaps of 1/k
        of its wait, so a step that emitted no text does not hide its time).
    """
    ttft, itl = [], []
    for submit, marks in streams:
        got = [(t, n) for t, n in marks if n > 0]
        if not got:
            continue
        ttft.append(got[0][0] - submit)
        for (ta, na), (tb, nb) in zip(got, got[1:]):
            if nb > na:
                itl += [(tb - ta) / (nb - na)] * (nb - na)
    return {"ttft": _percentiles(ttft), "itl": _percentiles(itl)}


def _gpu_mem(device: str) -> dict[str, Any]:
    import torch

    if device != "cuda":
        return {}
    return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _release(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}"[:500], "trace": traceback.format_exc()[-1200:]}


def engine_point(model: Any, tok: Any, prompts: list[list[int]], gen_tokens: int, device: str,
                 solo: Any = None, cudnn_sdpa: bool = False, paged: Any = None) -> dict[str, Any]:
    """All `prompts` at once through the service's engine (max_batch_size = their number): tok/s, TTFT, ITL.

    First the same requests for 2 tokens (the batch's shapes warmed: kernels, allocator), then the timed run.
    `cudnn_sdpa`: the engine's batched passes may use cuDNN attention (its behaviour before issue 15's fix).
    `paged`: a `PagedDecoder` for the engine's batched rows (its KV pool and graphs), as the service runs it.
    """
    from phiops.serve.engine import Engine, Request

    n = len(prompts)

    def engine() -> Any:
        return Engine(model, tok, [0], device, max_batch_size=n, max_wait_ms=20, solo=solo, cudnn_sdpa=cudnn_sdpa,
                      paged=paged)

    drive_engine(engine(), Request, prompts, 2)
    _release(device)
    marks: list[list[tuple[float, int]]] = []
    errors: list[str] = []
    timed = engine()
    wall, produced = drive_engine(timed, Request, prompts, gen_tokens, marks=marks, errors=errors)
    out: dict[str, Any] = {"wall_s": round(wall, 3), "output_tokens": produced,
                           "output_tokens_per_s": round(produced / wall, 1),
                           **latencies([(m[0][0], m[1:]) for m in marks]), **_gpu_mem(device)}
    if solo is not None and n == 1:
        out["path"] = "solo decoder (a lone request, as the service runs it)"
    if paged is not None:
        out.update(preempted=timed.stats.preempted, kv_pages=paged.pages)
    if errors:  # e.g. an out-of-memory in a shared forward pass fails its rows, not the run
        out.update(failed_requests=len(errors), error=errors[0][:300])
    return out


def cb_point(model: Any, prompts: list[list[int]], gen_tokens: int) -> dict[str, Any]:
    """The same requests through transformers' continuous batching manager (per-token timestamps)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    n = len(prompts)
    gc = GenerationConfig(max_new_tokens=gen_tokens, do_sample=False, eos_token_id=0, pad_token_id=0)
    cbc = ContinuousBatchingConfig(max_requests_per_batch=n)

    def collect(mgr: Any) -> list[Any]:
        got: list[Any] = []
        while len(got) < n:
            res = mgr.get_result(timeout=60)
            if res is None:
                raise RuntimeError(f"the continuous batching manager returned {len(got)} of {n} results")
            if res.is_finished():
                got.append(res)
        return got

    try:
        t0 = time.perf_counter()
        # The manager warms up (captures its CUDA graphs) on entry; then the same requests for
        # 2 tokens, as the engine gets; only the second round is timed.
        with model.continuous_batching_context_manager(generation_config=gc, continuous_batching_config=cbc) as mgr:
            warm_s = time.perf_counter() - t0
            mgr.add_requests(prompts, max_new_tokens=2)
            collect(mgr)
            t0 = time.perf_counter()
            mgr.add_requests(prompts, max_new_tokens=gen_tokens, record_timestamps=True)
            got = collect(mgr)
            wall = time.perf_counter() - t0
    finally:
        model.set_attn_implementation("sdpa")  # the manager switched it to paged attention
    n_tok = sum(len(r.generated_tokens) for r in got)
    streams = [(r.created_time, [(t, i + 1) for i, t in enumerate(r.timestamps or [])]) for r in got]
    return {"warmup_s": round(warm_s, 2), "wall_s": round(wall, 3), "output_tokens": n_tok,
            "output_tokens_per_s": round(n_tok / wall, 1), **latencies(streams),
            "timestamps": "transformers' per-token record_timestamps (taken when the token reaches the host)"}


def engine_breakdown(model: Any, tok: Any, prompts: list[list[int]], gen_tokens: int, device: str,
                     profile_from: int = 8, profile_steps: int = 4, paged: Any = None) -> dict[str, Any]:
    """Where one engine step's time goes: the same run as `engine_point`, its parts timed with a sync around each.

    The engine's loop is unchanged; its model call and its per-step methods are wrapped on this one
    instance. Each wrapped part syncs the GPU before and after, so its wall time is its own (the
    syncs make the whole run slower than `engine_point`'s: read the shares, not the total). Decode
    forwards `profile_from`... are also traced by torch.profiler (host ops and GPU kernels): kernel
    time against the forward's wall time says whether the GPU or the host sets a step's pace, and
    the host ops' own time where the host's goes (tracing slows the host: compare shares).
    With `paged` (a `PagedDecoder`), the engine decodes through it: "forward_decode" is then its
    `step` (inputs copied in, the graph replayed), and `grow` (page allocation) is timed apart.
    """
    from collections import defaultdict

    import torch

    from phiops.serve.engine import Engine, Request

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    took: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    prof: dict[str, Any] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            sync()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                took[name] += time.perf_counter() - t
                calls[name] += 1
        return wrapper

    class Timed:  # the engine only calls its model and reads nothing else from it
        def __init__(self, m: Any) -> None:
            self.m = m

        def __getattr__(self, name: str) -> Any:
            return getattr(self.m, name)

        def __call__(self, **kw: Any) -> Any:
            phase = "forward_prefill" if kw["input_ids"].shape[1] > 1 else "forward_decode"
            k = calls[phase]
            tracing = device == "cuda" and phase == "forward_decode" and profile_from <= k < profile_from + profile_steps
            if tracing and k == profile_from:
                try:
                    from torch.profiler import ProfilerActivity, profile

                    prof["ctx"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                    prof["ctx"].__enter__()
                    prof["wall"] = 0.0
                except Exception as exc:
                    prof["error"] = f"{type(exc).__name__}: {exc}"[:300]
            before = took[phase]
            out = timed(phase, self.m)(**kw)
            if tracing and "ctx" in prof:
                prof["wall"] += took[phase] - before
                if k == profile_from + profile_steps - 1:
                    try:
                        prof["ctx"].__exit__(None, None, None)
                    except Exception as exc:
                        prof["error"] = f"{type(exc).__name__}: {exc}"[:300]
            return out

    n = len(prompts)
    eng = Engine(Timed(model), tok, [0], device, max_batch_size=n, max_wait_ms=20, paged=paged)
    if paged is not None:  # restored below: the decoder is shared with the other points
        paged.step, paged.grow = timed("forward_decode", paged.step), timed("grow", paged.grow)
    # Instance attributes win over the class's methods, so the loop calls the wrapped ones.
    for name in ("_decode", "_keep", "_merge", "_admit", "_maybe_trim"):
        setattr(eng, name, timed(name, getattr(eng, name)))
    phase = ["decode"]  # _sample and _advance run in both phases: timed apart

    def in_prefill(fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            phase[0] = "prefill"
            try:
                return fn(*a, **k)
            finally:
                phase[0] = "decode"
        return wrapper

    def by_phase(name: str, fn: Any) -> Any:
        return lambda *a, **k: timed(f"{name}_{phase[0]}", fn)(*a, **k)

    eng._prefill_work = in_prefill(timed("_prefill", eng._prefill_work))  # the passes (``_prefill`` queues)
    eng._sample = by_phase("_sample", eng._sample)
    eng._sample_async = by_phase("_sample", eng._sample_async)  # the paged engine's (its copy left queued)
    eng._advance = by_phase("_advance", eng._advance)
    wall, produced = drive_engine(eng, Request, prompts, gen_tokens)
    if paged is not None:
        del paged.step, paged.grow
    steps = max(calls["forward_decode"], 1)
    per = {k: round(v / max(calls[k], 1) * 1000, 3) for k, v in took.items()}
    # _decode holds the decode forward and, after it, _sample, _advance (detokenize, stop checks,
    # events) and _keep; the rest of it is the mask's torch.cat and the positions.
    decode_other = (took["_decode"] - took["forward_decode"] - took["_sample_decode"] - took["_advance_decode"]
                    - took["_keep"])
    out: dict[str, Any] = {
        "requests": n, "gen_tokens": gen_tokens, "wall_s_with_syncs": round(wall, 3), "output_tokens": produced,
        "decode_steps": calls["forward_decode"], "prefill_passes": calls["forward_prefill"],
        "ms_per_call": per, "calls": dict(calls),
        "decode_step_ms": {
            "total": round(took["_decode"] / steps * 1000, 3),
            "forward": round(took["forward_decode"] / steps * 1000, 3),
            "sample": round(took["_sample_decode"] / steps * 1000, 3),
            "advance_detokenize_emit": round(took["_advance_decode"] / steps * 1000, 3),
            "keep": round(took["_keep"] / steps * 1000, 3),
            "other_in_decode": round(decode_other / steps * 1000, 3),
        },
        "share_of_wall": {
            "prefill (forward, sampling, merge)": round(took["_prefill"] / wall, 4),
            "decode forward": round(took["forward_decode"] / wall, 4),
            "decode sampling": round(took["_sample_decode"] / wall, 4),
            "decode advance (detokenize, stops, events)": round(took["_advance_decode"] / wall, 4),
            "decode keep + mask/positions": round((took["_keep"] + decode_other) / wall, 4),
            "loop (admit, trim, waits)": round(max(wall - took["_prefill"] - took["_decode"], 0.0) / wall, 4),
        },
    }
    if "ctx" in prof and "error" not in prof:
        from torch.autograd import DeviceType

        kernels_us, count, rows, ops, host_us, host_ops = 0.0, 0, [], [], 0.0, 0
        for e in prof["ctx"].key_averages():
            if e.device_type == DeviceType.CUDA:  # a kernel (or a copy) on the GPU
                us = e.device_time_total
                if us <= 0 or e.key.startswith("Memset"):
                    continue
                kernels_us += us
                count += e.count
                rows.append({"kernel": e.key[:90], "calls_per_step": round(e.count / profile_steps, 1),
                             "us_per_step": round(us / profile_steps, 1)})
            else:  # a host op: its own time, without the ops it called
                host_us += e.self_cpu_time_total
                host_ops += e.count if e.key.startswith("aten::") else 0
                ops.append({"op": e.key[:60], "calls_per_step": round(e.count / profile_steps, 1),
                            "self_us_per_step": round(e.self_cpu_time_total / profile_steps, 1)})
        rows.sort(key=lambda r: -r["us_per_step"])
        ops.sort(key=lambda r: -r["self_us_per_step"])
        fwd_us = prof["wall"] / profile_steps * 1e6
        out["decode_forward_profile"] = {
            "steps": profile_steps, "forward_wall_us_traced": round(fwd_us, 1),
            "gpu_kernel_us": round(kernels_us / profile_steps, 1),
            "kernels_per_step": round(count / profile_steps, 1),
            "gpu_busy_fraction": round(kernels_us / profile_steps / fwd_us, 3) if fwd_us else None,
            "aten_ops_per_step": round(host_ops / profile_steps, 1),
            "host_op_self_us_per_step": round(host_us / profile_steps, 1),
            "top_kernels": rows[:12], "top_host_ops": ops[:15]}
    elif prof.get("error"):
        out["decode_forward_profile"] = {"error": prof["error"]}
    return out


@contextlib.contextmanager
def w4_tiles_only(on: bool = True) -> Iterator[None]:
    """While held, `kernels.matmul_w4` runs its tiled kernel at every row count (W4A16's batched
    matmul before the scratch-matrix path): the baseline of `--w4-tiles-baseline`."""
    from phiops.serve import kernels

    before = kernels.DEQUANT_ROWS
    if on:
        kernels.DEQUANT_ROWS = sys.maxsize
    try:
        yield
    finally:
        kernels.DEQUANT_ROWS = before


def concurrent(model: Any, *, ns: list[int], prompt_len: int, gen_tokens: int, device: str, cb: bool,
               solo: Any = None, breakdown_at: int | None = None, on_point: Any = None,
               into: dict[str, Any] | None = None, cudnn_baseline: bool = False,
               paged: Any = None, paged_tiles: Any = None) -> dict[str, Any]:
    """The concurrency curve: for each n in `ns`, n requests at once through the service's engine
    and through transformers' continuous batching, one after the other in this run.

    Args:
        solo: the service's decoder for a lone request (n = 1 then decodes as the service would).
        breakdown_at: also time the parts of the engine's step at this n (`engine_breakdown`).
        on_point: called after each point (the caller saves the JSON, so a stopped run keeps it).
        into: the dict to fill (and return), point by point; a new one when None.
        cudnn_baseline: after the engine, the same requests through an engine whose batched passes may
            use cuDNN attention (`phiops_engine_cudnn_sdpa`, the behaviour before issue 15's fix), and
            the ratio `engine_over_cudnn_sdpa`; left out where a lone request takes the solo decoder.
        paged: a `PagedDecoder` (rows for max(ns) requests): after the dynamic-cache engine, the same
            requests through an engine with it (`phiops_engine_paged`, the service's CUDA path), and
            the ratio `paged_over_dynamic`; left out where a lone request takes the solo decoder.
        paged_tiles: a second `PagedDecoder` of a W4A16 model, captured with `kernels.matmul_w4` on its
            tiles at every row count (`DEQUANT_ROWS` off, as before the scratch-matrix path): after the
            paged engine, the same requests through it with that setting held (`phiops_engine_paged_tiles`),
            and the ratio `paged_over_tiles`.

    Returns:
        {"points": [{"requests": n, "phiops_engine": {...}, "transformers_continuous_batching": {...}}],
         "breakdown": {...}}; a failure (an out-of-memory, say) is recorded in its point.
    """
    import torch

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    # No id of a stop token in the prompts, and EOS = an id greedy decoding of random weights
    # will not pick in time: every request generates exactly gen_tokens.
    every = [torch.randint(1, vocab, (prompt_len,), generator=g).tolist() for _ in range(max(ns))]
    tok = word_tokenizer(vocab)
    out: dict[str, Any] = {} if into is None else into
    out.update({"prompt_len": prompt_len, "gen_tokens": gen_tokens,
                "engine_settings": "max_batch_size = requests, max_wait_ms = 20 (the service's default "
                                   "max_batch_size is 32: beyond it requests queue)",
                "points": []})
    for n in ns:
        prompts = every[:n]
        point: dict[str, Any] = {"requests": n}
        out["points"].append(point)
        try:
            point["phiops_engine"] = engine_point(model, tok, prompts, gen_tokens, device, solo=solo)
        except Exception as exc:  # e.g. out of memory outside a forward pass: recorded, the curve goes on
            point["phiops_engine"] = _error(exc)
        _release(device)
        print("concurrent", n, "engine", json.dumps(point["phiops_engine"])[:300], flush=True)
        # (engine, ratio, engine kwargs, wanted, the ratio's numerator and denominator): cuDNN, the engine
        # now over the old behaviour; paged, the pool over the engine without it; tiles, the paged
        # engine now over one with the tiled W4A16 matmul (run with that setting held)
        variants = [("phiops_engine_cudnn_sdpa", "engine_over_cudnn_sdpa", {"cudnn_sdpa": True}, cudnn_baseline,
                     "phiops_engine", "phiops_engine_cudnn_sdpa"),
                    ("phiops_engine_paged", "paged_over_dynamic", {"paged": paged}, paged is not None,
                     "phiops_engine_paged", "phiops_engine"),
                    ("phiops_engine_paged_tiles", "paged_over_tiles", {"paged": paged_tiles}, paged_tiles is not None,
                     "phiops_engine_paged", "phiops_engine_paged_tiles")]
        for key, ratio, kw, wanted, num, den in variants:  # the same requests through another engine, right after
            if not wanted or (n == 1 and solo is not None):
                continue
            try:
                with w4_tiles_only(key == "phiops_engine_paged_tiles"):
                    point[key] = engine_point(model, tok, prompts, gen_tokens, device, solo=solo, **kw)
            except Exception as exc:
                point[key] = _error(exc)
            _release(device)
            print("concurrent", n, key, json.dumps(point[key])[:300], flush=True)
            rates = [point.get(k, {}).get("output_tokens_per_s") for k in (num, den)]
            if None not in rates:
                point[ratio] = round(rates[0] / rates[1], 3)
        if cb:
            try:
                point["transformers_continuous_batching"] = cb_point(model, prompts, gen_tokens)
            except Exception as exc:
                point["transformers_continuous_batching"] = _error(exc)
            _release(device)
            print("concurrent", n, "cb", json.dumps(point["transformers_continuous_batching"])[:300], flush=True)
        e, c = point["phiops_engine"], point.get("transformers_continuous_batching", {})
        if "output_tokens_per_s" in e and "output_tokens_per_s" in c:
            point["engine_over_cb"] = round(e["output_tokens_per_s"] / c["output_tokens_per_s"], 3)
        if n == breakdown_at:
            for key, dec in (("breakdown", None), ("breakdown_paged", paged)):
                if key == "breakdown_paged" and paged is None:
                    continue
                try:
                    out[key] = engine_breakdown(model, tok, prompts, gen_tokens, device, paged=dec)
                except Exception as exc:
                    out[key] = _error(exc)
                _release(device)
                print(key, json.dumps(out[key])[:900], flush=True)
        if on_point:
            on_point()
    return out


def curve_table(result: dict[str, Any]) -> str:
    """The concurrency curves as a markdown table: per dtype, concurrency and engine, tok/s, TTFT and ITL p50/p99."""
    def ms(d: dict[str, Any], key: str) -> str:
        v = d.get(key, {})
        return f"{v.get('p50_ms')} / {v.get('p99_ms')}" if v.get("n") else "-"

    lines = ["| dtype | concurrent | engine | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for key, dtype in (("bf16_concurrent", "bf16"), ("w4a16_concurrent", "W4A16")):
        for point in result.get(key, {}).get("points", []):
            for eng, name in (("phiops_engine", "phiops"), ("phiops_engine_paged", "phiops, paged + graphs"),
                              ("phiops_engine_paged_tiles", "phiops, paged + graphs, W4A16 tiles"),
                              ("phiops_engine_cudnn_sdpa", "phiops, cuDNN SDPA"),
                              ("transformers_continuous_batching", "transformers CB")):
                r = point.get(eng)
                if r is None:
                    continue
                if "output_tokens_per_s" not in r:
                    lines.append(f"| {dtype} | {point['requests']} | {name} | {r.get('error', '?')[:80]} | | | |")
                    continue
                failed = f" ({r['failed_requests']} failed)" if r.get("failed_requests") else ""
                lines.append(f"| {dtype} | {point['requests']} | {name} | {r['output_tokens_per_s']}{failed} | "
                             f"{ms(r, 'ttft')} | {ms(r, 'itl')} | {r.get('peak_gpu_memory_gib', '-')} |")
    return "\n".join(lines)


def quantize_w4a16(model: Any, workdir: Path, device: str) -> tuple[Any, dict[str, Any]]:
    """W4A16 (group 128) with llm-compressor, saved compressed, loaded back with from_pretrained."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    # llm-compressor re-reads the config from the model's path: give the random model one.
    base = workdir / "base-config"
    model.config.save_pretrained(base)
    model.config._name_or_path = str(base)
    t0 = time.perf_counter()
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))
    quant_s = time.perf_counter() - t0
    out = workdir / "w4a16"
    model.save_pretrained(out, save_compressed=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    q, load_s = load_w4a16(workdir, device)
    info = {"quantize_s": round(quant_s, 1), "load_s": round(load_s, 1),
            "checkpoint_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
            "quant_method": json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"]}
    return q, info


def load_w4a16(workdir: Path, device: str, dtype: str = "bfloat16") -> tuple[Any, float]:
    """The saved W4A16 checkpoint through from_pretrained and .to(device), as the service loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    q = AutoModelForCausalLM.from_pretrained(workdir / "w4a16", use_safetensors=True, trust_remote_code=False,
                                             dtype=getattr(torch, dtype)).to(device).eval()
    return q, time.perf_counter() - t0


def logits_agreement(a: Any, b: Any, device: str) -> dict[str, float]:
    """Last-position logits of two models on one prompt: max |diff| over max |logit|, and argmax agreement."""
    import torch

    ids = torch.tensor([_prompt(a.config.vocab_size, 64)], device=device)
    with torch.inference_mode():
        la, lb = a(input_ids=ids).logits.float(), b(input_ids=ids).logits.float()
    return {"max_abs_diff": round(float((la - lb).abs().max()), 4), "max_abs_logit": round(float(lb.abs().max()), 4),
            "argmax_agreement": round(float((la.argmax(-1) == lb.argmax(-1)).float().mean()), 4)}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's W4A16 figures side by side: tokens/s, fraction of each path's own bound, and the
    fused W4A16 path over bf16 `fused` (the raw decoder) and over bf16 `engine_solo_fused` (a lone request)."""
    rows: dict[str, Any] = {}
    for section in ("bf16_batch1", "w4a16_batch1", "w4a16_fused_batch1"):
        for run in result.get(section, {}).get("runs", []):
            if "tokens_per_s" in run:
                rows[run["mode"]] = {"tokens_per_s": run["tokens_per_s"], "fraction_of_bound": run["fraction_of_bound"],
                                     "bound_tokens_per_s": result[section]["bound_tokens_per_s"]}
    out: dict[str, Any] = {"modes": rows}
    for new, base in (("w4a16_fused", "fused"), ("w4a16_fused", "engine_solo_fused"), ("w4a16_fused", "int4_graph"),
                      ("w4a16_engine_solo_fused", "engine_solo_fused"), ("w4a16_engine_solo_fused", "int4_engine_solo"),
                      ("engine_solo_fused", "engine_solo_fused_sync"), ("fused", "fused_autotuned"),
                      ("fused", "fused_no_preload"),
                      ("w4a16_engine_solo_fused", "w4a16_engine_solo_fused_sync")):
        if new in rows and base in rows:
            out[f"{new}_over_{base}"] = round(rows[new]["tokens_per_s"] / rows[base]["tokens_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 128-wide model on CPU: smoke test of this script")
    ap.add_argument("--steps", type=int, default=None, help="decode steps timed (default 256; tiny 16)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--concurrency", default=None,
                    help="concurrent requests, comma-separated (default 1,8,32,128,256; tiny 1,4)")
    ap.add_argument("--breakdown-at", type=int, default=None,
                    help="time the parts of the engine's step at this concurrency (default 32; tiny 4; 0: off)")
    ap.add_argument("--gen-tokens", type=int, default=None, help="tokens per concurrent request (default 128; tiny 8)")
    ap.add_argument("--bandwidth-tbs", type=float, default=None, help="peak memory bandwidth (default: by GPU name)")
    ap.add_argument("--skip-w4a16", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="eager only")
    ap.add_argument("--compile", action="store_true", help="with --tiny: also trace the compiled path on CPU")
    ap.add_argument("--skip-cb", action="store_true", help="skip the transformers continuous batching comparison")
    ap.add_argument("--no-cudnn-sdpa", action="store_true",
                    help="an ablation: PyTorch's SDPA may not pick its cuDNN backend (the whole run, every path)")
    ap.add_argument("--cudnn-sdpa-baseline", action="store_true",
                    help="the curve also through an engine whose batched passes may use cuDNN SDPA (as before "
                         "issue 15's fix), each point right after the default engine's")
    ap.add_argument("--paged", action="store_true",
                    help="concurrency: also run the engine with its paged KV pool and graph-captured step "
                         "(phiops_engine_paged), beside the dynamic-cache engine")
    ap.add_argument("--w4-tiles-baseline", action="store_true",
                    help="with --paged: the W4A16 curve also through a paged engine whose batched matmuls run "
                         "kernels.matmul_w4's tiles at every row count (before the scratch-matrix path)")
    ap.add_argument("--skip-bf16-curve", action="store_true", help="the concurrency curve of the W4A16 model only")
    ap.add_argument("--graph-variants", default="", help=f"bf16 ablations of the compiled step, of {','.join(VARIANTS)}")
    ap.add_argument("--profile", action="store_true", help="profile each variant's graph replays (GPU kernel time)")
    ap.add_argument("--only", default="", help="run only these modes (comma-separated names as in the JSON; "
                    "'concurrent', 'accuracy' and 'w4a16_accuracy' for those parts)")
    args = ap.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if not args.tiny and device != "cuda":
        ap.error("no CUDA device: run with --tiny for the CPU smoke test")
    steps = args.steps or (16 if args.tiny else 256)
    gen_tokens = args.gen_tokens or (8 if args.tiny else 128)
    ns = [int(x) for x in (args.concurrency or ("1,4" if args.tiny else "1,8,32,128,256")).split(",")]
    breakdown_at = args.breakdown_at if args.breakdown_at is not None else (4 if args.tiny else 32)
    compile_on = not args.skip_compile and (not args.tiny or args.compile)
    info = machine()
    gpu = info.get("gpu", "")
    bw = args.bandwidth_tbs or next((v for k, v in BANDWIDTH_TBS.items() if k in gpu), BANDWIDTH_TBS["H100"])
    arch = _arch(args.tiny)
    result: dict[str, Any] = {
        "bench": "decode_phi3_mini",
        "command": " ".join(["python", "bench/decode_phi3_mini.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "versions": _versions(),
        "tiny": args.tiny,
        "shape": {k: arch[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                                       "num_attention_heads", "vocab_size")},
        "dtype": "bfloat16",
        "bandwidth_tbs": bw,
        "sdpa_cudnn": not args.no_cudnn_sdpa,
        "engine_batched_sdpa": ("flash, memory-efficient, math (cuDNN off, phiops.serve.engine's default on CUDA)"
                                + ("; phiops_engine_cudnn_sdpa: PyTorch's choice, cuDNN allowed"
                                   if args.cudnn_sdpa_baseline else "")),
        "bandwidth_source": "--bandwidth-tbs" if args.bandwidth_tbs else f"data sheet for {gpu or 'H100 (default)'}",
        "goal": "bf16 batch-1 decode >= 70% of the bandwidth bound",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    def bound(nbytes: int) -> float:
        return bw * 1e12 / nbytes

    def measure(name: str, model: Any, modes: list[tuple[str, Any]], nbytes: int | None = None) -> None:
        nbytes = nbytes or bytes_per_token(model)
        entry: dict[str, Any] = {"bytes_per_token": nbytes, "bound_tokens_per_s": round(bound(nbytes), 1), "runs": []}
        result[name] = entry
        for mode, fn in modes:
            if only and mode not in only:
                continue
            try:
                run = fn()
                run["fraction_of_bound"] = round(run["tokens_per_s"] / bound(nbytes), 4)
            except Exception as exc:  # e.g. a layer torch.compile cannot trace: recorded
                run = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"[:800], "trace": traceback.format_exc()[-1500:]}
            first = entry["runs"][0] if entry["runs"] else None
            if first and "first_tokens" in first and run.get("first_tokens"):
                # bf16 rounding may differ between the eager and the fused kernels; on random weights
                # the greedy ids still agree for the first steps when the compiled path is right.
                a, b = first["first_tokens"], run["first_tokens"]
                run["first_tokens_equal_eager"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            entry["runs"].append(run)
            print(name, json.dumps(run)[:300], flush=True)
            save()
        ok = [r for r in entry["runs"] if "tokens_per_s" in r]
        if ok:
            best = max(ok, key=lambda r: r["tokens_per_s"])
            entry["best"] = {"mode": best["mode"], "tokens_per_s": best["tokens_per_s"],
                             "fraction_of_bound": best["fraction_of_bound"]}
        save()

    from phiops.serve.decode import (
        FusedDecoder,
        GraphDecoder,
        W4A16Linear,
        fused_unsupported,
        int4_linears,
        w4a16_kernel,
    )

    only = set(filter(None, args.only.split(",")))

    from phiops import models

    t0 = time.perf_counter()
    model = models.random_model(arch, dtype="bfloat16", device=device)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    max_len = args.prompt_len + steps + 8

    def modes(m: Any, prefix: str = "", eager_mode: str = "eager", graphs: bool = True,
              tuned: bool = False, compiled: bool = True) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = [(eager_mode, lambda: {**decode_eager(m, prompt_len=args.prompt_len, steps=steps,
                                                                             device=device), "mode": eager_mode})]
        if compile_on and graphs and compiled:
            dec = GraphDecoder(m, max_len, device, compile=True)
            def graph() -> dict[str, Any]:
                run = decode_graph(dec, prompt_len=args.prompt_len, steps=steps, device=device, mode=prefix + "graph")
                return {**run, "profile": profile_steps(dec, device)} if args.profile else run

            out += [(prefix + "graph", graph),
                    (prefix + "engine_solo", lambda: decode_engine_solo(m, dec, prompt_len=args.prompt_len, steps=steps,
                                                                        device=device, mode=prefix + "engine_solo"))]
        if graphs and device == "cuda" and fused_unsupported(m) is None:
            # built at its first use, so that --only can leave it out
            fdec = functools.cache(lambda: FusedDecoder(m, max_len, device))

            def with_configs(run: dict[str, Any], dec: Any) -> dict[str, Any]:
                if dec.gemv_configs:  # the launch configs the decoder picked at capture
                    run["gemv_configs"] = {role: list(c) for role, c in dec.gemv_configs.items()}
                return run

            def fused_run() -> dict[str, Any]:
                run = with_configs(decode_graph(fdec(), prompt_len=args.prompt_len, steps=steps, device=device,
                                                mode=prefix + "fused"), fdec())
                return {**run, "profile": profile_steps(fdec(), device)} if args.profile else run

            def fused_no_pdl() -> dict[str, Any]:  # the same kernels launched one after another
                import os

                os.environ["PHIOPS_PDL"] = "0"
                try:
                    return decode_graph(FusedDecoder(m, max_len, device), prompt_len=args.prompt_len, steps=steps,
                                        device=device, mode=prefix + "fused_no_pdl")
                finally:
                    del os.environ["PHIOPS_PDL"]

            def fused_autotuned() -> dict[str, Any]:  # launch configs from Triton's autotuner, not timed in a graph
                return decode_graph(FusedDecoder(m, max_len, device, tune=False), prompt_len=args.prompt_len,
                                    steps=steps, device=device, mode=prefix + "fused_autotuned")

            def fused_no_preload() -> dict[str, Any]:  # o_proj requesting one tile before its wait, as before
                dec = FusedDecoder(m, max_len, device, preload=False)
                return with_configs(decode_graph(dec, prompt_len=args.prompt_len, steps=steps, device=device,
                                                 mode=prefix + "fused_no_preload"), dec)

            def ab_rounds(decs: dict[str, Any], mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
                """Each decoder raw and through the engine, two rounds in alternating order: the tokens/s of
                every run, and their medians."""
                import statistics

                runs: dict[str, dict[str, list[float]]] = {name: {"raw": [], "engine": []} for name in decs}
                for rnd in range(2):
                    for name in (list(decs) if rnd == 0 else list(decs)[::-1]):
                        raw = decode_graph(decs[name], prompt_len=args.prompt_len, steps=steps, device=device)
                        eng = decode_engine_solo(m, decs[name], prompt_len=args.prompt_len, steps=steps, device=device)
                        runs[name]["raw"].append(raw["tokens_per_s"])
                        runs[name]["engine"].append(eng["tokens_per_s"])
                        print(mode, name, raw["tokens_per_s"], eng["tokens_per_s"], flush=True)
                med = {name: {k: round(statistics.median(v), 2) for k, v in r.items()} for name, r in runs.items()}
                return runs, med

            def tuned_configs() -> dict[str, tuple[int, ...]]:
                """The launch configs the service's decoder picks (tuned and captured at its first use)."""
                if fdec()._graph is None:
                    decode_graph(fdec(), prompt_len=args.prompt_len, steps=8, device=device)
                return dict(fdec().gemv_configs)

            def fused_o_ab() -> dict[str, Any]:
                """o_proj on each of its two kinds of bf16 config, one requesting all of its weights
                before the wait for attention (preload) and one not, the other roles on the tuned
                decoder's configs: each decoder raw and through the engine, two rounds in alternating order."""
                configs = tuned_configs()
                if not isinstance(fdec()._layers[0][1], torch.Tensor):
                    raise LookupError("o_proj is W4A16: its kernel has no preload configs")
                o_choices = {"o_plain": (8, 512, 4), "o_preload": (8, 1024, 4, 4)}
                decs = {}
                for name, o_cfg in o_choices.items():
                    decs[name] = FusedDecoder(m, max_len, device, tune=False)
                    decs[name].gemv_configs = {**configs, "o": o_cfg}
                runs, med = ab_rounds(decs, prefix + "fused_o_ab")
                return {"mode": prefix + "fused_o_ab", "tuned_configs": {k: list(v) for k, v in configs.items()},
                        "o_configs": {k: list(v) for k, v in o_choices.items()}, "runs": runs, "median": med,
                        "preload_over_plain": {k: round(med["o_preload"][k] / med["o_plain"][k], 3)
                                               for k in ("raw", "engine")},
                        "tokens_per_s": max(v["engine"] for v in med.values())}

            def fused_l2_ab() -> dict[str, Any]:
                """Attention requesting the next GEMVs' weights into the L2 (``l2_prefetch``): none, o_proj's,
                o_proj's and gate/up's, every launch config held at the tuned decoder's; each decoder raw
                and through the engine, two rounds in alternating order."""
                configs = tuned_configs()
                choices = {"none": (), "o": ("o",), "o_gate_up": ("o", "gate_up")}
                decs = {}
                for name, roles in choices.items():
                    decs[name] = FusedDecoder(m, max_len, device, tune=False, l2_prefetch=roles)
                    decs[name].gemv_configs = dict(configs)
                runs, med = ab_rounds(decs, prefix + "fused_l2_ab")
                return {"mode": prefix + "fused_l2_ab", "configs": {k: list(v) for k, v in configs.items()},
                        "prefetched_roles": {k: list(v) for k, v in choices.items()}, "runs": runs, "median": med,
                        "over_none": {name: {k: round(med[name][k] / med["none"][k], 3) for k in ("raw", "engine")}
                                      for name in decs},
                        "tokens_per_s": max(v["engine"] for v in med.values())}

            def fused_gate_up_ab() -> dict[str, Any]:
                """gate/up's two configs the tuner has picked, (2, 1,024, 4) and (4, 1,024, 4), behind o_proj on
                its preload config; every other role on a fixed config seen picked (no tuning); each decoder
                raw and through the engine, two rounds in alternating order."""
                fixed = {"qkv": (2, 1024, 4), "o": (8, 1024, 4, 4), "down": (4, 1024, 4), "lm_head": (2, 1024, 4)}
                choices = {"gate_up_2": (2, 1024, 4), "gate_up_4": (4, 1024, 4)}
                decs = {}
                for name, cfg in choices.items():
                    decs[name] = FusedDecoder(m, max_len, device, tune=False)
                    decs[name].gemv_configs = {**fixed, "gate_up": cfg}
                runs, med = ab_rounds(decs, prefix + "fused_gate_up_ab")
                return {"mode": prefix + "fused_gate_up_ab", "fixed_configs": {k: list(v) for k, v in fixed.items()},
                        "gate_up_configs": {k: list(v) for k, v in choices.items()}, "runs": runs, "median": med,
                        "gate_up_2_over_4": {k: round(med["gate_up_2"][k] / med["gate_up_4"][k], 3)
                                             for k in ("raw", "engine")},
                        "tokens_per_s": max(v["engine"] for v in med.values())}

            def fused_mma_ab() -> dict[str, Any]:  # the tuner with the tensor-core W4A16 kernel and without
                decs = {"mma": FusedDecoder(m, max_len, device), "no_mma": FusedDecoder(m, max_len, device, mma=False)}
                runs, med = ab_rounds(decs, prefix + "fused_mma_ab")
                return {"mode": prefix + "fused_mma_ab", "runs": runs, "median": med,
                        "gemv_configs": {name: {role: list(c) for role, c in d.gemv_configs.items()}
                                         for name, d in decs.items()},
                        "mma_over_no_mma": {k: round(med["mma"][k] / med["no_mma"][k], 3) for k in ("raw", "engine")},
                        "tokens_per_s": med["mma"]["engine"]}

            out += [(prefix + "fused", fused_run), (prefix + "fused_no_pdl", fused_no_pdl),
                    (prefix + "fused_mma_ab", fused_mma_ab),
                    (prefix + "fused_gate_up_ab", fused_gate_up_ab),
                    (prefix + "fused_o_ab", fused_o_ab), (prefix + "fused_l2_ab", fused_l2_ab),
                    (prefix + "fused_autotuned", fused_autotuned), (prefix + "fused_no_preload", fused_no_preload),
                    (prefix + "engine_solo_fused", lambda: decode_engine_solo(
                        m, fdec(), prompt_len=args.prompt_len, steps=steps, device=device,
                        mode=prefix + "engine_solo_fused")),
                    (prefix + "engine_solo_fused_sync", lambda: decode_engine_solo(
                        m, fdec(), prompt_len=args.prompt_len, steps=steps, device=device,
                        mode=prefix + "engine_solo_fused_sync", overlap=False))]
        if compile_on and graphs and compiled:
            for variant in (args.graph_variants.split(",") if tuned and args.graph_variants else []):
                out.append((prefix + "graph_" + variant, variant_run(m, variant, prefix)))
        return out

    def variant_run(m: Any, variant: str, prefix: str) -> Any:
        """The solo decoder compiled another way (an ablation; `graph` above is the service's)."""
        options, attn, sdpa = VARIANTS[variant]

        def run() -> dict[str, Any]:
            before = m.config._attn_implementation
            if attn:
                m.set_attn_implementation(attn)
            try:
                backends = None
                if sdpa == "no_cudnn":
                    from torch.nn.attention import SDPBackend

                    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
                # Dynamo reuses a compiled frame whose guards pass, and the SDPA restriction is not
                # one of them: start afresh so the variant is traced under its own settings.
                import torch

                torch._dynamo.reset()
                dec = GraphDecoder(m, max_len, device, compile=True, options=options, sdpa_backends=backends)
                out = decode_graph(dec, prompt_len=args.prompt_len, steps=steps, device=device,
                                   mode=prefix + "graph_" + variant)
                out.update(inductor_options=options, attn_implementation=attn or before, sdpa=sdpa or "default")
                if args.profile:
                    out["profile"] = profile_steps(dec, device)
                return out
            finally:
                m.set_attn_implementation(before)
        return run

    measure("bf16_batch1", model, modes(model, tuned=True))
    if device == "cuda" and fused_unsupported(model) is None and (not only or "accuracy" in only):
        try:
            result["bf16_accuracy"] = accuracy(model, {"fused": FusedDecoder(model, max_len, device)},
                                               prompt_len=args.prompt_len, steps=16, device=device)
        except Exception as exc:
            result["bf16_accuracy"] = {"error": f"{type(exc).__name__}: {exc}"[:800], "trace": traceback.format_exc()[-1500:]}
        print("accuracy", json.dumps(result["bf16_accuracy"]), flush=True)
        save()

    def curve(key: str, m: Any) -> None:
        """`m`'s concurrency curve into result[key], as the service runs it: the engine, and for a lone
        request on CUDA the solo decoder (FusedDecoder where it applies, else the compiled GraphDecoder)."""
        if only and "concurrent" not in only:
            result[key] = {"error": "LookupError: left out by --only"}
            return
        live: dict[str, Any] = {}
        result[key] = live  # filled point by point and saved after each: a stopped run keeps them
        try:
            solo = None
            if device == "cuda" and 1 in ns:
                solo = (FusedDecoder(m, max_len, device) if fused_unsupported(m) is None
                        else GraphDecoder(m, max_len, device))
            paged = None
            if args.paged and fused_unsupported(m) is None:
                from phiops.serve.paged import PAGE, PagedDecoder, cdiv

                rows, per_row = max(ns), args.prompt_len + gen_tokens
                paged = PagedDecoder(m, device, pages=rows * cdiv(per_row, PAGE), max_len=per_row, max_rows=rows)
                t0 = time.perf_counter()
                paged.warm()  # every bucket's graph, as the service does at load
                live["paged_warm_s"] = round(time.perf_counter() - t0, 1)
            tiles = None
            if paged is not None and args.w4_tiles_baseline and any(isinstance(x, W4A16Linear)
                                                                     for x in m.modules()):
                with w4_tiles_only():
                    tiles = PagedDecoder(m, device, pages=rows * cdiv(per_row, PAGE), max_len=per_row,
                                         max_rows=rows)
                    tiles.warm()
            concurrent(m, ns=ns, prompt_len=args.prompt_len, gen_tokens=gen_tokens, device=device,
                       cb=not args.skip_cb, solo=solo, breakdown_at=breakdown_at or None, on_point=save, into=live,
                       cudnn_baseline=args.cudnn_sdpa_baseline, paged=paged, paged_tiles=tiles)
            del paged, tiles
        except Exception as exc:
            live.update(_error(exc))
        _release(device)
        save()

    if args.skip_bf16_curve:
        result["bf16_concurrent"] = {"error": "LookupError: left out by --skip-bf16-curve"}
    else:
        curve("bf16_concurrent", model)
    print("concurrent", json.dumps(result["bf16_concurrent"])[:400], flush=True)

    if not args.skip_w4a16:
        try:
            with tempfile.TemporaryDirectory(prefix="phiops-decode-") as tmp:
                dense_bytes = bytes_per_token(model)
                qmodel, qinfo = quantize_w4a16(model, Path(tmp), device)
                del model
                result["w4a16"] = qinfo
                save()
                # PyTorch's int4 kernel and compressed-tensors' own path: left out when --only names none of theirs.
                if not only or any(m.startswith(("int4_", "compressed_tensors")) for m in only):
                    # Swap a second load: the first dequantizes itself to bf16 at its first forward.
                    imodel, _ = load_w4a16(Path(tmp), device)
                    qinfo["int4_linears"] = int4_linears(imodel, device)
                    qinfo["int4_model_bytes_per_token"] = bytes_per_token(imodel)
                    qinfo["int4_vs_dequantized_logits"] = logits_agreement(imodel, qmodel, device)
                    measure("w4a16_compressed_tensors", qmodel,
                            modes(qmodel, eager_mode="compressed_tensors_eager", graphs=False), nbytes=dense_bytes)
                    del qmodel
                    measure("w4a16_batch1", imodel, modes(imodel, "int4_", "int4_eager"))
                    del imodel
                else:
                    del qmodel
                _release(device)
                # The service's W4A16 path on CUDA: the packed tensors kept as stored (W4A16Linear),
                # the lone request through FusedDecoder's gemv_w4 kernels.
                tmodel, _ = load_w4a16(Path(tmp), device)
                qinfo["service_kernel"] = w4a16_kernel(tmodel, device)
                qinfo["triton_linears"] = int4_linears(tmodel, device, kernel="triton")
                qinfo["triton_model_bytes_per_token"] = bytes_per_token(tmodel)
                measure("w4a16_fused_batch1", tmodel, modes(tmodel, "w4a16_", "w4a16_eager", compiled=False))
                if qinfo["service_kernel"] == "triton":  # CUDA: the service's W4A16 path is tmodel's
                    curve("w4a16_concurrent", tmodel)
                else:  # CPU (--tiny): the service packs for PyTorch's int4 kernel instead
                    smodel, _ = load_w4a16(Path(tmp), device)
                    int4_linears(smodel, device, kernel=qinfo["service_kernel"])
                    curve("w4a16_concurrent", smodel)
                    del smodel
                if device == "cuda" and (not only or "w4a16_accuracy" in only):
                    # teacher-forced logits of the fused W4A16 step against the dequantized model in
                    # float32 (compressed-tensors' own path, decompressed at its first forward; a
                    # quantized transformers model refuses `.float()`, so it is loaded in float32)
                    qmodel, _ = load_w4a16(Path(tmp), device)
                    qref, _ = load_w4a16(Path(tmp), device, "float32")
                    try:
                        result["w4a16_accuracy"] = accuracy(qmodel, {"w4a16_fused": FusedDecoder(tmodel, max_len, device)},
                                                            prompt_len=args.prompt_len, steps=16, device=device,
                                                            reference=qref)
                    except Exception as exc:
                        result["w4a16_accuracy"] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
                    print("w4a16 accuracy", json.dumps(result["w4a16_accuracy"]), flush=True)
                    del qmodel, qref
                result["summary"] = summary(result)
                save()
        except Exception as exc:
            result["w4a16"] = {"error": f"{type(exc).__name__}: {exc}"[:800], "trace": traceback.format_exc()[-1500:]}
            save()
    result["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    print(json.dumps({k: result[k] for k in ("bf16_batch1", "w4a16_batch1") if k in result}, indent=2)[:3000])
    print(json.dumps(result.get("summary"), indent=1))
    for key in ("bf16_concurrent", "w4a16_concurrent"):
        b = result.get(key, {}).get("breakdown")
        if b:
            print(key, "breakdown", json.dumps({k: b.get(k) for k in ("decode_step_ms", "share_of_wall")}))
            print(key, "profile", json.dumps(b.get("decode_forward_profile"))[:700])
    print(curve_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
