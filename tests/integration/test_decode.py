"""phiops.serve.decode: the static-cache solo decoders and the int4 W4A16 layers.

On CPU the decoders run their cache logic without the CUDA graph (``GraphDecoder`` in one test
compiled; ``FusedDecoder``'s Triton kernels under Triton's interpreter); the CUDA graph and the
CUDA kernels are checked by the GPU tests at the end (skipped without CUDA) and measured by
bench/decode_phi3_mini.py and bench/decode_kernels.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from phiops import models
from phiops.models import word_tokenizer  # a tokenizer made in code, no files
from phiops.serve.decode import FusedDecoder, GraphDecoder, fused_unsupported, int4_linears
from phiops.serve.engine import Engine, Request

pytestmark = pytest.mark.integration

_COMMON = {"vocab_size": 49152, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
           "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
           # Wide enough an init that attention is peaked: positions then change the logits.
           "initializer_range": 0.2}
ARCHS = {
    # Phi-3-mini's own layout: fused qkv/gate_up, untied head, and its 2047-token sliding window.
    "phi3": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=4, sliding_window=2047,
                 original_max_position_embeddings=4096, tie_word_embeddings=False, **_COMMON),
    # GQA and tied embeddings, like SmolLM2.
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **_COMMON),
}
PROMPT = [1, 523, 9001, 17, 4400, 321, 77, 12000, 8, 901, 44, 3]


def _build(arch: str, dtype: str = "float32", device: str = "cpu", **overrides: Any) -> Any:
    return models.random_model({**ARCHS[arch], **overrides}, dtype=dtype, device=device)


@pytest.mark.parametrize("arch,compiled", [("phi3", False), ("llama", False), ("phi3", True)])
def test_solo_decoder_matches_the_dynamic_cache_forward(greedy_reference: Any, arch: str, compiled: bool) -> None:
    model = _build(arch)
    want, want_logits = greedy_reference(model, PROMPT, 10)
    _check_decoder(GraphDecoder(model, 64, "cpu", compile=compiled), want, want_logits)


def _check_decoder(dec: Any, want: list[int], want_logits: list[Any]) -> None:
    """Greedy decoding through `dec` gives the reference's tokens and logits (1e-4) at every step,
    twice (a second prefill reuses the cache from position 0), and exports the same cache."""
    with torch.inference_mode():
        for _ in range(2):
            logits = dec.prefill(PROMPT)
            got, worst = [], 0.0
            for i in range(10):
                worst = max(worst, float((logits.float() - want_logits[i]).abs().max()))
                got.append(int(logits.argmax(-1)))
                if i < 9:
                    logits = dec.step(logits.argmax(-1))
            assert got == want
            assert worst < 1e-4
        # What the engine hands over when company arrives: the same tokens in a DynamicCache.
        exported = dec.export()
        assert exported.get_seq_length() == dec.length == len(PROMPT) + 9
        for i, layer in enumerate(exported.layers):
            torch.testing.assert_close(layer.keys, dec.cache.layers[i].keys[:, :, :dec.length])
            torch.testing.assert_close(layer.values, dec.cache.layers[i].values[:, :, :dec.length])


def test_solo_decoder_refuses_what_does_not_fit() -> None:
    model = _build("phi3")
    with pytest.raises(ValueError, match="sliding window 2047"):
        GraphDecoder(model, 4096, "cpu")
    dec = GraphDecoder(model, 16, "cpu")
    assert dec.fits(16) and not dec.fits(17)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="does not fit"):
            dec.prefill(list(range(17)))
        logits = dec.prefill(PROMPT)
        for _ in range(16 - len(PROMPT)):
            logits = dec.step(logits.argmax(-1))
        with pytest.raises(ValueError, match="full"):
            dec.step(logits.argmax(-1))


def _run(engine: Engine, prompts: list[list[int]], n: int, join_after: int | None = None,
         want_logits: list[list[Any]] | None = None, tol: float = 1e-4) -> list[list[int]]:
    """Greedy requests through `engine`, their tokens; with `join_after`, the second is submitted
    once the first has produced that many tokens (it arrives while the first decodes alone).
    With `want_logits`, each request's logits at every step must match them."""
    done = [threading.Event() for _ in prompts]
    joined = threading.Event()

    def emitter(i: int) -> Any:
        def emit(ev: Any) -> None:  # on the engine thread
            if i == 0 and join_after is not None and not joined.is_set() and ev.completion_tokens >= join_after:
                joined.set()
                engine.submit(requests[1])
            if ev.finish_reason or ev.error:
                done[i].set()
        return emit

    requests = [Request(prompt=p, max_new_tokens=n, emit=emitter(i)) for i, p in enumerate(prompts)]

    def recording(sample: Any) -> Any:  # each row's logits, solo or batched, overlapped or not
        def wrapped(logits: Any, rows: list[Request]) -> Any:
            for i, r in enumerate(rows):
                seen.setdefault(id(r), []).append(logits[i].float().clone())
            return sample(logits, rows)
        return wrapped

    seen: dict[int, list[Any]] = {}
    engine._sample = recording(engine._sample)  # type: ignore[method-assign]
    engine._sample_async = recording(engine._sample_async)  # type: ignore[method-assign]
    for r in requests[:1] if join_after is not None else requests:
        engine.submit(r)
    for d in done:
        assert d.wait(60)
    engine.close()
    for r, ref in zip(requests, want_logits or []):  # positions and cache hand-over exact, not just argmax
        assert len(seen[id(r)]) == len(ref)
        assert max(float((a - b[0]).abs().max()) for a, b in zip(seen[id(r)], ref)) < tol
    return [r.tokens for r in requests]


def _engine_scenarios(greedy_reference: Any, device: str, tol: float, decoder: Any = GraphDecoder,
                      **overrides: Any) -> None:
    model = _build("llama" if device == "cpu" else "phi3", device=device, **overrides)
    tok = word_tokenizer(model.config.vocab_size)
    second = [1, 88, 4021, 7, 310, 29]
    refs = [greedy_reference(model, p, 12, device) for p in (PROMPT, second)]
    want, want_logits = [r[0] for r in refs], [r[1] for r in refs]
    # EOS = an id these random weights do not pick in 12 steps: every request runs to its length.
    eos = [next(i for i in range(3, model.config.vocab_size) if all(i not in w for w in want))]

    # Alone: decoded through the solo decoder (its cache holds the whole sequence).
    solo = decoder(model, 64, device)
    engine = Engine(model, tok, eos, device, max_wait_ms=0, solo=solo)
    assert _run(engine, [PROMPT], 12, want_logits=want_logits[:1], tol=tol) == [want[0]]
    assert solo.length == len(PROMPT) + 11
    assert engine.stats.forward_passes == 12

    # A second request arrives after the first's 4th token: the first moves to the shared cache,
    # both continue batched, and both still get the plain forward's logits at every step.
    solo = decoder(model, 64, device)
    engine = Engine(model, tok, eos, device, max_wait_ms=0, solo=solo)
    assert _run(engine, [PROMPT, second], 12, join_after=4, want_logits=want_logits, tol=tol) == want
    assert len(PROMPT) + 3 <= solo.length < len(PROMPT) + 11  # handed over mid-way
    assert engine.stats.prefill_passes == 2

    # A request that does not fit the solo cache takes the batched path from the start.
    solo = decoder(model, len(PROMPT) + 4, device)
    engine = Engine(model, tok, eos, device, max_wait_ms=0, solo=solo)
    assert _run(engine, [PROMPT], 12, want_logits=want_logits[:1], tol=tol) == [want[0]]
    assert solo.length == 0


def test_engine_decodes_a_lone_request_through_the_solo_decoder_and_hands_over(greedy_reference: Any) -> None:
    _engine_scenarios(greedy_reference, "cpu", 1e-4)


def test_solo_overlap_throws_away_the_step_queued_behind_a_stop(greedy_reference: Any) -> None:
    """A lone request's steps are queued before its previous token is recorded (``_decode_solo``): the
    step queued behind its EOS runs and is thrown away; a request asking for log-probabilities records
    each token before the next step (nothing thrown away). Both get ``generate``'s tokens, cut at EOS."""
    from phiops.serve.sampling import SamplingParams

    model = _build("llama")
    ref = greedy_reference(model, PROMPT, 14)[0]
    k = next(k for k in range(3, 10) if ref.index(ref[k]) == k)  # EOS: a token first produced at step k
    for sampling, thrown_away in ((SamplingParams(), 1), (SamplingParams(logprobs=2), 0)):
        solo = GraphDecoder(model, 64, "cpu")
        engine = Engine(model, word_tokenizer(model.config.vocab_size), [ref[k]], "cpu", max_wait_ms=0, solo=solo)
        r = Request(prompt=PROMPT, max_new_tokens=14, emit=print, sampling=sampling)
        events = _drive(engine, [r])
        engine.close()
        assert r.tokens == ref[:k] and events[0][-1].finish_reason == "stop"
        # k steps fed tokens 0..k-1 (token 0 came from the prefill)
        assert solo.length == len(PROMPT) + k + thrown_away
        assert engine.stats.active == 0 and engine._lag is None


# ---- FusedDecoder: the Triton kernels (phiops.serve.kernels), under the interpreter without a GPU ------


@pytest.mark.parametrize("norm,gated,residual", [(False, False, False), (True, False, False), (False, False, True),
                                                 (True, True, False), (False, True, True)])
def test_gemv_kernel_computes_its_fused_stages(kernels: Any, norm: bool, gated: bool, residual: bool) -> None:
    device = kernels.DEVICE
    g = torch.Generator(device="cpu").manual_seed(int(norm) * 4 + int(gated) * 2 + int(residual))
    n, k = 300, 200  # neither a multiple of any block size: the masks are exercised
    w = torch.randn(2 * n if gated else n, k, generator=g).to(device)
    a = torch.randn(k, generator=g).to(device) * 3
    gain = torch.rand(k, generator=g).to(device) + 0.5 if norm else None
    r = torch.randn(n, generator=g).to(device) if residual else None
    x = a * torch.rsqrt(a.pow(2).mean() + 1e-5) * gain if norm else a
    y = (w.double() @ x.double()).float()
    if gated:
        y = torch.nn.functional.silu(y[:n]) * y[n:]
    want = y + r if residual else y
    # the autotuner's pick, then each config FusedDecoder times
    for config in [None] + kernels.gemv_candidates() + kernels.gemv_candidates(preload=True):
        out = r.clone() if residual else torch.full((n,), float("nan"), device=device)  # poisoned: every row written
        kernels.gemv(w, a, out, norm=gain, eps=1e-5, gated=gated, residual=out if residual else None, config=config)
        assert float((out - want).norm() / want.norm()) < 1e-5, config


# A vocabulary small enough for the interpreter's LM head, large enough for PROMPT's ids.
_SMALL = {"vocab_size": 16384}


@pytest.mark.parametrize("arch,overrides", [
    ("phi3", {}),
    ("llama", {}),  # GQA (4 query heads over 2), tied embeddings
    ("phi3", {"partial_rotary_factor": 0.75, "num_key_value_heads": 2}),  # Phi-4-mini: rotary on 3/4 of each head
])
def test_fused_decoder_matches_the_dynamic_cache_forward(greedy_reference: Any, kernels: Any, arch: str,
                                                        overrides: dict[str, Any]) -> None:
    device = kernels.DEVICE
    model = _build(arch, device=device, **_SMALL, **overrides)
    want, want_logits = greedy_reference(model, PROMPT, 10, device)
    # 8 positions per attention split: the 21 positions span 3 splits and cross two boundaries.
    dec = FusedDecoder(model, 32, device, chunk=8)
    assert dec._attn.splits == 4
    _check_decoder(dec, want, want_logits)


def test_fused_decoder_times_only_preload_configs_for_o_proj(kernels: Any) -> None:
    # o_proj's preload configs stream its weights while attention runs; timed without attention the
    # tuner could not see that and picked plain ones, so they are the only candidates (decode.PRELOAD_ROLES)
    device = kernels.DEVICE
    model = _build("phi3", device=device, **_SMALL)
    dec = FusedDecoder(model, 32, device)
    assert dec.candidates("o") == kernels.gemv_candidates(preload=True)
    assert all(len(c) == 4 for c in dec.candidates("o"))  # (rows, columns, warps, tiles before the wait)
    for role in ("qkv", "gate_up", "down", "lm_head"):
        assert dec.candidates(role) == kernels.gemv_candidates()
    assert FusedDecoder(model, 32, device, preload=False).candidates("o") == kernels.gemv_candidates()
    # bf16 weights are never requested into the L2 by attention (0.993x: decode.L2_PREFETCH)
    assert dec.l2_prefetch == () and all(p == () for p in dec._prefetch)


def test_attention_kernel_requests_its_prefetch_regions_into_the_l2_on_hopper() -> None:
    # The prefetch is inline PTX, which the interpreter skips: compiled here for sm_90 (no GPU needed),
    # each region must give one L2 prefetch (in its loop), and none without regions.
    code = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from phiops.serve import kernels as K
sig = {"qkv_ptr": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "pos_ptr": "*i64", "cos_ptr": "*fp32",
       "sin_ptr": "*fp32", "out_ptr": "*bf16", "po_ptr": "*fp32", "pm_ptr": "*fp32", "pl_ptr": "*fp32",
       "sm_scale": "fp32", "MAX_LEN": "i32", "pf0_ptr": "*bf16", "pf0_lines": "i32", "pf1_ptr": "*i32",
       "pf1_lines": "i32"}
for regions in (0, 1, 2):
    const = dict(CHUNK=128, HQ=8, HKV=4, D=64, ROT=64, GROUP_P=2, BLOCK_D=64, BLOCK_T=32, SPLITS=4, PDL=True,
                 PREFETCH=regions)
    src = ASTSource(fn=K._decode_attention, signature={**sig, **{n: "constexpr" for n in const}}, constexprs=const)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 2, "launch_pdl": True}).asm["ptx"]
    print(regions, ptx.count("prefetch.global.L2::evict_last"))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0", "0", "1", "1", "2", "2"]


def test_fused_decoder_keeps_the_model_working_and_refuses_other_architectures(kernels: Any) -> None:
    device = kernels.DEVICE
    model = _build("llama", device=device, **_SMALL)
    ids = torch.tensor([PROMPT], device=device)
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        FusedDecoder(model, 32, device)  # q/k/v and gate/up become views of one fused weight each
        FusedDecoder(model, 32, device)  # a second decoder finds them fused and copies nothing
        attn = model.model.layers[0].self_attn
        assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.nbytes
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    phi2 = models.random_model({"model_type": "phi", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 1, "num_attention_heads": 4})
    assert "model type 'phi'" in fused_unsupported(phi2)
    with pytest.raises(ValueError, match="does not support this model: model type 'phi'"):
        FusedDecoder(phi2, 32, "cpu")


def test_engine_hands_over_from_the_fused_decoder(greedy_reference: Any, kernels: Any) -> None:
    _engine_scenarios(greedy_reference, kernels.DEVICE, 1e-3 if not kernels.INTERPRET else 1e-4, FusedDecoder, **_SMALL)


def _w4a16(tmp_path: Path, arch: str) -> Path:
    pytest.importorskip("llmcompressor")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = _build(arch)
    out = tmp_path / f"{arch}-w4a16"
    (tmp_path / "cfg").mkdir(exist_ok=True)
    model.config.save_pretrained(tmp_path / "cfg")  # llm-compressor re-reads the config from the path
    model.config._name_or_path = str(tmp_path / "cfg")
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))
    model.save_pretrained(out, save_compressed=True)
    return out


def _dequantized(module: Any) -> Any:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = [int(v) for v in module.weight_shape.tolist()]
    scale = module.weight_scale.float()
    q = unpack_from_int32(module.weight_packed, 4, shape).float()
    return q * scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)


def _check_int4(path: Path, device: str) -> None:
    from transformers import AutoModelForCausalLM

    load = {"dtype": torch.bfloat16, "use_safetensors": True, "trust_remote_code": False}
    model = AutoModelForCausalLM.from_pretrained(path, **load).to(device).eval()
    compressed = {n: m for n, m in model.named_modules() if hasattr(m, "weight_packed")}
    weights = {n: _dequantized(m) for n, m in compressed.items()}
    assert len(compressed) > 0
    assert int4_linears(model, device) == (len(compressed), 0)
    with torch.inference_mode():
        for name, w in weights.items():
            layer = model.get_submodule(name)
            assert type(layer).__name__ == "Int4Linear"
            xin = torch.randn(3, 5, w.shape[1], generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
            want = xin.float() @ w.T
            got = layer(xin).float()
            assert got.shape == want.shape
            assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max())  # bf16 rounding
        # The whole model runs on them, as close to the float32 dequantized model as bf16 dense is.
        ids = torch.tensor([PROMPT], device=device)
        ref = AutoModelForCausalLM.from_pretrained(path, **{**load, "dtype": torch.float32}).to(device).eval()
        dense = AutoModelForCausalLM.from_pretrained(path, **load).to(device).eval()
        want = ref(input_ids=ids).logits.float()
        err_int4 = float((model(input_ids=ids).logits.float() - want).abs().max())
        err_dense = float((dense(input_ids=ids).logits.float() - want).abs().max())
    assert err_int4 <= 2 * err_dense + 1e-3, (err_int4, err_dense)


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_w4a16_layers_run_on_the_int4_kernel_cpu(tmp_path: Path, arch: str) -> None:
    _check_int4(_w4a16(tmp_path, arch), "cpu")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the CUDA int4 kernel: needs a GPU (CI has none)")


@pytest.mark.gpu
@cuda
def test_cuda_graph_decode_matches_the_eager_forward(greedy_reference: Any) -> None:
    # transformers' default init (0.02), with which this passed on an H100. With the CPU tests'
    # wide init (0.2) it failed there once (message not kept): in bf16, inductor's and the eager
    # kernels round differently, and larger weights magnify that. The float32 engine test
    # above checks the graph path to 1e-3.
    model = _build("phi3", "bfloat16", "cuda", initializer_range=0.02)
    _, want_logits = greedy_reference(model, PROMPT, 8, "cuda")
    dec = GraphDecoder(model, 64, "cuda")
    with torch.inference_mode():
        logits = dec.prefill(PROMPT)
        for i in range(8):
            scale = float(want_logits[i].abs().max())
            assert float((logits.float() - want_logits[i]).abs().max()) <= 0.05 * scale
            if i < 7:
                logits = dec.step(want_logits[i].argmax(-1))  # teacher-forced: bf16 ties may differ
        assert dec._graph is not None


@pytest.mark.gpu
@cuda
def test_engine_with_the_cuda_graph_decoder_hands_over(greedy_reference: Any) -> None:
    # float32 (TF32 off, PyTorch's default for matmuls): the compiled graph and the eager
    # forward agree to ~1e-5, so greedy choices cannot flip and every step's logits are compared.
    _engine_scenarios(greedy_reference, "cuda", 1e-3)


@pytest.mark.gpu
@cuda
def test_w4a16_layers_run_on_the_int4_kernel_cuda(tmp_path: Path) -> None:
    _check_int4(_w4a16(tmp_path, "phi3"), "cuda")


# ---- the paged KV pool and its batched step (phiops.serve.paged) ---------------------------------

PROMPTS = [PROMPT, [1, 88, 4021, 7, 310, 29], [1, 5, 6], PROMPT[:9] + [15, 16, 17, 18, 19, 20, 21, 22],
           [1, 700], [1, 9, 99, 999, 9999, 3, 33, 333, 3333, 4], [1, 2222] * 5, [1, 12, 13, 14, 15]]


def _prefill(model: Any, prompts: list[list[int]], device: str) -> tuple[Any, Any]:
    """A left-padded prefill of `prompts` through the model (as the engine does): last logits, cache."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), 2, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    return out.logits[:, -1], out.past_key_values


@pytest.mark.parametrize("arch,overrides", [
    ("phi3", {}),
    ("llama", {}),
    ("phi3", {"partial_rotary_factor": 0.75, "num_key_value_heads": 2}),
])
def test_paged_step_matches_the_dynamic_cache_forward(greedy_reference: Any, kernels: Any, arch: str,
                                                      overrides: dict[str, Any]) -> None:
    """Rows of ragged lengths in pages of 16 (rows cross page boundaries), a row joining later and
    one leaving with the others reordered: each row's logits equal the plain forward's at every step."""
    from phiops.serve.paged import PagedDecoder

    device = kernels.DEVICE
    model = _build(arch, device=device, **_SMALL, **overrides)
    prompts = PROMPTS[:3]
    refs = [greedy_reference(model, p, 12, device) for p in prompts]
    dec = PagedDecoder(model, device, pages=12, max_len=64, max_rows=4, page=16)
    got: list[list[int]] = [[], [], []]
    worst = 0.0

    def check(rows: list[int], logits: Any) -> Any:
        nonlocal worst
        for i, r in enumerate(rows):
            worst = max(worst, float((logits[i].float() - refs[r][1][len(got[r])]).abs().max()))
            got[r].append(int(logits[i].argmax()))
        return torch.tensor([got[r][-1] for r in rows], device=device)

    with torch.inference_mode():
        logits, cache = _prefill(model, prompts[:2], device)
        dec.add([(layer.keys, layer.values) for layer in cache.layers], [len(p) for p in prompts[:2]])
        rows = [0, 1]
        last = check(rows, logits)
        for step in range(11):
            if step == 3:  # a third request joins: prefilled alone, its cache written into free pages
                logits, cache = _prefill(model, prompts[2:], device)
                dec.add([(layer.keys, layer.values) for layer in cache.layers], [len(prompts[2])])
                rows, last = rows + [2], torch.cat([last, check([2], logits)])
            if step == 7:  # row 0 leaves; the others continue in the order [2, 1]
                free = dec.free_pages
                dec.keep([2, 1])
                assert dec.free_pages == free + dec.pages_for(len(prompts[0]) + 7)
                rows, last = [2, 1], last[torch.tensor([2, 1], device=device)]
            assert dec.pages_short() == 0
            dec.grow()
            rows_now = [r for r in rows if len(got[r]) < 12]
            assert rows_now == rows
            last = check(rows, dec.step(last))
    assert got[1] == refs[1][0] and got[2] == refs[2][0][:len(got[2])] and got[0] == refs[0][0][:len(got[0])]
    assert worst < (1e-4 if kernels.INTERPRET else 1e-3)


def _paged_engine(model: Any, device: str, eos: list[int], *, pages: int, max_rows: int = 8, **kw: Any) -> Engine:
    from phiops.serve.paged import PagedDecoder

    dec = PagedDecoder(model, device, pages=pages, max_len=64, max_rows=max_rows, page=16)
    return Engine(model, word_tokenizer(model.config.vocab_size), eos, device, max_wait_ms=0,
                  max_batch_size=max_rows, paged=dec, **kw)


def _drive(engine: Engine, requests: list[Request], joins: dict[int, int] | None = None) -> list[Any]:
    """Submit `requests` (request i of `joins` once request 0 has `joins[i]` tokens) and wait for all;
    each request's events, in order."""
    events: list[list[Any]] = [[] for _ in requests]
    done = [threading.Event() for _ in requests]
    joins = dict(joins or {})
    order: list[int] = []

    def emitter(i: int) -> Any:
        def emit(ev: Any) -> None:  # on the engine thread
            events[i].append(ev)
            if not order or order[-1] != i:
                order.append(i)
            for j, after in list(joins.items()):
                if i == 0 and ev.completion_tokens >= after:
                    del joins[j]
                    engine.submit(requests[j])
            if ev.finish_reason or ev.error:
                done[i].set()
        return emit

    for i, r in enumerate(requests):
        r.emit = emitter(i)
    for i, r in enumerate(requests):
        if i not in joins:
            engine.submit(r)
    for d in done:
        assert d.wait(300)
    engine.close()
    return events


def _refs(greedy_reference: Any, model: Any, prompts: list[list[int]], n: int, device: str) -> tuple[list[Any], list[int]]:
    refs = [greedy_reference(model, p, n, device)[0] for p in prompts]
    # EOS = an id these random weights never pick: every request runs to its length.
    eos = [next(i for i in range(3, model.config.vocab_size) if all(i not in w for w in refs))]
    return refs, eos


def test_paged_engine_matches_generate_for_rows_that_join_and_leave(greedy_reference: Any, kernels: Any) -> None:
    """8 greedy requests: 3 at once, 5 joining while they decode, each leaving at its own length."""
    device = kernels.DEVICE
    model = _build("llama", device=device, **_SMALL)
    refs, eos = _refs(greedy_reference, model, PROMPTS, 14, device)
    lengths = [14, 6, 11, 8, 13, 5, 9, 12]
    requests = [Request(prompt=p, max_new_tokens=n, emit=print) for p, n in zip(PROMPTS, lengths)]
    engine = _paged_engine(model, device, eos, pages=32)
    _drive(engine, requests, joins={3: 2, 4: 2, 5: 5, 6: 7, 7: 9})
    assert [r.tokens for r in requests] == [ref[:n] for ref, n in zip(refs, lengths)]
    assert engine.stats.preempted == 0 and engine.paged.free_pages == 32  # every page back


def test_paged_engine_overlap_drops_rows_that_stop_while_the_next_step_runs(greedy_reference: Any,
                                                                          kernels: Any) -> None:
    """The paged engine queues each step before it records the previous one's tokens (``_decode_paged``).
    Rows that stop on EOS mid-stream were in the step queued after their last token: their output is
    dropped and their pages come back; a row asking for log-probabilities (its tokens needed at once)
    switches the engine to recording each step before the next while it runs. Every row's tokens are
    still ``generate``'s, cut at its EOS."""
    from phiops.serve.sampling import SamplingParams

    device = kernels.DEVICE
    model = _build("llama", device=device, **_SMALL)
    prompts = PROMPTS[:6]
    refs = [greedy_reference(model, p, 14, device)[0] for p in prompts]
    # EOS: a token row 0 never produces and another row produces early (it stops there, row 0 runs on)
    eos = next(ref[k] for ref in refs[1:4] for k in range(2, 7) if ref[k] not in refs[0] and ref.index(ref[k]) == k)
    want = [ref[:ref.index(eos)] if eos in ref else ref for ref in refs]
    assert len(want[0]) == 14 and min(len(w) for w in want[1:4]) < 7
    requests = [Request(prompt=p, max_new_tokens=14, emit=print) for p in prompts]
    requests[4] = Request(prompt=prompts[4], max_new_tokens=14, emit=print, sampling=SamplingParams(logprobs=2))
    engine = _paged_engine(model, device, [eos], pages=32)
    drains, stepped = [], []
    drain, step = engine._drain, engine.paged.step
    engine._drain = lambda *a, **k: drains.append(1) or drain(*a, **k)  # type: ignore[method-assign]
    engine.paged.step = lambda tokens: stepped.append(len(engine.rows)) or step(tokens)  # type: ignore[method-assign]
    # row 5 joins early, the log-probabilities row once the early stop is past
    events = _drive(engine, requests, joins={5: 2, 4: 9})
    assert [r.tokens for r in requests] == want
    assert [ev[-1].finish_reason for ev in events] == ["stop" if len(w) < 14 else "length" for w in want]
    assert len(requests[4].logprobs) == len(want[4]) + (len(want[4]) < 14)  # the EOS's own too
    # Rows stepped beyond the tokens decoded (each request's first comes from its prefill, an EOS
    # counts): steps that ran rows already done, whose output was dropped.
    decoded = sum(len(w) + (len(w) < 14) - 1 for w in want)
    assert sum(stepped) > decoded and drains and engine.paged.free_pages == 32


def test_paged_engine_queues_what_the_pool_cannot_hold_and_refuses_it_past_its_deadline(
        greedy_reference: Any, kernels: Any) -> None:
    """A pool of 4 pages of 16 (one row of 64): a 40-token prompt takes 3, so a second one waits
    for the first to finish (no out-of-memory, no preemption); a third, waiting for pages past its
    queue deadline, is refused with ``queue_timeout``; a request longer than a row fails at once."""
    device = kernels.DEVICE
    model = _build("llama", device=device, **_SMALL)
    long_prompts = [[1] + list(range(100, 139)), [1] + list(range(200, 239))]
    refs, eos = _refs(greedy_reference, model, long_prompts, 8, device)
    requests = [Request(prompt=p, max_new_tokens=8, emit=print) for p in long_prompts]
    # Past its deadline while it waits for pages: refused then, not once pages free up.
    late = Request(prompt=PROMPT, max_new_tokens=4, emit=print, queue_deadline=time.perf_counter() - 1)
    too_long = Request(prompt=long_prompts[0], max_new_tokens=30, emit=print)
    engine = _paged_engine(model, device, eos, pages=4)
    events = _drive(engine, requests + [late, too_long])
    assert [r.tokens for r in requests] == refs
    first_of_second = next(i for i, ev in enumerate(events[1]) if ev.text or ev.finish_reason)
    assert events[0][-1].finish_reason == "length" and first_of_second == 0
    assert engine.stats.preempted == 0
    assert events[2][-1].code == "queue_timeout" and late.tokens == []
    assert "exceed the 64 tokens a sequence may hold" in events[3][-1].error
    assert engine.paged.free_pages == 4


def test_paged_engine_preempts_the_newest_row_and_resumes_it_with_the_same_tokens(
        greedy_reference: Any, kernels: Any) -> None:
    """5 pages of 16 for two rows that each grow to 4 pages: the newer is preempted when the pool runs
    out, waits, and is resumed by recomputation. Its greedy tokens, and a seeded sampled request's,
    are those of an uninterrupted run."""
    from phiops.serve.sampling import SamplingParams

    device = kernels.DEVICE
    model = _build("llama", device=device, **_SMALL)
    prompts = [PROMPT, PROMPTS[1]]
    refs, eos = _refs(greedy_reference, model, prompts, 40, device)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    results = {}
    for pages in (16, 5):  # roomy, then short
        requests = [Request(prompt=prompts[0], max_new_tokens=40, emit=print),
                    Request(prompt=prompts[1], max_new_tokens=40, emit=print),
                    Request(prompt=prompts[1], max_new_tokens=30, emit=print, sampling=seeded)]
        engine = _paged_engine(model, device, eos, pages=pages)
        _drive(engine, requests)
        results[pages] = ([r.tokens for r in requests], engine.stats.preempted, [r.preempted for r in requests])
        assert engine.paged.free_pages == pages
    (roomy, none, _), (short, preempted, per_request) = results[16], results[5]
    assert none == 0 and preempted >= 1 and per_request[0] == 0  # the oldest row is never the one taken out
    assert roomy[:2] == refs and short == roomy


def test_paged_add_that_fails_leaves_the_pool_as_it_was() -> None:
    """A prefill's cache that cannot be written (here: the wrong head count) gives its pages back and
    adds no row, so the engine's rows and the pool's stay in step."""
    from phiops.serve.paged import PagedDecoder

    model = _build("llama", **_SMALL)
    dec = PagedDecoder(model, "cpu", pages=8, max_len=64, max_rows=4, page=16)
    good = [(torch.zeros(1, 2, 20, 32), torch.zeros(1, 2, 20, 32)) for _ in model.model.layers]
    dec.add(good, [20])
    free, tables = dec.free_pages, [list(t) for t in dec.tables]
    wrong = [(torch.zeros(2, 3, 20, 32), torch.zeros(2, 3, 20, 32)) for _ in model.model.layers]
    with pytest.raises(RuntimeError):
        dec.add(wrong, [20, 17])
    assert dec.free_pages == free and dec.tables == tables and dec.lengths == [20]
    with pytest.raises(RuntimeError, match="pages needed"):
        dec.add(good, [64 * 2])


LONG_PROMPT = [1] + list(range(100, 139))  # 40 tokens


def _chunked_schedule(greedy_reference: Any, kernels: Any, paged: bool, prompts: list[list[int]],
                      joins: dict[int, int]) -> list[tuple[str, int]]:
    """``prompts`` through an engine with ``prefill_chunk=8`` (request i of ``joins`` submitted once
    request 0 has ``joins[i]`` tokens); checks every request's greedy tokens against ``generate``'s
    and returns the engine's passes in order, as (phase, rows)."""
    device = kernels.DEVICE
    model = _build("llama", device=device, **_SMALL)
    refs, eos = _refs(greedy_reference, model, prompts, 12, device)
    requests = [Request(prompt=p, max_new_tokens=12, emit=print) for p in prompts]
    if paged:
        engine = _paged_engine(model, device, eos, pages=32, prefill_chunk=8)
    else:
        engine = Engine(model, word_tokenizer(model.config.vocab_size), eos, device, max_wait_ms=0,
                        max_batch_size=8, prefill_chunk=8)
    phases: list[tuple[str, int]] = []
    engine.on_step = lambda phase, rows, new: phases.append((phase, rows))
    _drive(engine, requests, joins=joins)
    assert [r.tokens for r in requests] == refs
    return phases


@pytest.mark.parametrize("paged", [False, True], ids=["dynamic cache", "paged pool"])
def test_chunked_prefill_runs_between_the_running_rows_steps(greedy_reference: Any, kernels: Any,
                                                             paged: bool) -> None:
    """Two rows decode when a 40-token prompt arrives: with ``prefill_chunk=8`` its prefill is 5 passes
    of 8 tokens, a decode step of the running rows after each of the first 4, not one pass that holds
    them up. Every request's greedy tokens are still ``generate``'s, on both of the engine's caches."""
    phases = _chunked_schedule(greedy_reference, kernels, paged, [PROMPTS[0], PROMPTS[1], LONG_PROMPT], {2: 2})
    start = phases.index(("prefill", 1), 1)  # the long prompt's first pass (the first entry: the two rows')
    assert phases[start:start + 10] == [("prefill", 1), ("decode", 2)] * 4 + [("prefill", 1), ("decode", 3)]


@pytest.mark.parametrize("paged", [False, True], ids=["dynamic cache", "paged pool"])
def test_short_prompts_arriving_together_prefill_in_one_pass_and_a_long_one_alone_in_chunks(
        greedy_reference: Any, kernels: Any, paged: bool) -> None:
    """One row decodes when four prompts arrive at once, with ``prefill_chunk=8``: the three of 2-5
    tokens (15 padded tokens together) go in one pass and decode from the next step; the 10-token
    one follows alone in passes of 8 and 2. Not the group cut into columns of 8 // 4 (five passes
    before any of them decodes: what a CPU server under load of short prompts paid). Every
    request's greedy tokens are ``generate``'s."""
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[5], PROMPTS[7], PROMPTS[4]]  # 6 (running), 3, 10, 5, 2 tokens
    phases = _chunked_schedule(greedy_reference, kernels, paged, prompts, {1: 2, 2: 2, 3: 2, 4: 2})
    start = phases.index(("prefill", 3))
    assert phases[start - 1:start + 6] == [("decode", 1), ("prefill", 3), ("decode", 4), ("prefill", 1),
                                           ("decode", 4), ("prefill", 1), ("decode", 5)]


def test_chunked_prefill_echoes_the_prompt_logprobs_of_one_pass(greedy_reference: Any, kernels: Any) -> None:
    """A request that asks for its prompt's log-probabilities, prefilled in chunks beside a decoding row:
    the same prompt log-probabilities and tokens as one whole pass."""
    device = kernels.DEVICE
    model = _build("llama", device=device, **_SMALL)
    refs, eos = _refs(greedy_reference, model, [PROMPTS[0], LONG_PROMPT], 10, device)
    got = {}
    for chunk in (0, 8):
        running = Request(prompt=PROMPTS[0], max_new_tokens=10, emit=print)
        echo = Request(prompt=LONG_PROMPT, max_new_tokens=10, emit=print, prompt_logprobs=2)
        engine = Engine(model, word_tokenizer(model.config.vocab_size), eos, device, max_wait_ms=0,
                        max_batch_size=4, prefill_chunk=chunk)
        passes = []
        engine.on_step = lambda phase, rows, new: passes.append(phase)
        _drive(engine, [running, echo], joins={1: 2})
        assert [running.tokens, echo.tokens] == refs
        got[chunk] = (echo.prompt_lp, passes.count("prefill"))
    (whole, one_pass), (chunked, passes) = got[0], got[8]
    assert one_pass == 2 and passes == 1 + 5
    assert whole[0] is None and chunked[0] is None and len(whole) == len(chunked) == len(LONG_PROMPT)
    for a, b in zip(whole[1:], chunked[1:]):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_a_chunked_prefill_gives_way_to_running_rows_that_need_its_pages(greedy_reference: Any,
                                                                         kernels: Any) -> None:
    """A pool of 5 pages of 16: a decoding row holds 2, a 40-token prompt in chunked prefill is promised
    3. When the row needs a third page, the prefill (the newest work) goes back to the queue instead
    of the pool running out; it is admitted again once the row ends, with ``generate``'s tokens."""
    device = kernels.DEVICE
    model = _build("llama", device=device, **_SMALL)
    first = PROMPT[:9] + [15, 16, 17, 18, 19]  # 14 tokens: the row crosses into its 3rd page at 32
    refs, eos = _refs(greedy_reference, model, [first, LONG_PROMPT], 40, device)
    requests = [Request(prompt=first, max_new_tokens=40, emit=print),
                Request(prompt=LONG_PROMPT, max_new_tokens=8, emit=print)]
    engine = _paged_engine(model, device, eos, pages=5, prefill_chunk=2)  # 20 passes: still in flight at 32
    aborted, abort = [], engine._abort_prefill
    engine._abort_prefill = lambda: aborted.append(len(engine._prefilling())) or abort()  # type: ignore[method-assign]
    _drive(engine, requests, joins={1: 1})
    assert [r.tokens for r in requests] == [refs[0], refs[1][:8]]
    assert aborted == [1] and requests[1].preempted == 1 and requests[0].preempted == 0
    assert engine.paged.free_pages == 5
