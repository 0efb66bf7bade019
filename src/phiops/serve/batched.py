"""The batched decode step's KV cache and attention, without per-step copies of the cache.

The engine (``phiops.serve.engine``) decodes its running rows through the model's own forward
over a transformers ``DynamicCache``. Two parts of that forward copied the whole cache at every
step, for every layer:

- ``DynamicLayer.update`` appends the step's key and value with ``torch.cat``: a new tensor the
  size of the cache, per layer and per token. :class:`SlackLayer` keeps spare room at the end of
  the sequence dimension and writes the new position in place (room grows by half when it runs
  out, so the copies are amortized), handing attention views of the filled part.
- transformers' SDPA path expands grouped-query keys and values to every query head
  (``repeat_kv``) whenever it passes a mask, which batched decode always does: a copy of the
  cache times the group size. :func:`grouped_decode_attention` instead folds a decode step's
  query heads into the query-length dimension, ``[B, Hq, 1, D] -> [B, Hkv, Hq/Hkv, D]``, so each
  key/value head is read once by its group; prefill and everything else go to transformers' SDPA
  function unchanged.

Both are exact rearrangements of the same arithmetic. On the 2-core CPU, for the embedded model
(SmolLM2-135M: 3 key/value heads, 9 query heads) at 13 rows and 300 cached tokens, one layer's
attention with its cache append went from ~2.0 ms to ~0.35 ms (``bench/serve_cpu_decode.py``
measures the whole step, old and new in one run).
"""

from __future__ import annotations

from typing import Any

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

NAME = "phiops_grouped_decode"
MIN_SLACK = 64  # positions of spare room at least, when a layer's buffer is (re)allocated


def _append(buf: Any, n: int, new: Any) -> tuple[Any, int]:
    """Write `new` ([B, H, m, D]) after the first `n` positions of `buf`, growing it if needed."""
    m = new.shape[-2]
    if buf is None or n + m > buf.shape[-2]:  # (a new batch shape arrives by assignment: _adopt)
        need = n + m
        grown = new.new_empty((*new.shape[:2], need + max(MIN_SLACK, need // 2), new.shape[-1]))
        if n:
            grown[:, :, :n].copy_(buf[:, :, :n])
        buf = grown
    buf[:, :, n:n + m].copy_(new)
    return buf, n + m


def _adopt(t: Any) -> tuple[Any, int]:
    """A tensor assigned to a layer's keys or values as its buffer, filled to its length (None,
    and DynamicLayer's 1-D empty placeholder, mean no buffer yet)."""
    return (None, 0) if t is None or t.dim() < 4 else (t, t.shape[-2])


class SlackLayer(DynamicLayer):
    """A ``DynamicLayer`` whose update appends in place into spare room.

    ``keys`` and ``values`` read as views of the filled positions; assigning either (the
    engine's merge and trim, ``batch_select_indices``) adopts the tensor as the new buffer,
    without room, so the next update reallocates once with room.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._k = self._v = None
        self._nk = self._nv = 0
        super().__init__(**kwargs)

    @property  # type: ignore[override]
    def keys(self) -> Any:
        return None if self._k is None else self._k[:, :, :self._nk]

    @keys.setter
    def keys(self, t: Any) -> None:
        self._k, self._nk = _adopt(t)

    @property  # type: ignore[override]
    def values(self) -> Any:
        return None if self._v is None else self._v[:, :, :self._nv]

    @values.setter
    def values(self, t: Any) -> None:
        self._v, self._nv = _adopt(t)

    def get_seq_length(self) -> int:
        return self._nk if self.is_initialized else 0

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._k, self._nk = _append(self._k, self._nk, key_states)
        self._v, self._nv = _append(self._v, self._nv, value_states)
        return self.keys, self.values


def new_cache() -> Any:
    """An empty ``DynamicCache`` whose layers are :class:`SlackLayer`."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = SlackLayer
    return cache


def grouped_decode_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                             scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function contract (q/k/v ``[B, H, T, D]`` in, ``[B, T, Hq, D]`` out).

    A decode step (one query position) of a grouped-query layer, in eval mode, with no mask or a
    mask shared by the heads, attends per key/value head with its group's queries stacked; any
    other call goes to transformers' SDPA function as it would without this module.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    shared_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    if (q_len != 1 or hq == hkv or module.training or dropout or kwargs.get("position_bias") is not None
            or not shared_mask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, hkv, hq // hkv, d), key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, hq, 1, d).transpose(1, 2), None


def use_grouped_decode(model: Any) -> bool:
    """Switch a model that uses transformers' SDPA attention to :func:`grouped_decode_attention`.

    Returns:
        True if switched; False (nothing changed) for any other attention implementation.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, grouped_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same masks SDPA gets
    model.set_attn_implementation(NAME)
    return True
