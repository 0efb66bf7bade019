"""Padding-free attention through PyTorch's own variable-length flash kernel.

Padding-free batches concatenate a micro-batch's rows into one sequence; attention must stay
within each row. The flash-attention package does that with its varlen kernel, but it is a
CUDA build that pip cannot install offline. PyTorch (>= 2.9) ships the same kind of kernel as
``torch.nn.attention.varlen.varlen_attn``; this module registers it with transformers as the
attention implementation ``"phiops_varlen"``.

With TRL's padding-free collator every batch carries ``cu_seq_lens_q/k`` and
``max_length_q/k``, which transformers passes down to the attention function: the rows are
attended separately, with no mask tensor at all. Anything else (a padded batch, generation
with a KV cache) goes to transformers' SDPA path unchanged, so a model left on this
implementation still computes the right thing everywhere.
"""

from __future__ import annotations

from typing import Any

NAME = "phiops_varlen"


def available() -> bool:
    """True where the varlen kernel can run: CUDA and a PyTorch that has it."""
    try:
        import torch
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function contract: q/k/v are (batch, heads, seq, head_dim);
    the output is (batch, seq, heads, head_dim)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    if dropout and module.training:
        raise ValueError(f"{NAME}: attention dropout is not supported (the config sets {dropout})")
    from torch.nn.attention.varlen import varlen_attn

    import torch

    # The kernel takes fp16/bf16 only; fp32 reaches here when norms were upcast to fp32
    # (peft's prepare_model_for_kbit_training): compute in bf16, return what came in.
    dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (seq, heads, head_dim)
    if k.shape[1] != q.shape[1]:  # grouped-query attention (Phi-4, Phi-4-mini): one kv head per group
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # Causal; a sliding window of W keys (the token itself included) is W-1 to the left.
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    out = varlen_attn(
        q, k, v, cu_q.to(q.device, non_blocking=True), cu_k.to(q.device, non_blocking=True),
        int(kwargs.get("max_length_q") or query.shape[2]), int(kwargs.get("max_length_k") or key.shape[2]),
        scale=scaling, window_size=window,
    )
    return out.unsqueeze(0).to(query.dtype), None


def register() -> str:
    """Make ``attn_implementation="phiops_varlen"`` known to transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    # The mask is only used by the SDPA fallback; padding-free batches ignore it.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
