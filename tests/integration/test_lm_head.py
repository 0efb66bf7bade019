"""The CPU LM head that projects only loss positions gives TRL's numbers, on fewer rows."""

from __future__ import annotations

import pytest
import torch

from phiops import lm_head, models

pytestmark = pytest.mark.integration


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 24), generator=g)
    labels = ids.clone()
    labels[:, :15] = -100  # a prompt
    labels[2, 20:] = -100  # padding at the end of one row
    mask = torch.ones_like(ids)
    mask[2, 20:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _run(model, batch) -> tuple[object, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _head_rows(prof, vocab: int) -> set[int]:
    """Row counts of the LM head's forward matmuls: the `out=` mm calls whose widths tile the vocabulary."""
    calls = [e.input_shapes for e in prof.key_averages(group_by_input_shape=True)
             if e.key == "aten::mm" and len(e.input_shapes) == 3 and e.input_shapes[2]]
    assert sum({s[1][1] for s in calls}) == vocab
    return {s[0][0] for s in calls}


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_loss_positions_only_matches_trl_and_projects_fewer_rows(arch, tiny_models):
    from trl.trainer.utils import add_fused_lm_head

    model = models.load_causal_lm(tiny_models[arch], device="cpu")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer installs
    batch = _batch(model.config.vocab_size)
    with torch.profiler.profile(record_shapes=True) as ref_prof:
        ref, ref_grads = _run(model, batch)

    assert lm_head.project_loss_positions_only(model)
    with torch.profiler.profile(record_shapes=True) as prof:
        out, grads = _run(model, batch)

    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for field in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.is_top1, ref.is_top1) and torch.equal(out.label_mask, ref.label_mask)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # The head's matmuls (the chunked kernel's `mm(..., out=tile)` over vocabulary slices) ran on
    # the loss positions only; TRL's ran on every shifted position (3 rows x 23).
    n_loss = int((batch["labels"][:, 1:] != -100).sum())
    assert _head_rows(prof, model.config.vocab_size) == {n_loss}
    assert _head_rows(ref_prof, model.config.vocab_size) == {3 * 23}

    # Generation and plain forwards still get the model's own logits.
    logits = model(input_ids=batch["input_ids"]).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
