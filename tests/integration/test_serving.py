"""``OpenAIServing`` over a tiny random Llama, without BentoML: admission, disconnects, gauges.

- Admission: with one batch row taken by a long request, a second request is refused with a
  503 + ``Retry-After`` once the queue-wait budget runs out (not after the request timeout), and
  once the engine has measured how long a row lasts, at once with a 429 + ``Retry-After``.
- A non-streaming request whose client goes away stops computing.
- ``phiops_requests_running`` counts a stream until its last byte; TTFT and inter-token latency
  are observed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from phiops import models
from phiops.serve.protocol import APIError, ChatCompletionRequest
from phiops.serve.settings import Settings

pytestmark = pytest.mark.integration

TINY_ARCH = {"model_type": "llama", "vocab_size": 49152, "num_hidden_layers": 2, "hidden_size": 64,
             "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 8192}
LONG = 3000  # tokens: several seconds on a 2-core CPU
BUDGET_S = 0.5


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phiops.serve.loader import Loaded
    from phiops.serve.observability import Metrics
    from phiops.serve.openai_serving import OpenAIServing

    path = Path(models.tiny_random(TINY_ARCH, tmp_path_factory.mktemp("tiny") / "llama",
                                   tokenizer_from=models.ensure_builtin()))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # EOS = an id that never comes: every request runs to its max_tokens (predictable durations)
    loaded = Loaded(model=model, tokenizer=tok, eos_ids=[49151], device="cpu", dtype="float32", solo=None,
                    model_tag="tiny:t1", created=0, lineage={})
    settings = Settings(model_tag="tiny:t1", served_model_name="tiny", max_batch_size=1, max_new_tokens=LONG,
                        queue_wait_budget_s=BUDGET_S, request_timeout_s=120)
    s = OpenAIServing(loaded, settings, Metrics())
    yield s
    s.close()


def _body(n: int, **kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "Count."}], max_tokens=n,
                                 temperature=0, **kw)


def _idle(serving: Any) -> None:
    deadline = time.monotonic() + 30
    while serving.engine.rows or serving.engine._queue.qsize():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_queue_wait_budget_refuses_promptly(serving: Any) -> None:
    serving.engine.stats.row_seconds = 0.0  # nothing measured yet: only the deadline can refuse

    async def scenario(measured_row_s: float | None) -> tuple[Any, float, Any]:
        long = asyncio.ensure_future(serving.chat(_body(LONG)))
        while not serving.engine.rows:  # the one row is taken
            await asyncio.sleep(0.01)
        if measured_row_s is not None:
            serving.engine.stats.row_seconds = measured_row_s
        t0 = time.perf_counter()
        refused: Any = None
        try:
            await serving.chat(_body(4))
        except APIError as exc:
            refused = exc
        waited = time.perf_counter() - t0
        for r in serving.engine.rows:
            r.cancel()
        return refused, waited, await long

    # Nothing measured: the newcomer waits in the queue for the budget, then is refused (503),
    # while the long request goes on (its own 504 would come only at request_timeout_s, 120 s).
    refused, waited, long = asyncio.run(scenario(None))
    assert refused is not None and refused.status == 503 and refused.code == "queue_timeout"
    assert refused.headers["Retry-After"].isdigit()
    assert BUDGET_S <= waited < BUDGET_S + 1.0, waited
    assert long["choices"][0]["finish_reason"] == "cancelled"  # it was still running
    _idle(serving)

    # Once rows are measured to last 5 s, a newcomer behind a taken row is refused at once (429).
    refused, waited, _ = asyncio.run(scenario(5.0))
    assert refused is not None and refused.status == 429 and refused.code == "queue_full"
    assert int(refused.headers["Retry-After"]) >= 4
    assert waited < 0.2, waited
    _idle(serving)
    serving.engine.stats.row_seconds = 0.0


class GoneClient:
    """Starlette's Request as far as the serving layer uses it: disconnected after `after` s."""

    def __init__(self, after: float) -> None:
        self.t0, self.after = time.monotonic(), after

    async def is_disconnected(self) -> bool:
        return time.monotonic() - self.t0 > self.after


def test_non_streaming_disconnect_cancels_the_row(serving: Any) -> None:
    serving.engine.stats.row_seconds = 0.0
    passes = serving.engine.stats.forward_passes
    t0 = time.perf_counter()
    res = asyncio.run(serving.chat(_body(LONG), GoneClient(after=0.3)))
    took = time.perf_counter() - t0
    assert res["choices"][0]["finish_reason"] == "cancelled"  # nobody reads it: the client is gone
    ran = serving.engine.stats.forward_passes - passes
    assert ran < LONG / 2 and took < 3, (ran, took)
    _idle(serving)
    assert serving.engine.stats.active == 0


def test_running_gauge_counts_a_stream_to_its_end_and_latency_is_observed(serving: Any) -> None:
    running = serving.metrics.running
    ttft0 = serving.metrics.ttft._sum.get()
    itl0 = serving.metrics.itl._sum.get()

    async def scenario() -> list[float]:
        seen = [running._value.get()]
        res = await serving.chat(_body(40, stream=True))
        it = res.body_iterator
        seen.append(running._value.get())
        chunks = [await it.__anext__() for _ in range(3)]  # role, first tokens: still running
        seen.append(running._value.get())
        async for c in it:
            chunks.append(c)
        assert chunks[-1] == "data: [DONE]\n\n"
        seen.append(running._value.get())
        return seen

    before, started, streaming, after = asyncio.run(scenario())
    assert started == streaming == before + 1  # not released at the first token
    assert after == before
    assert serving.metrics.ttft._sum.get() > ttft0 and serving.metrics.itl._sum.get() > itl0
