"""phiops LLM service: an OpenAI-compatible chat endpoint over one causal LM from the model store.

Routes (a FastAPI app mounted at ``/v1``; BentoML adds ``/livez``, ``/readyz``, ``/metrics``):

- ``POST /v1/chat/completions``: OpenAI chat completions, ``stream`` false (JSON) or true
  (server-sent events ending ``data: [DONE]``).
- ``GET /v1/models``: the one served model.
- ``GET /readyz``: 200 only after the model is loaded and one warm-up generation has run.

Which model, and the limits (bento arguments are baked into the bento at build time by
``phiops.bento.build``; ``PHIOPS_*`` environment variables let operators retune a built
bento without rebuilding it):

==================  ==================================  =========================  =========
setting             bento argument (``--arg``)           environment override       default
==================  ==================================  =========================  =========
model tag           ``model_tag``                        ``PHIOPS_MODEL_TAG`` [1]_  required
served model name   ``served_model_name``                ``PHIOPS_SERVED_MODEL``    tag name
max new tokens      ``max_new_tokens``                   ``PHIOPS_MAX_NEW_TOKENS``  128
max prompt tokens   ``max_prompt_tokens``                ``PHIOPS_MAX_PROMPT_TOKENS`` 1024
==================  ==================================  =========================  =========

.. [1] The model tag is the one exception to "environment wins": a bento carries exactly the
   model named by its ``model_tag`` argument, so the variable is only a fallback for serving
   from source (``bentoml serve service:PhiOpsLLM`` in this directory).

This module imports only BentoML, FastAPI and pydantic at import time: ``bentoml build``
imports it to find the service, and torch/transformers load only when the service starts.
Nothing here imports ``phiops``, so a bento needs only the packages listed in bentofile.yaml.
"""

import asyncio
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("bentoml.phiops")

# Defaults kept equal to phiops.config.ServeCfg (a test checks); this module must not import
# phiops because a bento ships only this directory.
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_MAX_PROMPT_TOKENS = 1024
WARMUP_TOKENS = 2
# Where phiops.bento.save_model puts the checkpoint inside a stored model (CHECKPOINT_SUBDIR).
CHECKPOINT_SUBDIR = "checkpoint"
# No tokenizer packs more than this many characters per token on average over a whole prompt;
# longer text is refused before tokenizing it, which would otherwise cost time per byte.
MAX_CHARS_PER_TOKEN = 64


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


class ServiceArgs(BaseModel):
    """Bento arguments (``bentoml build --arg``); stored in bento.yaml and restored at serve."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_tag: str | None = None
    served_model_name: str | None = None
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1)
    max_prompt_tokens: int = Field(DEFAULT_MAX_PROMPT_TOKENS, ge=1)


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    model_tag: str
    served_model_name: str
    max_new_tokens: int = Field(ge=1)
    max_prompt_tokens: int = Field(ge=1)


def _env_int(name: str, fallback: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return fallback
    try:
        value = int(raw)
    except ValueError:
        raise RuntimeError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise RuntimeError(f"{name}={value} must be >= 1")
    return value


def load_settings() -> Settings:
    """Resolve the service settings from bento arguments and the environment (see module doc).

    Raises:
        RuntimeError: no model tag is configured, or an override is not a positive integer.
    """
    args = bentoml.use_arguments(ServiceArgs)
    tag = args.model_tag or os.environ.get("PHIOPS_MODEL_TAG")
    if not tag:
        raise RuntimeError(
            "no model to serve: build with phiops.bento.build (which bakes --arg model_tag into "
            "the bento) or, serving from source, pass --arg model_tag=NAME:VERSION or set "
            "PHIOPS_MODEL_TAG"
        )
    served = os.environ.get("PHIOPS_SERVED_MODEL") or args.served_model_name or tag.split(":", 1)[0]
    return Settings(
        model_tag=tag,
        served_model_name=served,
        max_new_tokens=_env_int("PHIOPS_MAX_NEW_TOKENS", args.max_new_tokens),
        max_prompt_tokens=_env_int("PHIOPS_MAX_PROMPT_TOKENS", args.max_prompt_tokens),
    )


SETTINGS = load_settings()


# --------------------------------------------------------------------------------------------
# OpenAI wire schema (the subset served; unknown fields are a 400, never silently ignored)
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    # Optional fields also accept an explicit null (some clients send one) meaning "default".
    max_tokens: int | None = Field(None, ge=1)
    # Newer OpenAI clients send this name instead of max_tokens; it wins when both are given.
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: 1.0, as OpenAI
    top_p: float | None = Field(None, gt=0.0, le=1.0)  # None: 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)  # one choice per request is all this service generates
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        if any(len(s) > 128 for s in stops):
            raise ValueError("stop sequences must be at most 128 characters")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]  # normalised by _stop

    @property
    def temp(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    @property
    def nucleus(self) -> float:
        return 1.0 if self.top_p is None else self.top_p


class APIError(Exception):
    """An OpenAI-style error response; the message never quotes request content."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, param=self.param, code=self.code, kind=self.kind)


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
    )


_SAFE_LOC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _loc(parts: tuple[Any, ...]) -> str:
    # Key names come from the client for unknown fields: show only identifier-like names, so an
    # error body never reflects arbitrary client text.
    shown = [str(p) if isinstance(p, int) or _SAFE_LOC.match(str(p)) else "?" for p in parts]
    if shown and shown[0] == "body":
        shown = shown[1:]
    return ".".join(shown) or "body"


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, first = [], None
    for err in exc.errors():
        loc = "body" if err.get("type") == "json_invalid" else _loc(tuple(err.get("loc", ())))
        first = first or loc
        if err.get("type") == "json_invalid":
            problems.append("body: not valid JSON")
        elif err.get("type") == "extra_forbidden":
            problems.append(f"{loc}: unknown field")
        else:
            # pydantic's `msg` states the rule ("Input should be ..."), never the input itself;
            # the `input` entry is dropped on purpose.
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(problems[:10]) or "invalid request", first


app = FastAPI(title="phiops OpenAI-compatible API", version="1")


@app.exception_handler(RequestValidationError)
async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _describe_validation(exc)
    return _error(400, message, param=param, code="invalid_value")


@app.exception_handler(APIError)
async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), kind="invalid_request_error")


# --------------------------------------------------------------------------------------------
# Generation helpers (torch/transformers are imported lazily: see module doc)
# --------------------------------------------------------------------------------------------


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a turn: generation_config's (int or list) plus the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        for i in [source] if isinstance(source, int) else list(source):
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise RuntimeError("the checkpoint defines no EOS token (generation_config or tokenizer)")
    return ids


def _truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class _Run:
    """Per-request generation state shared with the stopping criterion (runs in the generate thread)."""

    def __init__(self, tokenizer: Any, prompt_len: int, stops: list[str], eos_ids: list[int]):
        self.tokenizer, self.prompt_len, self.stops, self.eos_ids = tokenizer, prompt_len, stops, eos_ids
        self.cancel = threading.Event()
        self.generated = 0
        self.hit_stop = False
        self.hit_eos = False

    def finish_reason(self, text: str, max_new_tokens: int) -> tuple[str, str]:
        """The text cut at the first stop sequence, and OpenAI's finish_reason for it."""
        text, cut = _truncate_at_stop(text, self.stops)
        if cut or self.hit_stop or self.hit_eos:
            return text, "stop"
        return text, "length" if self.generated >= max_new_tokens else "stop"

    def criterion(self) -> Any:
        from transformers import StoppingCriteria

        run = self

        class _Criterion(StoppingCriteria):
            # transformers' own stop_strings builds a vocab-wide table on every call (seconds
            # per request on CPU); decoding the short tail is far cheaper for <= 4 stops.
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                run.generated = int(input_ids.shape[1]) - run.prompt_len
                run.hit_eos = run.generated > 0 and int(input_ids[0, -1]) in run.eos_ids
                done = run.cancel.is_set()
                if not done and run.stops and run.generated > 0:
                    tail = run.tokenizer.decode(input_ids[0, run.prompt_len:], skip_special_tokens=True)
                    run.hit_stop = any(s in tail for s in run.stops)
                    done = run.hit_stop
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        return _Criterion()


def _now() -> int:
    return int(time.time())


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------


@bentoml.service(
    name="PhiOpsLLM",
    description="OpenAI-compatible chat completions over one phiops causal LM.",
    workers=1,  # one model copy per replica; requests are serialised on it (see _lock)
    traffic={"timeout": 600},  # CPU generation of a few hundred tokens can exceed the 60 s default
    labels={"project": "phiops"},
)
@bentoml.asgi_app(app, path="/v1")
class PhiOpsLLM:
    # A class attribute, so `bentoml build` records the model in the bento (and export/
    # containerize copy it into the image); resolved from the model store when first read.
    model_ref = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._ready = False
        self.settings = SETTINGS
        stored = self.model_ref
        self.model_tag = str(stored.tag)
        self.model_created = int(stored.info.creation_time.timestamp())
        path = stored.path_of(CHECKPOINT_SUBDIR)
        if not os.path.isdir(path) or not any(n.endswith(".safetensors") for n in os.listdir(path)):
            raise RuntimeError(f"{self.model_tag}: no safetensors checkpoint at {path}")

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # bf16 on GPUs; fp32 on CPU, where bf16 measured 4-5x slower (phiops.models.default_dtype).
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if not getattr(self.tokenizer, "chat_template", None):
            raise RuntimeError(f"{self.model_tag}: the tokenizer has no chat template; save one with the checkpoint")
        # compressed-tensors W4A16 (GPTQ/AWQ) checkpoints load through the same call: the
        # quantization_config in config.json selects transformers' compressed-tensors quantizer.
        self.model = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False, dtype=dtype
        ).to(self.device).eval()
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        # One generation at a time per replica: on CPU parallel generate calls only contend for
        # the same cores, and a per-request seed must not be disturbed by another request.
        self._lock = threading.Lock()
        log.info("loaded %s on %s in %.1fs", self.model_tag, self.device, time.perf_counter() - t0)

        t0 = time.perf_counter()
        self._generate(self._encode([ChatMessage(role="user", content="Hello")]),
                       max_new_tokens=WARMUP_TOKENS, temperature=0.0, top_p=1.0, seed=None, stops=[])
        log.info("warm-up generation done in %.2fs; ready", time.perf_counter() - t0)
        self._ready = True

    def __is_ready__(self) -> bool:
        return self._ready

    # ---- helpers ----------------------------------------------------------------------------

    def _encode(self, messages: list[ChatMessage]) -> list[int]:
        import jinja2

        convo = [{"role": m.role, "content": m.text()} for m in messages]
        if sum(len(m["content"]) for m in convo) > self.settings.max_prompt_tokens * MAX_CHARS_PER_TOKEN:
            raise APIError(400, f"the prompt is far longer than {self.settings.max_prompt_tokens} tokens",
                           param="messages", code="context_length_exceeded")
        try:
            text = self.tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as exc:
            # Templates raise for conversations they cannot render (e.g. roles must alternate);
            # their messages are written by the template author, not copied from the request.
            raise APIError(400, f"messages rejected by the model's chat template: {exc}", param="messages") from None
        # The template already wrote any BOS/special tokens it wants.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.settings.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens; this service accepts at most "
                f"{self.settings.max_prompt_tokens}",
                param="messages", code="context_length_exceeded",
            )
        return list(ids)

    def _gen_kwargs(self, prompt: list[int], run: _Run, *, max_new_tokens: int, temperature: float,
                    top_p: float) -> dict[str, Any]:
        import torch
        from transformers import StoppingCriteriaList

        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.pad_id,
            "stopping_criteria": StoppingCriteriaList([run.criterion()]),
        }
        if temperature == 0.0:
            kwargs["do_sample"] = False
        else:
            # OpenAI semantics: only temperature and nucleus sampling; top_k=0 switches off any
            # top_k (or repetition penalty) default the checkpoint's generation_config carries.
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0)
        return kwargs

    def _generate(self, prompt: list[int], *, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int | None, stops: list[str]) -> tuple[str, int, str]:
        """Blocking generation; returns (text, completion_tokens, finish_reason)."""
        import torch

        run = _Run(self.tokenizer, len(prompt), stops, self.eos_ids)
        kwargs = self._gen_kwargs(prompt, run, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**kwargs)
        new = out[0, len(prompt):]
        run.generated = int(new.shape[0])
        run.hit_eos = run.generated > 0 and int(new[-1]) in self.eos_ids
        text, finish = run.finish_reason(self.tokenizer.decode(new, skip_special_tokens=True), max_new_tokens)
        return text, run.generated, finish

    def _cap(self, req: ChatCompletionRequest) -> int:
        asked = req.max_completion_tokens or req.max_tokens
        # A request may ask for less than the cap, never more: the cap bounds per-request latency.
        return min(asked, self.settings.max_new_tokens) if asked else self.settings.max_new_tokens

    def _check_model(self, name: str) -> None:
        if name not in (self.settings.served_model_name, self.model_tag):
            raise APIError(404, "the requested model is not served here; see GET /v1/models",
                           param="model", code="model_not_found")

    # ---- routes -----------------------------------------------------------------------------

    @app.get("/models")
    async def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{
                "id": self.settings.served_model_name,
                "object": "model",
                "created": self.model_created,
                "owned_by": "phiops",
                "root": self.model_tag,
                "max_model_len": self.settings.max_prompt_tokens + self.settings.max_new_tokens,
            }],
        }

    @app.post("/chat/completions", response_model=None)
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        self._check_model(body.model)
        # Off the event loop: templating and tokenizing a long prompt takes a while.
        prompt = await asyncio.to_thread(self._encode, body.messages)
        max_new = self._cap(body)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": _now(), "model": self.settings.served_model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream(prompt, body, max_new, meta, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text, n_out, finish = await asyncio.to_thread(
            self._generate, prompt, max_new_tokens=max_new, temperature=body.temp,
            top_p=body.nucleus, seed=body.seed, stops=body.stops(),
        )
        return {
            "id": meta["id"],
            "object": "chat.completion",
            "created": meta["created"],
            "model": meta["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": n_out,
                      "total_tokens": len(prompt) + n_out},
        }

    async def _stream(self, prompt: list[int], body: ChatCompletionRequest, max_new: int,
                      meta: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        stops = body.stops()
        run = _Run(self.tokenizer, len(prompt), stops, self.eos_ids)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._gen_kwargs(prompt, run, max_new_tokens=max_new, temperature=body.temp, top_p=body.nucleus)
        kwargs["streamer"] = streamer
        error: list[BaseException] = []

        def work() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if run.cancel.is_set():
                        return
                    if body.seed is not None:
                        torch.manual_seed(body.seed)
                    self.model.generate(**kwargs)
            except BaseException as exc:  # reported to the client as the stream's last event
                error.append(exc)
            finally:
                streamer.end()  # unblocks the reader even when generate raised

        def chunk(delta: dict[str, Any], finish: str | None) -> str:
            data = {"id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"],
                    "model": meta["model"], "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        thread = threading.Thread(target=work, name="phiops-generate", daemon=True)
        thread.start()
        # Hold back enough characters that a stop sequence split across pieces is never sent.
        holdback = max((len(s) for s in stops), default=1) - 1
        text, sent, finish = "", 0, None
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            pieces = iter(streamer)
            while True:
                piece = await asyncio.to_thread(next, pieces, None)
                if piece is None:
                    break
                text += piece
                cut, hit = _truncate_at_stop(text, stops)
                if hit:
                    run.cancel.set()
                    finish = "stop"
                    if len(cut) > sent:
                        yield chunk({"content": cut[sent:]}, None)
                    sent = len(cut)
                    break
                safe = len(text) - holdback
                if safe > sent:
                    yield chunk({"content": text[sent:safe]}, None)
                    sent = safe
            await asyncio.to_thread(thread.join)
            if error:
                log.error("generation failed: %r", error[0])
                err = {"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                yield "data: [DONE]\n\n"
                return
            if finish is None:
                rest, finish = run.finish_reason(text, max_new)
                if len(rest) > sent:
                    yield chunk({"content": rest[sent:]}, None)
            yield chunk({}, finish)
            if include_usage:
                usage = {"prompt_tokens": len(prompt), "completion_tokens": run.generated,
                         "total_tokens": len(prompt) + run.generated}
                final = {"id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"],
                         "model": meta["model"], "choices": [], "usage": usage}
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # Client gone or stream done: stop generating so the lock frees for the next request.
            run.cancel.set()
