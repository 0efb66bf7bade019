"""The batched decode step's cache and attention (phiops.serve.batched) on tiny random models:
the same logits as transformers' DynamicCache + SDPA, with no copy of the cache per step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from phiops import models
from phiops.serve import batched

pytestmark = pytest.mark.integration

GQA = {"model_type": "llama", "vocab_size": 512, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
MHA = {**GQA, "num_key_value_heads": 4}


def _decode(model: Any, cache: Any, steps: int = 80) -> tuple[Any, Any, list[int]]:
    """Left-padded prefill of 3 rows, a row leaving half-way, then greedy steps; logits, tokens
    and, per step, the address of layer 0's key storage."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0  # a shorter prompt, left-padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, tokens, storage = [], [], []
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        last, pos = out.logits[:, -1].argmax(-1), mask.sum(-1)
        for step in range(steps):
            if step == steps // 2:  # a row finishes: the engine's _keep
                keep = torch.tensor([0, 2])
                cache.batch_select_indices(keep)
                mask, pos, last = mask[keep], pos[keep], last[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            out = model(input_ids=last[:, None], attention_mask=mask, position_ids=pos[:, None],
                        past_key_values=cache, use_cache=True)
            pos, last = pos + 1, out.logits[:, -1].argmax(-1)
            logits.append(out.logits[:, -1])
            tokens.append(last)
            storage.append(cache.layers[0].keys.untyped_storage().data_ptr())
    return logits, tokens, storage


@pytest.mark.parametrize("arch", [GQA, MHA], ids=["gqa", "mha"])
def test_grouped_decode_with_slack_cache_gives_transformers_logits(arch: dict[str, Any]) -> None:
    model = models.random_model(arch, dtype="float32", device="cpu", seed=0).eval()
    ref_logits, ref_tokens, _ = _decode(model, DynamicCache())
    switched = batched.use_grouped_decode(model)
    assert switched and model.config._attn_implementation == batched.NAME
    logits, tokens, storage = _decode(model, batched.new_cache())
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
    # Appends in place: the buffer is reallocated only when its room runs out (and once after
    # the row left, which the engine's batch_select_indices copies anyway), not at every step.
    assert len(set(storage)) <= 4, len(set(storage))


def test_a_layer_grows_by_half_with_room_and_reads_back_what_was_written() -> None:
    layer = batched.SlackLayer()
    written = [torch.randn(2, 3, n, 8) for n in (5, 1, 1, 70, 1)]
    for chunk in written:
        keys, values = layer.update(chunk, chunk * 2)
    expected = torch.cat(written, dim=-2)
    assert torch.equal(keys, expected) and torch.equal(values, expected * 2)
    assert layer.get_seq_length() == 78
    assert layer._k.shape[-2] == 77 + batched.MIN_SLACK  # grown once, at 77 positions: room left
    layer.keys, layer.values = keys[:, :, 10:], values[:, :, 10:]  # the engine's trim of dead columns
    assert layer.get_seq_length() == 68
    keys, _ = layer.update(torch.ones(2, 3, 1, 8), torch.ones(2, 3, 1, 8))
    assert torch.equal(keys[:, :, :68], expected[:, :, 10:]) and keys.shape[-2] == 69


def test_a_model_not_on_sdpa_is_left_alone() -> None:
    model = models.random_model(GQA, dtype="float32", device="cpu", seed=0).eval()
    model.set_attn_implementation("eager")
    assert batched.use_grouped_decode(model) is False
    assert model.config._attn_implementation == "eager"
