"""phiops' varlen attention: packed rows must give exactly what separate rows give.

The kernel is CUDA-only: the GPU test is skipped without one (CI has none), with that reason.
The fallback path (no cu_seq_lens: padded batches, generation) runs everywhere.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, Phi3Config

from phiops import attention

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
            pad_token_id=0, bos_token_id=1, eos_token_id=1)


def _model(kv_heads: int, device: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(Phi3Config(num_key_value_heads=kv_heads, **TINY)).to(device, dtype)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fallback_without_cu_seq_lens_is_sdpa(kv_heads):
    attention.register()
    model = _model(kv_heads, "cpu")
    ids = torch.randint(2, 1000, (2, 12))
    want = model(input_ids=ids).logits
    model.set_attn_implementation(attention.NAME)
    got = model(input_ids=ids).logits
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not attention.available(), reason="needs CUDA and torch.nn.attention.varlen (GPU only; CI has none)")
@pytest.mark.parametrize("kv_heads", [4, 2])  # full attention (Phi-3) and grouped-query (Phi-4, Phi-4-mini)
def test_packed_rows_match_separate_rows_on_cuda(kv_heads):
    attention.register()
    model = _model(kv_heads, "cuda", torch.bfloat16)
    lengths = [5, 17, 9]
    rows = [torch.randint(2, 1000, (n,), device="cuda") for n in lengths]
    want = [model(input_ids=r[None]).logits[0].float() for r in rows]
    model.set_attn_implementation(attention.NAME)
    cu = torch.tensor([0, 5, 22, 31], device="cuda", dtype=torch.int32)
    pos = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    got = model(input_ids=torch.cat(rows)[None], position_ids=pos, use_cache=False, cu_seq_lens_q=cu,
                cu_seq_lens_k=cu, max_length_q=17, max_length_k=17).logits[0].float()
    for w, g in zip(want, got.split(lengths)):
        assert (g - w).abs().max() < 0.05  # bf16 rounding; a row attending across its border moves far more
