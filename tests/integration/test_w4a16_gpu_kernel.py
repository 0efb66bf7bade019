"""The W4A16 Triton kernels (phiops.serve.kernels ``gemv_w4``, ``matmul_w4``) and ``FusedDecoder`` on them.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py), so the shapes are
tiny; on the device the same tests run on CUDA. The weights are packed by compressed-tensors' own
``pack_to_int32``, so the kernels are held to the layout llm-compressor writes, and the references
are float64 dequantizations ``(q - z) * s``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from phiops import models
from phiops.serve.decode import FusedDecoder, W4A16Linear, fused_unsupported, int4_linears, w4a16_kernel

pytestmark = pytest.mark.integration

pack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


def _packed_weight(n: int, k: int, group: int, symmetric: bool, g: torch.Generator, device: str
                   ) -> tuple[tuple[Any, ...], torch.Tensor]:
    """Random codes packed as compressed-tensors packs them, and the float64 weight they stand for."""
    groups = -(-k // group)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, groups, generator=g) * 0.1 + 0.01
    z = None if symmetric else torch.randint(-8, 8, (n, groups), generator=g, dtype=torch.int8)
    cols = torch.arange(k) // group
    w = (q.double() - (0 if z is None else z.double()[:, cols])) * scale.double()[:, cols]
    packed = pack.pack_to_int32(q, 4).contiguous()  # a view when K is no multiple of 32: saving copies it
    zp = None if z is None else pack.pack_to_int32(z, 4, packed_dim=0).contiguous()  # as compressed-tensors saves it
    assert torch.equal(pack.unpack_from_int32(packed, 4, (n, k)), q)  # the layout is compressed-tensors' own
    return (packed.to(device), scale.to(device), None if zp is None else zp.to(device), group), w


# Ragged against the interpreter's 128-row, 128-column tiles: 300 rows, 320, 384 and 192 inputs (2.5,
# 3 and 1.5 tiles). Every fused stage, both group sizes, both schemes.
CASES = [  # k, group, symmetric, norm, gated, residual
    (320, 64, True, False, False, False),
    (384, 128, False, False, False, False),
    (320, 64, False, True, False, False),
    (384, 128, True, False, False, True),
    (320, 64, True, True, True, False),
    (384, 128, False, False, True, True),
    (192, 64, False, True, False, True),
]


def _reference(w: torch.Tensor, a: torch.Tensor, gain: torch.Tensor | None, r: torch.Tensor | None, gated: bool,
               n: int) -> torch.Tensor:
    """What a GEMV stage should give, in float64: the RMSNorm of the input (with ``gain``), the weight,
    SiLU gating of the two halves (``gated``), the residual ``r``."""
    x = a.double()
    if gain is not None:
        x = x * torch.rsqrt(x.pow(2).mean() + 1e-5) * gain.double()
    y = w @ x
    if gated:
        y = torch.nn.functional.silu(y[:n]) * y[n:]
    return y + r.double() if r is not None else y


def _check_gemv_w4(kernels: Any, n: int, k: int, group: int, symmetric: bool, norm: bool, gated: bool,
                   residual: bool, config: tuple[int, int, int] | None = None) -> None:
    device = kernels.DEVICE
    g = torch.Generator().manual_seed(k + group + 2 * symmetric + 4 * norm + 8 * gated + 16 * residual)
    w4, w = _packed_weight(2 * n if gated else n, k, group, symmetric, g, device)
    a = torch.randn(k, generator=g) * 3
    gain = torch.rand(k, generator=g) + 0.5 if norm else None
    r = torch.randn(n, generator=g) if residual else None
    want = _reference(w, a, gain, r, gated, n).float()
    out = r.clone().to(device) if residual else torch.full((n,), float("nan"), device=device)  # poisoned
    packed = kernels.interleave_w4(w4[0], k, group)  # what W4A16Linear holds
    kernels.gemv_w4(packed, *w4[1:], a.to(device), out, norm=None if gain is None else gain.to(device), eps=1e-5,
                    gated=gated, residual=out if residual else None, config=config)
    assert float((out.cpu() - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("k,group,symmetric,norm,gated,residual", CASES)
def test_gemv_w4_matches_the_float64_dequantized_weight(kernels: Any, k: int, group: int, symmetric: bool,
                                                        norm: bool, gated: bool, residual: bool) -> None:
    _check_gemv_w4(kernels, 300, k, group, symmetric, norm, gated, residual)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the service's CUDA load path: needs a GPU (CI has none)")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("config", [(2, 128, 1), (4, 128, 1), (8, 128, 1), (2, 256, 2), (4, 256, 2), (4, 512, 4),
                                    (8, 512, 4)])
@pytest.mark.parametrize("k,group,symmetric,norm,gated,residual", [
    (3200, 64, False, True, True, False),  # 400 words a row: a last tile part-filled (all tile widths)
    (9216, 128, True, False, False, True),  # 1,152 words: more than four tiles of 128 or 256, the batch loop
])
def test_every_tuned_gemv_w4_config_matches_on_long_ragged_rows(kernels: Any, config: tuple[int, int, int], k: int,
                                                                group: int, symmetric: bool, norm: bool, gated: bool,
                                                                residual: bool) -> None:
    assert config in kernels.W4_CONFIGS  # the configs the autotuner picks from, each held to the reference
    _check_gemv_w4(kernels, 300, k, group, symmetric, norm, gated, residual, config=config)


@pytest.mark.parametrize("m,k,group,symmetric", [(5, 320, 64, False), (17, 384, 128, True), (70, 256, 128, False)])
def test_matmul_w4_and_the_layer_match_the_dequantized_weight(kernels: Any, m: int, k: int, group: int,
                                                              symmetric: bool) -> None:
    device, n = kernels.DEVICE, 100
    g = torch.Generator().manual_seed(m)
    w4, w = _packed_weight(n, k, group, symmetric, g, device)
    x = torch.randn(m, k, generator=g)
    want = (x.double() @ w.T).float()
    packed = kernels.interleave_w4(w4[0], k, group)
    # the weight put back in column order: the scratch matrix of the many-row path
    assert torch.allclose(kernels.dequant_w4(packed, *w4[1:], k, torch.float32).cpu(), w.float(), rtol=1e-6, atol=0)
    for dequant in (False, True):  # the tiled kernel, then the scratch matrix through torch.mm
        out = torch.full((m, n), float("nan"), device=device)
        kernels.matmul_w4(packed, *w4[1:], x.to(device), out, dequant=dequant)
        assert float((out.cpu() - want).norm() / want.norm()) < 1e-5, dequant
    bias = torch.randn(n, generator=g)
    with pytest.raises(ValueError, match="whole number of groups"):  # a short last group: not what the kernels take
        kernels.interleave_w4(w4[0][:, :-1].contiguous(), k - 8, group)
    layer = W4A16Linear(w4[0], w4[1], w4[2], group, k, bias.to(device), torch.float32)
    bf16 = W4A16Linear(w4[0], w4[1], w4[2], group, k, bias.to(device), torch.bfloat16)
    for rows in (x[:1], x.view(1, m, k)):  # one row: the GEMV; several: the matmul
        ref = (rows.double() @ w.T + bias.double()).float()
        got = layer(rows.to(device)).cpu()
        assert got.shape == ref.shape and float((got - ref).norm() / ref.norm()) < 1e-5
        got = bf16(rows.to(device, torch.bfloat16)).float().cpu()  # bf16 in, scales and out: ~2^-8 each
        assert got.shape == ref.shape and float((got - ref).norm() / ref.norm()) < 1e-2


_TINY = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
         "initializer_range": 0.2}
ARCHS = {
    "phi3": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                 original_max_position_embeddings=512, **_TINY),
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **_TINY),
}
PROMPT = [1, 323, 501, 17, 440, 321, 77, 200, 8, 91, 44, 3]


def _w4a16_checkpoint(tmp_path: Path, arch: str, scheme: str, group: int) -> Path:
    """A tiny random model quantized by llm-compressor (RTN) and saved compressed, as the quantize stage saves it."""
    pytest.importorskip("llmcompressor")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from phiops.stages.quantize import weight_scheme

    model = models.random_model(ARCHS[arch])
    (tmp_path / "cfg").mkdir(exist_ok=True)
    model.config.save_pretrained(tmp_path / "cfg")  # llm-compressor re-reads the config from the path
    model.config._name_or_path = str(tmp_path / "cfg")
    recipe = QuantizationModifier(config_groups={"group_0": weight_scheme(scheme, group)}, ignore=["lm_head"])
    oneshot(model=model, recipe=recipe)
    out = tmp_path / f"{arch}-{scheme}-{group}"
    model.save_pretrained(out, save_compressed=True)
    return out


@pytest.mark.parametrize("arch,scheme,group", [("phi3", "W4A16", 128), ("llama", "W4A16_ASYM", 64)])
def test_fused_w4a16_decoder_gives_the_dequantized_models_greedy_tokens(
        tmp_path: Path, greedy_reference: Any, kernels: Any, arch: str, scheme: str, group: int) -> None:
    from transformers import AutoModelForCausalLM

    device = kernels.DEVICE
    path = _w4a16_checkpoint(tmp_path, arch, scheme, group)
    load = {"dtype": torch.float32, "use_safetensors": True, "trust_remote_code": False}
    # compressed-tensors' own path: every layer dequantized at the first forward, the float reference
    dense = AutoModelForCausalLM.from_pretrained(path, **load).to(device).eval()
    want, want_logits = greedy_reference(dense, PROMPT, 8, device)

    model = AutoModelForCausalLM.from_pretrained(path, **load).to(device).eval()
    n_packed = sum(hasattr(m, "weight_packed") for m in model.modules())
    assert int4_linears(model, device, kernel="triton") == (n_packed, 0)
    assert sum(isinstance(m, W4A16Linear) for m in model.modules()) == n_packed == {"phi3": 8, "llama": 14}[arch]
    assert fused_unsupported(model) is None
    dec = FusedDecoder(model, 32, device)
    assert not isinstance(dec._layers[0][0], torch.Tensor)  # q/k/v through gemv_w4, not a dense weight
    # each layer's attention requests its W4A16 o_proj's packed words into the L2 (decode.L2_PREFETCH)
    assert dec.l2_prefetch == ("o",)
    assert all(len(p) == 1 and p[0] is layer[1][0] for p, layer in zip(dec._prefetch, dec._layers, strict=True))
    with torch.inference_mode():  # (test_decode.py checks a second prefill into the same cache)
        logits, got = dec.prefill(PROMPT), []
        for i in range(8):
            assert float((logits.float() - want_logits[i]).abs().max()) < 1e-3 * float(want_logits[i].abs().max())
            got.append(int(logits.argmax(-1)))
            if i < 7:
                logits = dec.step(logits.argmax(-1))
        assert got == want
    # the layers' own forward (prefill, the batched engine) still computes the same model
    with torch.inference_mode():
        ids = torch.tensor([PROMPT], device=device)
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_the_service_takes_the_triton_kernel_on_cuda_for_llama_family_unless_told_not_to(
        tmp_path: Path, monkeypatch: Any) -> None:
    from transformers import AutoModelForCausalLM

    path = _w4a16_checkpoint(tmp_path, "llama", "W4A16", 64)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    monkeypatch.delenv("PHIOPS_W4A16_KERNEL", raising=False)
    assert w4a16_kernel(model, "cuda") == "triton"  # the default: faster than tinygemm on the H200 run
    assert w4a16_kernel(model, "cpu") == "tinygemm"  # the CPU path is unchanged
    monkeypatch.setenv("PHIOPS_W4A16_KERNEL", "tinygemm")
    assert w4a16_kernel(model, "cuda") == "tinygemm"
    monkeypatch.setenv("PHIOPS_W4A16_KERNEL", "Triton")
    with pytest.raises(ValueError, match="triton or tinygemm"):  # a typo is refused, not read as tinygemm
        w4a16_kernel(model, "cuda")
    monkeypatch.delenv("PHIOPS_W4A16_KERNEL")
    model.config.model_type = "phi"  # Phi-2 stays on tinygemm and the compiled GraphDecoder
    assert w4a16_kernel(model, "cuda") == "tinygemm"


@pytest.mark.gpu
@cuda
def test_the_service_decodes_a_w4a16_checkpoint_through_the_fused_triton_path(tmp_path: Path, monkeypatch: Any,
                                                                              greedy_reference: Any) -> None:
    import threading

    from transformers import AutoModelForCausalLM

    from phiops.models import word_tokenizer
    from phiops.serve.engine import Engine, Request
    from phiops.serve.loader import cuda_fastpath, load_checkpoint
    from phiops.serve.settings import Settings

    monkeypatch.delenv("PHIOPS_W4A16_KERNEL", raising=False)  # the service's default on CUDA
    path = _w4a16_checkpoint(tmp_path, "phi3", "W4A16", 128)
    word_tokenizer(ARCHS["phi3"]["vocab_size"]).save_pretrained(path)
    # float32: the kernels and the dequantized reference agree to rounding, so greedy ids cannot flip
    model, tok, _, device, _ = load_checkpoint(str(path), "float32", "cuda", require_chat_template=False)
    assert sum(isinstance(m, W4A16Linear) for m in model.modules()) == 8
    settings = Settings(model_tag="t", served_model_name="t", max_prompt_tokens=16, max_new_tokens=8)
    dec = cuda_fastpath(model, settings, device)
    assert type(dec) is FusedDecoder
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).to("cuda").eval()
    want, _ = greedy_reference(dense, PROMPT, 8, "cuda")
    done = threading.Event()
    request = Request(prompt=PROMPT, max_new_tokens=8, emit=lambda ev: done.set() if ev.finish_reason or ev.error else None)
    eos = next(i for i in range(ARCHS["phi3"]["vocab_size"]) if i not in want)  # all 8 tokens come out
    engine = Engine(model, tok, [eos], device, max_wait_ms=0, solo=dec)
    engine.submit(request)
    assert done.wait(120)
    engine.close()
    assert request.error is None and request.tokens == want
    assert dec._graph is not None  # the lone request ran on the captured fused step


@pytest.mark.gpu
@cuda
def test_the_service_batches_a_w4a16_checkpoint_through_the_paged_pool_and_its_graphs(
        tmp_path: Path, monkeypatch: Any, greedy_reference: Any) -> None:
    """Four concurrent requests on the service's CUDA path: the paged KV pool the loader builds, the
    batched step replayed from its CUDA graphs over the packed W4A16 weights, each request's greedy
    tokens those of the dequantized model."""
    import threading

    from transformers import AutoModelForCausalLM

    from phiops.models import word_tokenizer
    from phiops.serve.engine import Engine, Request
    from phiops.serve.loader import cuda_paged, load_checkpoint
    from phiops.serve.paged import PagedDecoder
    from phiops.serve.settings import Settings

    monkeypatch.delenv("PHIOPS_W4A16_KERNEL", raising=False)
    path = _w4a16_checkpoint(tmp_path, "phi3", "W4A16", 128)
    word_tokenizer(ARCHS["phi3"]["vocab_size"]).save_pretrained(path)
    model, tok, _, device, _ = load_checkpoint(str(path), "float32", "cuda", require_chat_template=False)
    settings = Settings(model_tag="t", served_model_name="t", max_prompt_tokens=16, max_new_tokens=8, max_batch_size=4)
    paged = cuda_paged(model, settings, device)
    assert type(paged) is PagedDecoder and sorted(paged._graphs) == [1, 2, 4]  # captured at load
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).to("cuda").eval()
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:], [1, 7, 8, 9]]
    want = [greedy_reference(dense, p, 8, "cuda")[0] for p in prompts]
    eos = next(i for i in range(ARCHS["phi3"]["vocab_size"]) if all(i not in w for w in want))
    done = [threading.Event() for _ in prompts]
    requests = [Request(prompt=p, max_new_tokens=8, emit=lambda ev, d=d: d.set() if ev.finish_reason or ev.error else None)
                for p, d in zip(prompts, done)]
    engine = Engine(model, tok, [eos], device, max_wait_ms=50, max_batch_size=4, paged=paged)
    for r in requests:
        engine.submit(r)
    assert all(d.wait(120) for d in done)
    engine.close()
    assert [r.tokens for r in requests] == want
    assert engine.stats.prefill_passes == 1 and engine.stats.forward_passes == 8  # one batch, 7 graph steps
    assert paged.free_pages == paged.pages


# The tensor-core kernel (phiops.serve.mma): bf16 activations on the tensor cores, so the references take
# the same rounded inputs and scales, and the tolerance is bf16's (measured 2-3e-3 on Phi-3-mini's shapes; a
# misplaced nibble, scale or centre gives errors of order 1). Ragged against its 16-row tiles (300 rows),
# groups of 128, 64 and 32, every fused stage with the dtypes FusedDecoder gives it (float32 into o and
# down, float32 out of gate/up), and Phi-3-mini's K (3,072 and 8,192).
MMA_CASES = [  # k, group, symmetric, norm, gated, residual
    (320, 64, True, True, False, False),
    (384, 128, False, True, False, False),
    (384, 128, True, False, False, True),
    (320, 64, False, True, True, False),
    (576, 32, False, False, False, True),
    (3072, 128, True, True, True, False),
    (8192, 128, False, False, False, True),
]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("config", [(2, 1), (4, 2)])
@pytest.mark.parametrize("k,group,symmetric,norm,gated,residual", MMA_CASES)
def test_the_tensor_core_gemv_matches_the_float64_dequantized_weight(kernels: Any, config: tuple[int, int], k: int,
                                                                    group: int, symmetric: bool, norm: bool,
                                                                    gated: bool, residual: bool) -> None:
    from phiops.serve import mma

    assert config in mma.CONFIGS
    n, bf = 300, torch.bfloat16
    g = torch.Generator().manual_seed(k + group + 2 * symmetric + 4 * norm + 8 * gated + 16 * residual)
    w4, w = _packed_weight(2 * n if gated else n, k, group, symmetric, g, "cuda")
    scale = w4[1].to(bf)
    cols = torch.arange(k) // group
    w = w * (scale.double().cpu() / w4[1].double().cpu())[:, cols]  # the weight the bf16 scales stand for
    a = (torch.randn(k, generator=g) * 3).to(bf if norm else torch.float32)  # as FusedDecoder holds them
    gain = (torch.rand(k, generator=g) + 0.5).to(bf) if norm else None
    r = torch.randn(n, generator=g).to(bf) if residual else None
    want = _reference(w, a, gain, r, gated, n)
    out_dtype = torch.float32 if gated else bf  # gate/up's output feeds down_proj in float32
    out = r.clone().cuda() if residual else torch.full((n,), float("nan"), device="cuda", dtype=out_dtype)  # poisoned
    packed = kernels.interleave_w4(w4[0], k, group)
    assert mma.unsupported(packed, scale, w4[2], group, a.cuda(), out) is None
    mma.gemv_w4_mma(packed, scale, w4[2], group, a.cuda(), out, norm=None if gain is None else gain.cuda(), eps=1e-5,
                    gated=gated, residual=out if residual else None, config=config)
    err = float((out.double().cpu() - want).norm() / want.norm())
    assert err < 1e-2, err


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("arch,scheme,group", [("phi3", "W4A16", 128), ("llama", "W4A16_ASYM", 64)])
def test_the_fused_w4a16_decoder_on_the_tensor_core_kernel_matches_it_on_triton(
        tmp_path: Path, arch: str, scheme: str, group: int) -> None:
    """bf16, the serving dtype on CUDA: the tuner offers the tensor-core kernel for every matrix, and a step
    run on it (captured in the decoder's graph) gives the Triton step's logits to bf16's rounding; the
    tuned decoder, free to pick either, too."""
    from transformers import AutoModelForCausalLM

    from phiops.serve import mma

    path = _w4a16_checkpoint(tmp_path, arch, scheme, group)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, use_safetensors=True).to("cuda").eval()
    assert int4_linears(model, "cuda", kernel="triton")[0] > 0
    roles = ("qkv", "o", "gate_up", "down")
    base = FusedDecoder(model, 32, "cuda", mma=False)
    forced = FusedDecoder(model, 32, "cuda", tune=False)
    for role in roles:
        assert [c for c in forced.candidates(role) if c[0] == "mma"] == [("mma", *c) for c in mma.CONFIGS]
        assert all(c[0] != "mma" for c in base.candidates(role))
    forced.gemv_configs = {role: ("mma", *mma.CONFIGS[i % 2]) for i, role in enumerate(roles)}
    tuned = FusedDecoder(model, 32, "cuda")
    with torch.inference_mode():
        want = base.prefill(PROMPT)
        got = [forced.prefill(PROMPT), tuned.prefill(PROMPT)]
        for _ in range(8):
            tok = want.argmax(-1)  # all three fed the same tokens
            want = base.step(tok)
            got = [forced.step(tok), tuned.step(tok)]
            for logits in got:
                assert float((logits.float() - want.float()).abs().max()) <= 0.05 * float(want.float().abs().max())
    assert forced._graph is not None and tuned._graph is not None  # the steps ran captured
    assert set(tuned.gemv_configs) >= set(roles)
