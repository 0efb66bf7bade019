"""OpenAI's completion routes over the engine: a validated request in, a response out.

``OpenAIServing`` holds the loaded model, its batching engine and the limits. It checks every
limit before any model compute (a prompt over ``max_prompt_tokens`` or a ``max_tokens`` over
``max_new_tokens`` is a 400; an unknown model a 404), submits the request to the engine (``n``
choices = ``n`` rows), and turns the engine's events into a ``chat.completion`` /
``text_completion`` object or a stream of server-sent events ending ``data: [DONE]``.

Admission: a request that cannot get a batch row within ``queue_wait_budget_s`` is refused,
at once (429) when the engine's estimate of the wait is already past the budget, else when the
budget runs out in the queue (503); both with ``Retry-After``. A request not answered within
``request_timeout_s`` is a 504 and its generation is cancelled. A client that goes away cancels
its rows, streaming or not. A row that fails is a 500 in OpenAI's shape; the others go on.

It knows nothing of BentoML: ``services/service.py`` maps routes onto it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from phiops.serve.loader import Loaded
from phiops.serve.observability import Metrics
from phiops.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationParams,
    now,
    sse,
)
from phiops.serve.sampling import SamplingParams, TokenLogprob
from phiops.serve.settings import Settings

log = logging.getLogger("bentoml.phiops")

WARMUP_TOKENS = 2
# No tokenizer packs more than this many characters per token on average over a whole prompt;
# longer text is refused before tokenizing it, which would otherwise cost time per byte.
MAX_CHARS_PER_TOKEN = 64


class OpenAIServing:
    """The completion routes of one loaded model (module doc)."""

    def __init__(self, loaded: Loaded, settings: Settings, metrics: Metrics) -> None:
        """Start the engine over `loaded` and run one warm-up generation through it.

        Raises:
            RuntimeError: the warm-up generation failed or did not end within 600 s.
        """
        from phiops.serve.engine import Engine

        self.loaded, self.settings, self.metrics = loaded, settings, metrics
        self.tokenizer = loaded.tokenizer

        def on_step(phase: str, rows: int, new_tokens: int) -> None:
            metrics.forward.labels(phase).inc()
            metrics.batch.labels(phase).observe(rows)
            metrics.generated.inc(new_tokens)

        self.engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_ids, loaded.device,
                             max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_batch_wait_ms,
                             on_step=on_step, solo=loaded.solo, paged=loaded.paged,
                             prefill_chunk=settings.prefill_chunk_tokens)
        metrics.watch_engine(self.engine.stats)
        self.vocab_size = int(loaded.model.config.get_text_config().vocab_size)
        self._grammars: Any = None  # built on the first response_format request (compiles the vocabulary)
        self._token_text: dict[int, str] = {}
        t0 = time.perf_counter()
        self._warmup(self._encode_chat([ChatMessage(role="user", content="Hello")]))
        log.info("warm-up generation done in %.2fs; ready", time.perf_counter() - t0)

    def _warmup(self, prompt: list[int]) -> None:
        from phiops.serve.engine import Request

        done, errors = threading.Event(), []

        def emit(ev: Any) -> None:
            if ev.error:
                errors.append(ev.error)
            if ev.finish_reason or ev.error:
                done.set()

        self.engine.submit(Request(prompt=prompt, max_new_tokens=WARMUP_TOKENS, emit=emit))
        if not done.wait(600) or errors:
            raise RuntimeError(f"{self.loaded.model_tag}: warm-up generation failed: {errors or 'timed out'}")
        self.metrics.prompt.inc(len(prompt))

    def alive(self) -> bool:
        return self.engine.alive()

    def close(self) -> None:
        self.engine.close()

    # ---- checks (all before any model compute) -------------------------------------------------

    def _refuse(self, reason: str, exc: APIError) -> APIError:
        self.metrics.rejected.labels(reason).inc()
        return exc

    def _precheck_chars(self, n_chars: int, param: str) -> None:
        if n_chars > self.settings.max_prompt_tokens * MAX_CHARS_PER_TOKEN:
            raise self._refuse("prompt_too_long", APIError(
                400, f"the prompt is far longer than {self.settings.max_prompt_tokens} tokens",
                param=param, code="context_length_exceeded"))

    def _check_prompt_len(self, ids: list[int], param: str) -> list[int]:
        if len(ids) > self.settings.max_prompt_tokens:
            raise self._refuse("prompt_too_long", APIError(
                400, f"the prompt is {len(ids)} tokens; this service accepts at most {self.settings.max_prompt_tokens}",
                param=param, code="context_length_exceeded"))
        return list(ids)

    def _encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        import jinja2

        # developer is newer clients' name for system; chat templates know system
        convo = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        self._precheck_chars(sum(len(m["content"]) for m in convo), "messages")
        try:
            text = self.tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as exc:
            # Templates raise for conversations they cannot render (e.g. roles must alternate);
            # their messages are written by the template author, not copied from the request.
            raise APIError(400, f"messages rejected by the model's chat template: {exc}", param="messages") from None
        # The template already wrote any BOS/special tokens it wants.
        return self._check_prompt_len(self.tokenizer(text, add_special_tokens=False)["input_ids"], "messages")

    def _encode_text(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):  # token ids, used as given (lm-evaluation-harness scores them)
            if any(t >= self.vocab_size for t in prompt):
                raise APIError(400, f"prompt token ids must be below the vocabulary size {self.vocab_size}",
                               param="prompt", code="invalid_value")
            return self._check_prompt_len(prompt, "prompt")
        self._precheck_chars(len(prompt), "prompt")
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise APIError(400, "the prompt is empty after tokenizing", param="prompt")
        return self._check_prompt_len(ids, "prompt")

    def _cap(self, req: GenerationParams) -> int:
        asked, name = req.asked_tokens()
        if asked is None:
            return self.settings.max_new_tokens
        if asked > self.settings.max_new_tokens:
            # Refused, not clamped: a client asking for more than it can get should know.
            raise self._refuse("max_tokens_over_cap", APIError(
                400, f"{name} is {asked}; this service generates at most {self.settings.max_new_tokens} "
                "tokens per request", param=name, code="invalid_value"))
        return asked

    def _check_n(self, req: GenerationParams) -> int:
        n = req.choices()
        if n > self.settings.max_n:
            raise self._refuse("n_over_cap", APIError(
                400, f"n is {n}; this service generates at most {self.settings.max_n} choices per request",
                param="n", code="invalid_value"))
        return n

    def _check_model(self, name: str) -> None:
        if name not in (self.settings.served_model_name, self.loaded.model_tag):
            raise self._refuse("unknown_model", APIError(
                404, "the requested model is not served here; see GET /v1/models",
                param="model", code="model_not_found"))

    # ---- generation ----------------------------------------------------------------------------

    def _admit(self, n: int) -> float:
        """The queue deadline for a request of ``n`` rows; refused now when it cannot be met."""
        budget = self.settings.queue_wait_budget_s
        wait = self.engine.queue_wait_estimate() + (n - 1) * self.engine.stats.row_seconds / self.settings.max_batch_size
        if wait > budget:
            raise self._refuse("queue_full", APIError(
                429, f"the queue cannot start this request within this service's {budget:g} s queue-wait budget "
                f"(estimated {wait:.1f} s); retry later", code="queue_full", kind="rate_limit_error",
                headers={"Retry-After": str(max(1, math.ceil(wait - budget)))}))
        return time.perf_counter() + budget

    def _grammar_for(self, body: GenerationParams) -> Any:
        fmt = getattr(body, "response_format", None)
        if fmt is None or fmt.type == "text":
            return None
        if self._grammars is None:
            from phiops.serve.grammar import Grammars

            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.loaded.eos_ids)
        return self._grammars.compile(fmt)

    def _submit(self, prompt: list[int], body: GenerationParams, max_new: int, n: int,
                compiled: Any = None) -> tuple[list[Any], asyncio.Queue]:
        """``n`` engine rows for one request; their events arrive as ``(choice index, event)``."""
        from phiops.serve.engine import Request

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        deadline = self._admit(n)
        echo = bool(getattr(body, "echo", False)) and body.top_logprobs_asked() is not None
        rows = []
        for i in range(n):
            # choice i of a seeded request: seed + i, so the choices differ and each is reproducible
            seed = None if body.seed is None else body.seed + i
            sampling = SamplingParams(temperature=body.temp, top_p=body.nucleus, seed=seed,
                                      presence_penalty=body.presence_penalty or 0.0,
                                      frequency_penalty=body.frequency_penalty or 0.0,
                                      logprobs=body.top_logprobs_asked())
            rows.append(Request(
                prompt=prompt, max_new_tokens=max_new, sampling=sampling, stops=body.stops(),
                prompt_logprobs=body.top_logprobs_asked() if echo else None,
                grammar=self._grammars.row(compiled) if compiled is not None else None,
                queue_deadline=deadline,
                emit=lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev))))
        for r in rows:
            self.engine.submit(r)
        self.metrics.prompt.inc(len(prompt) * n)
        return rows, events

    def _timeout(self) -> APIError:
        return APIError(504, f"no answer within this service's {self.settings.request_timeout_s} s request "
                        "timeout; generation was cancelled", code="timeout", kind="timeout_error")

    def _event_error(self, ev: Any) -> APIError:
        if ev.code == "queue_timeout":
            self.metrics.rejected.labels("queue_timeout").inc()
            return APIError(503, f"{ev.error} ({self.settings.queue_wait_budget_s:g} s); retry later",
                            code="queue_timeout", kind="server_error",
                            headers={"Retry-After": str(max(1, math.ceil(self.settings.queue_wait_budget_s)))})
        return APIError(500, ev.error, kind="server_error", code="generation_failed")

    def _token(self, tid: int) -> str:
        text = self._token_text.get(tid)
        if text is None:
            text = self.tokenizer.decode([tid])
            if len(self._token_text) < 200_000:
                self._token_text[tid] = text
        return text

    async def _watch_disconnect(self, http: Any, rows: list[Any]) -> None:
        """Cancel the rows when the client goes away (a non-streaming request is never told)."""
        while True:
            await asyncio.sleep(0.25)
            if await http.is_disconnected():
                log.info("client disconnected; cancelling %d row(s)", len(rows))
                for r in rows:
                    r.cancel()
                return

    async def _complete(self, prompt: list[int], body: GenerationParams, max_new: int, n: int,
                        compiled: Any, http: Any) -> list[dict[str, Any]]:
        """Every choice's text, token count, finish reason and log-probabilities."""
        rows, events = self._submit(prompt, body, max_new, n, compiled)
        out = [{"text": [], "tokens": 0, "finish": None, "logprobs": [], "prompt_logprobs": None} for _ in rows]
        watcher = asyncio.ensure_future(self._watch_disconnect(http, rows)) if http is not None else None
        t0, last, left = time.perf_counter(), [None] * n, n
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                while left:
                    i, ev = await events.get()
                    if ev.error:
                        raise self._event_error(ev)
                    self._observe_latency(t0, last, i, ev)
                    c = out[i]
                    c["text"].append(ev.text)
                    c["logprobs"].extend(ev.logprobs)
                    if ev.prompt_logprobs is not None:
                        c["prompt_logprobs"] = ev.prompt_logprobs
                    if ev.finish_reason:
                        c["tokens"], c["finish"], left = ev.completion_tokens, ev.finish_reason, left - 1
            for c in out:
                c["text"] = "".join(c["text"])
            return out
        except TimeoutError:
            raise self._timeout() from None
        finally:
            if watcher is not None:
                watcher.cancel()
            for r in rows:
                r.cancel()  # no-op once finished; frees the batch rows on timeout, error or disconnect

    def _observe_latency(self, t0: float, last: list[Any], i: int, ev: Any) -> None:
        """Time to first token and inter-token latency, per choice (an event may carry several tokens)."""
        now_ = time.perf_counter()
        prev = last[i]
        if prev is None:
            if ev.completion_tokens:
                self.metrics.ttft.observe(now_ - t0)
                last[i] = (now_, ev.completion_tokens)
            return
        t_prev, n_prev = prev
        if ev.completion_tokens > n_prev:
            per = (now_ - t_prev) / (ev.completion_tokens - n_prev)
            for _ in range(ev.completion_tokens - n_prev):
                self.metrics.itl.observe(per)
            last[i] = (now_, ev.completion_tokens)

    async def _stream(self, prompt: list[int], body: GenerationParams, max_new: int, n: int, compiled: Any,
                      make_chunk: Callable[[int, str | None, str | None, bool, Any], dict[str, Any] | None],
                      usage_chunk: Callable[[dict[str, int]], dict[str, Any]] | None, release: Callable[[], None]) -> Any:
        """Start generating; return the SSE response once the first event is in (a 504 until then)."""
        rows, events = self._submit(prompt, body, max_new, n, compiled)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        t0, last = time.perf_counter(), [None] * n
        try:
            async with asyncio.timeout_at(deadline):
                first = await events.get()
            if first[1].error:
                raise self._event_error(first[1])
        except TimeoutError:
            for r in rows:
                r.cancel()
            raise self._timeout() from None
        except BaseException:
            for r in rows:
                r.cancel()
            raise

        async def body_iter() -> AsyncIterator[str]:
            item, n_out, left = first, 0, n
            try:
                for i in range(n):
                    opening = make_chunk(i, None, None, True, None)
                    if opening is not None:
                        yield sse(opening)
                while True:
                    i, ev = item
                    if ev.error:
                        err = self._event_error(ev)
                        log.error("generation failed: %s", ev.error)
                        yield sse(err.body())
                        break
                    self._observe_latency(t0, last, i, ev)
                    if ev.text or ev.logprobs:
                        yield sse(make_chunk(i, ev.text, None, False, ev))
                    if ev.finish_reason:
                        n_out += ev.completion_tokens
                        yield sse(make_chunk(i, None, ev.finish_reason, False, None))
                        left -= 1
                        if not left:
                            if usage_chunk is not None:
                                yield sse(usage_chunk({"prompt_tokens": len(prompt), "completion_tokens": n_out,
                                                       "total_tokens": len(prompt) + n_out}))
                            break
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await events.get()
                    except TimeoutError:
                        yield sse(self._timeout().body())
                        break
                yield "data: [DONE]\n\n"
            finally:
                for r in rows:
                    r.cancel()  # client gone or stream done: the rows leave the batch
                release()

        return StreamingResponse(body_iter(), media_type="text/event-stream", background=BackgroundTask(release),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _running(self) -> Callable[[], None]:
        """Count a request as running until the returned release is called (once, whoever calls it)."""
        self.metrics.running.inc()
        done = [False]

        def release() -> None:
            if not done[0]:
                done[0] = True
                self.metrics.running.dec()

        return release

    async def _guarded(self, work: Callable[[Callable[[], None]], Any]) -> Any:
        # A stream counts as running until its last byte (its iterator releases), not its first token.
        release = self._running()
        try:
            res = await work(release)
        except BaseException:
            release()
            raise
        if not isinstance(res, StreamingResponse):
            release()
        return res

    # ---- log-probabilities in OpenAI's two shapes ----------------------------------------------

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        def entry(tid: int, lp: float) -> dict[str, Any]:
            text = self._token(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                            for t in lps], "refusal": None}

    def _completion_logprobs(self, lps: list[TokenLogprob | None], prompt: list[int] | None,
                             offset: int = 0) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        pos = offset
        for k, t in enumerate(lps):
            tid = t.token if t is not None else (prompt or [0])[k]
            text = self._token(tid)
            tokens.append(text)
            token_lps.append(None if t is None else t.logprob)
            tops.append(None if t is None else {self._token(i): v for i, v in t.top})
            offsets.append(pos)
            pos += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    # ---- routes ------------------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.settings.served_model_name,
            "object": "model",
            "created": self.loaded.created,
            "owned_by": "phiops",
            "root": self.loaded.model_tag,
            "max_model_len": self.settings.max_prompt_tokens + self.settings.max_new_tokens,
            "lineage": self.loaded.lineage,
        }

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one served model with its lineage."""
        return {"object": "list", "data": [self._model_card()]}

    def model(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``: the served model, by its name or its full tag; else a 404."""
        self._check_model(model_id)
        return self._model_card()

    async def chat(self, body: ChatCompletionRequest, http: Any = None) -> Any:
        """``POST /v1/chat/completions`` (the model's own chat template)."""
        return await self._guarded(lambda release: self._chat(body, http, release))

    async def _chat(self, body: ChatCompletionRequest, http: Any, release: Callable[[], None]) -> Any:
        self._check_model(body.model)
        max_new, n = self._cap(body), self._check_n(body)
        # Off the event loop: templating and tokenizing a long prompt, compiling a schema take a while.
        prompt = await asyncio.to_thread(self._encode_chat, body.messages)
        compiled = await asyncio.to_thread(self._grammar_for, body)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": now(), "model": self.settings.served_model_name}
        want_lp = body.top_logprobs_asked() is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(i: int, text: str | None, finish: str | None, first: bool, ev: Any) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice: dict[str, Any] = {"index": i, "delta": delta, "finish_reason": finish}
                if want_lp:
                    choice["logprobs"] = self._chat_logprobs(ev.logprobs) if ev is not None else None
                data = {**meta, "object": "chat.completion.chunk", "choices": [choice]}
                if include_usage:
                    data["usage"] = None
                return data

            def usage(u: dict[str, int]) -> dict[str, Any]:
                return {**meta, "object": "chat.completion.chunk", "choices": [], "usage": u}

            return await self._stream(prompt, body, max_new, n, compiled, chunk,
                                      usage if include_usage else None, release)
        out = await self._complete(prompt, body, max_new, n, compiled, http)
        n_out = sum(c["tokens"] for c in out)
        return {
            **meta,
            "object": "chat.completion",
            "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": self._chat_logprobs(c["logprobs"]) if want_lp else None,
                         "finish_reason": c["finish"]} for i, c in enumerate(out)],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": n_out, "total_tokens": len(prompt) + n_out},
        }

    async def completion(self, body: CompletionRequest, http: Any = None) -> Any:
        """``POST /v1/completions`` (a raw prompt, text or token ids)."""
        return await self._guarded(lambda release: self._text_completion(body, http, release))

    async def _text_completion(self, body: CompletionRequest, http: Any, release: Callable[[], None]) -> Any:
        self._check_model(body.model)
        max_new, n = self._cap(body), self._check_n(body)
        raw = body.text()
        prompt = await asyncio.to_thread(self._encode_text, raw)
        prompt_text = raw if isinstance(raw, str) else self.tokenizer.decode(raw)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": now(), "model": self.settings.served_model_name}
        want_lp = body.logprobs is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            offsets = [len(prompt_text) if body.echo else 0] * n

            def chunk(i: int, text: str | None, finish: str | None, first: bool, ev: Any) -> dict[str, Any] | None:
                if first:  # completions streams have no role chunk; echo sends the prompt first
                    if not body.echo:
                        return None
                    text = prompt_text
                lp = None
                if want_lp and ev is not None:
                    lps = (list(ev.prompt_logprobs or []) if body.echo else []) + list(ev.logprobs)
                    lp = self._completion_logprobs(lps, prompt, 0 if ev.prompt_logprobs else offsets[i])
                if text and not first:
                    offsets[i] += len(text)
                data = {**meta, "object": "text_completion",
                        "choices": [{"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}]}
                if include_usage:
                    data["usage"] = None
                return data

            def usage(u: dict[str, int]) -> dict[str, Any]:
                return {**meta, "object": "text_completion", "choices": [], "usage": u}

            return await self._stream(prompt, body, max_new, n, None, chunk,
                                      usage if include_usage else None, release)
        out = await self._complete(prompt, body, max_new, n, None, http)
        n_out = sum(c["tokens"] for c in out)
        choices = []
        for i, c in enumerate(out):
            lp = None
            if want_lp:
                lps = (list(c["prompt_logprobs"] or [None] * len(prompt)) if body.echo else []) + c["logprobs"]
                lp = self._completion_logprobs(lps, prompt if body.echo else None)
            text = (prompt_text if body.echo else "") + c["text"]
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c["finish"]})
        return {
            **meta,
            "object": "text_completion",
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": n_out, "total_tokens": len(prompt) + n_out},
        }
