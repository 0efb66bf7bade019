"""Per-row sampling: validated and clamped once, numerically safe for every accepted value.

Like vLLM's ``SamplingParams``: the protocol layer refuses what is out of range, and
:class:`SamplingParams` clamps what is in range but numerically unsafe, so the sampler never sees
an impossible value. What the sampler then guarantees for one row, whatever the logits hold:

- NaN logits are never picked; ``+inf`` logits share the mass among themselves; a row with no
  finite logit (or where the response format allows no token) raises :class:`RowError`, which
  fails that row alone;
- the scores are shifted so that their maximum is 0 before dividing by the temperature, so a
  tiny temperature cannot overflow a softmax (below ``GREEDY_BELOW`` it is greedy decoding);
- the nucleus always keeps its most likely token, whatever ``top_p`` rounds to in float32
  (``top_p: 1e-300`` rounded to 0 and dropped every token: NaN probabilities, and before this
  module, the whole batch's step failed);
- a seed is reduced to the 64 bits torch's generator takes.

Presence and frequency penalties follow OpenAI's definition: ``logit[j] -= c[j] * frequency
+ (c[j] > 0) * presence`` with ``c[j]`` the times token ``j`` was generated so far in this row
(the prompt does not count). Log-probabilities are those of the model's own distribution
(``log_softmax`` of the raw logits, before penalties, temperature and nucleus): what
lm-evaluation-harness and other scorers expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing by them only risks overflow
MAX_TOP_LOGPROBS = 20  # OpenAI's limit (chat's top_logprobs); completions' logprobs stop at 5
SEED_BITS = 64  # torch.Generator.manual_seed takes [-2**63, 2**64): reduce modulo 2**64


class RowError(Exception):
    """Sampling this row cannot go on (its logits or its grammar leave no token); fails it alone."""


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its tokens; ``clamped()`` makes any accepted value safe.

    Args:
        temperature: 0 (or below ``GREEDY_BELOW``) is greedy.
        top_p: nucleus mass in (0, 1]; at least one token is always kept.
        seed: the row's generator seed (any int; reduced to 64 bits).
        presence_penalty / frequency_penalty: OpenAI's, in [-2, 2].
        logprobs: None for none; k >= 0: each sampled token's log-probability and the top k.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None

    def clamped(self) -> SamplingParams:
        def finite(x: float, lo: float, hi: float, default: float) -> float:
            return default if not math.isfinite(x) else min(max(x, lo), hi)

        temperature = finite(self.temperature, 0.0, 100.0, 0.0)
        return SamplingParams(
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=finite(self.top_p, 0.0, 1.0, 1.0),
            seed=None if self.seed is None else self.seed % (1 << SEED_BITS),
            presence_penalty=finite(self.presence_penalty, -2.0, 2.0, 0.0),
            frequency_penalty=finite(self.frequency_penalty, -2.0, 2.0, 0.0),
            logprobs=None if self.logprobs is None else min(max(int(self.logprobs), 0), MAX_TOP_LOGPROBS),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class TokenLogprob:
    """One position's log-probability, and the top alternatives (id, logprob), most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def sanitize(logits: Any) -> Any:
    """One row's float32 logits with NaN never picked and +inf made safe; max is 0 afterwards.

    Raises:
        RowError: no finite logit is left.
    """
    import torch

    x = logits.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    pos = x == float("inf")
    if bool(pos.any()):  # overflowed logits: the mass is shared among them, nothing else
        x = torch.where(pos, 0.0, float("-inf"))
    top = x.max()
    if not bool(torch.isfinite(top)):
        raise RowError("the model produced no finite logits for this request")
    return x - top


def logprobs_of(logits: Any, token: int, k: int) -> TokenLogprob:
    """The log-probability of ``token`` under the raw distribution, and the top ``k``."""
    lp = sanitize(logits).log_softmax(-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = lp.topk(k)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token=token, logprob=float(lp[token]), top=top)


def pick(logits: Any, params: SamplingParams, generator: Any, generated: list[int],
         allowed: Any = None) -> int:
    """One token for one row (module doc for the guarantees).

    Args:
        logits: the row's logits, ``[vocab]``.
        params: clamped sampling parameters.
        generator: the row's ``torch.Generator`` (unused when greedy).
        generated: the tokens this row generated so far (for the penalties).
        allowed: a bool ``[vocab]`` mask from the response-format grammar, or None.

    Raises:
        RowError: no token can be picked.
    """
    import torch

    x = sanitize(logits)
    if params.penalized and generated:
        counts = torch.bincount(torch.tensor(generated, device=x.device), minlength=x.shape[-1])[: x.shape[-1]]
        x = x - counts.float() * params.frequency_penalty - (counts > 0).float() * params.presence_penalty
    if allowed is not None:
        x = x.masked_fill(~allowed[: x.shape[-1]], float("-inf"))
        if not bool(torch.isfinite(x.max())):
            raise RowError("no token can continue the requested response format")
    if params.greedy:
        return int(x.argmax())
    x = (x - x.max()) / params.temperature  # max 0: exp cannot overflow, at least one term is 1
    if params.top_p < 1.0:
        sorted_x, order = x.sort(descending=True)
        probs = sorted_x.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[0] = False  # the most likely token always stays, whatever top_p rounds to
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return int(order[torch.multinomial(sorted_x.softmax(-1), 1, generator=generator)[0]])
    return int(torch.multinomial(x.softmax(-1), 1, generator=generator)[0])
