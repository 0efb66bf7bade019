"""The LM head and loss of a training step on CPU: only positions that carry a loss are projected.

TRL's SFTTrainer patches the model with a fused LM head (`trl.trainer.utils.add_fused_lm_head`):
per-token log-probabilities, entropy and top-1 accuracy in vocabulary tiles, without the full
logits. On CUDA it projects only the positions whose label is not -100. Elsewhere it projects
*every* position (a fixed tile shape keeps XLA-style backends from recompiling), and on CPU that is
the largest cost of the step: the LM head is the widest matmul of a small model (SmolLM2-135M:
49,152 x 576), it runs three times a step (forward, the backward's recompute, the input gradient),
and on the demo's ticket data 79 % of the positions are prompt tokens whose label is -100.

:func:`project_loss_positions_only` re-patches the forward so that on CPU it does what the CUDA
path does: gather the loss positions, then run TRL's own chunked kernel on them. The loss, its
gradient and the logged metrics are the same numbers (the ignored positions were zero anyway);
only the work on ignored positions goes.
"""

from __future__ import annotations

import functools
import types
from typing import Any

# Config fields that make TRL's head scale, soft-cap or add a router loss; with any of them set
# the model keeps TRL's own forward (none of the Phi or Llama families sets them).
_SPECIAL = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def supported(model: Any) -> bool:
    """Whether the loss-positions-only head reproduces TRL's for this model (plain logits, no MoE loss)."""
    text = model.config.get_text_config()
    return not any(getattr(text, k, None) is not None for k in _SPECIAL) and not getattr(
        text, "output_router_logits", False)


def project_loss_positions_only(model: Any) -> bool:
    """Wrap the fused-LM-head forward TRL installed on `model` so that only loss positions are projected.

    Call it after `SFTTrainer(...)` was built (TRL patches the model in its constructor), on the
    model TRL patched (the PEFT model's base). Calls without ``fused_lm_head=True`` (generation,
    merge checks) and models :func:`supported` refuses go to TRL's forward unchanged.

    Args:
        model: the causal LM whose ``forward`` TRL replaced.

    Returns:
        True if the forward was wrapped, False if the model keeps TRL's.
    """
    if not supported(model):
        return False
    from trl.trainer.utils import FusedCausalLMOutput, _ChunkedLogProbFunction, _CHUNKED_LOGPROB_CHUNK_SIZE

    trl_forward = model.forward  # TRL's bound fused forward
    outputs = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks for (loss, entropy, accuracy metrics)

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def _forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        mask = labels.to(lm_head.weight.device) != -100
        per_token = _ChunkedLogProbFunction.apply(
            hidden.to(lm_head.weight.device)[mask], lm_head.weight, lm_head.bias, labels.to(mask.device)[mask],
            1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
        # Back to (batch, seq) with zeros where the label is -100, as TRL returns them;
        # masked_scatter keeps a batch without loss tokens connected to the graph (a zero loss).
        log_probs, entropy, _, _, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(_forward, model)
    return True
