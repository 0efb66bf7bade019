"""OpenAI's completion routes over the engine: a validated request in, a response out.

``OpenAIServing`` holds the loaded model, its batching engine and the limits. It checks every
limit before any model compute (a prompt over ``max_prompt_tokens`` or a ``max_tokens`` over
``max_new_tokens`` is a 400; an unknown model a 404), submits the request to the engine, and
turns the engine's events into a ``chat.completion`` / ``text_completion`` object or a stream of
server-sent events ending ``data: [DONE]``. A request not answered within ``request_timeout_s``
is a 504 and its generation is cancelled; a client that goes away cancels its row.

It knows nothing of BentoML: ``services/service.py`` maps routes onto it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

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
                             on_step=on_step, solo=loaded.solo)
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

        convo = [{"role": m.role, "content": m.text()} for m in messages]
        self._precheck_chars(sum(len(m["content"]) for m in convo), "messages")
        try:
            text = self.tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as exc:
            # Templates raise for conversations they cannot render (e.g. roles must alternate);
            # their messages are written by the template author, not copied from the request.
            raise APIError(400, f"messages rejected by the model's chat template: {exc}", param="messages") from None
        # The template already wrote any BOS/special tokens it wants.
        return self._check_prompt_len(self.tokenizer(text, add_special_tokens=False)["input_ids"], "messages")

    def _encode_text(self, prompt: str) -> list[int]:
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

    def _check_model(self, name: str) -> None:
        if name not in (self.settings.served_model_name, self.loaded.model_tag):
            raise self._refuse("unknown_model", APIError(
                404, "the requested model is not served here; see GET /v1/models",
                param="model", code="model_not_found"))

    # ---- generation ----------------------------------------------------------------------------

    def _submit(self, prompt: list[int], body: GenerationParams, max_new: int) -> tuple[Any, asyncio.Queue]:
        from phiops.serve.engine import Request

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = Request(prompt=prompt, max_new_tokens=max_new, temperature=body.temp, top_p=body.nucleus,
                      seed=body.seed, stops=body.stops(),
                      emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        self.engine.submit(req)
        self.metrics.prompt.inc(len(prompt))
        return req, events

    def _timeout(self) -> APIError:
        return APIError(504, f"no answer within this service's {self.settings.request_timeout_s} s request "
                        "timeout; generation was cancelled", code="timeout", kind="timeout_error")

    async def _complete(self, prompt: list[int], body: GenerationParams, max_new: int) -> tuple[str, int, str]:
        req, events = self._submit(prompt, body, max_new)
        parts: list[str] = []
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                while True:
                    ev = await events.get()
                    if ev.error:
                        raise APIError(500, ev.error, kind="server_error")
                    parts.append(ev.text)
                    if ev.finish_reason:
                        return "".join(parts), ev.completion_tokens, ev.finish_reason
        except TimeoutError:
            raise self._timeout() from None
        finally:
            req.cancel()  # no-op once finished; frees the batch row on timeout or disconnect

    async def _stream(self, prompt: list[int], body: GenerationParams, max_new: int,
                      make_chunk: Callable[[str | None, str | None, bool], dict[str, Any] | None],
                      usage_chunk: Callable[[dict[str, int]], dict[str, Any]] | None) -> Any:
        """Start generating; return the SSE response once the first event is in (a 504 until then)."""
        req, events = self._submit(prompt, body, max_new)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                first = await events.get()
        except TimeoutError:
            req.cancel()
            raise self._timeout() from None
        except BaseException:
            req.cancel()
            raise

        async def body_iter() -> AsyncIterator[str]:
            ev, n_out = first, 0
            try:
                opening = make_chunk(None, None, True)
                if opening is not None:
                    yield sse(opening)
                while True:
                    if ev.error:
                        log.error("generation failed: %s", ev.error)
                        yield sse({"error": {"message": ev.error, "type": "server_error", "param": None,
                                             "code": None}})
                        break
                    if ev.text:
                        yield sse(make_chunk(ev.text, None, False))
                    if ev.finish_reason:
                        n_out = ev.completion_tokens
                        yield sse(make_chunk(None, ev.finish_reason, False))
                        if usage_chunk is not None:
                            yield sse(usage_chunk({"prompt_tokens": len(prompt), "completion_tokens": n_out,
                                                   "total_tokens": len(prompt) + n_out}))
                        break
                    try:
                        async with asyncio.timeout_at(deadline):
                            ev = await events.get()
                    except TimeoutError:
                        yield sse({"error": {"message": self._timeout().message, "type": "timeout_error",
                                             "param": None, "code": "timeout"}})
                        break
                yield "data: [DONE]\n\n"
            finally:
                req.cancel()  # client gone or stream done: the row leaves the batch

        return StreamingResponse(body_iter(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _guarded(self, work: Any) -> Any:
        self.metrics.running.inc()
        try:
            return await work
        finally:
            self.metrics.running.dec()

    # ---- routes ------------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one served model with its lineage."""
        return {
            "object": "list",
            "data": [{
                "id": self.settings.served_model_name,
                "object": "model",
                "created": self.loaded.created,
                "owned_by": "phiops",
                "root": self.loaded.model_tag,
                "max_model_len": self.settings.max_prompt_tokens + self.settings.max_new_tokens,
                "lineage": self.loaded.lineage,
            }],
        }

    async def chat(self, body: ChatCompletionRequest) -> Any:
        """``POST /v1/chat/completions`` (the model's own chat template)."""
        return await self._guarded(self._chat(body))

    async def _chat(self, body: ChatCompletionRequest) -> Any:
        self._check_model(body.model)
        max_new = self._cap(body)
        # Off the event loop: templating and tokenizing a long prompt takes a while.
        prompt = await asyncio.to_thread(self._encode_chat, body.messages)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": now(), "model": self.settings.served_model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                data = {**meta, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                if include_usage:
                    data["usage"] = None
                return data

            def usage(u: dict[str, int]) -> dict[str, Any]:
                return {**meta, "object": "chat.completion.chunk", "choices": [], "usage": u}

            return await self._stream(prompt, body, max_new, chunk, usage if include_usage else None)
        text, n_out, finish = await self._complete(prompt, body, max_new)
        return {
            **meta,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": n_out, "total_tokens": len(prompt) + n_out},
        }

    async def completion(self, body: CompletionRequest) -> Any:
        """``POST /v1/completions`` (a raw prompt)."""
        return await self._guarded(self._text_completion(body))

    async def _text_completion(self, body: CompletionRequest) -> Any:
        self._check_model(body.model)
        max_new = self._cap(body)
        prompt = await asyncio.to_thread(self._encode_text, body.text())
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": now(), "model": self.settings.served_model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(text: str | None, finish: str | None, first: bool) -> dict[str, Any] | None:
                if first:  # completions streams have no role chunk
                    return None
                data = {**meta, "object": "text_completion",
                        "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}
                if include_usage:
                    data["usage"] = None
                return data

            def usage(u: dict[str, int]) -> dict[str, Any]:
                return {**meta, "object": "text_completion", "choices": [], "usage": u}

            return await self._stream(prompt, body, max_new, chunk, usage if include_usage else None)
        text, n_out, finish = await self._complete(prompt, body, max_new)
        return {
            **meta,
            "object": "text_completion",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": n_out, "total_tokens": len(prompt) + n_out},
        }
