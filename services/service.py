"""phiops LLM service: OpenAI-compatible completions over one causal LM from the model store.

Routes (a FastAPI app mounted at ``/v1``; BentoML adds ``/livez``, ``/readyz``, ``/metrics``):

- ``POST /v1/chat/completions`` (the model's own chat template) and ``POST /v1/completions``
  (raw prompt): ``stream`` false (JSON) or true (server-sent events ending ``data: [DONE]``).
- ``GET /v1/models``: the one served model with its lineage (registry version, data hash, git
  revision) from the stored model's metadata.
- ``GET /readyz``: 200 only after the checkpoint matched its sha256 manifest, the model loaded
  and one warm-up generation ran through the batching engine.
- ``GET /metrics``: BentoML's request metrics plus ``phiops_*`` (request duration, prompt and
  generated tokens, forward passes and their batch sizes, running requests).

Concurrent requests share forward passes: ``phiops_engine.Engine`` batches them continuously
(a request joins the running batch at the next step and leaves when it finishes).

On CUDA two more things happen at load (``PHIOPS_CUDA_FASTPATH=0`` turns both off):

- compressed-tensors W4A16 linears (the GPTQ/AWQ candidates) are swapped for PyTorch's int4
  weight-only kernel (``phiops_decode.int4_linears``) before the first forward; otherwise
  compressed-tensors dequantizes them to bf16 and serves a bf16-sized model;
- a request that is alone decodes over a static cache of ``max_prompt_tokens + max_new_tokens``
  tokens, one CUDA graph replay per token: through ``phiops_decode.FusedDecoder`` (Triton
  kernels, ``phiops_kernels.py``) for llama-family models in bf16/fp16/fp32 (SmolLM2, Phi-3,
  Phi-4-mini, Phi-4), else through ``phiops_decode.GraphDecoder`` (the step compiled by
  torch.compile; W4A16 models, Phi-2); the warm-up generation tunes or compiles it and captures
  the graph, so ``/readyz`` turns ready after it.

Which model, and the limits (bento arguments are baked into the bento at build time by
``phiops.bento.build``; ``PHIOPS_*`` environment variables let operators retune a built
bento without rebuilding it):

==================  ======================  ===============================  =========
setting             bento argument          environment override             default
==================  ======================  ===============================  =========
model tag           ``model_tag``           ``PHIOPS_MODEL_TAG`` [1]_        required
served model name   ``served_model_name``   ``PHIOPS_SERVED_MODEL``          tag name
max new tokens      ``max_new_tokens``      ``PHIOPS_MAX_NEW_TOKENS``        128
max prompt tokens   ``max_prompt_tokens``   ``PHIOPS_MAX_PROMPT_TOKENS``     1024
max concurrency     ``max_concurrency``     ``PHIOPS_MAX_CONCURRENCY``       64
request timeout s   ``request_timeout_s``   ``PHIOPS_REQUEST_TIMEOUT_S``     120
max batch size      ``max_batch_size``      ``PHIOPS_MAX_BATCH_SIZE``        32
max batch wait ms   ``max_batch_wait_ms``   ``PHIOPS_MAX_BATCH_WAIT_MS``     10
weights dtype       ``dtype``               ``PHIOPS_DTYPE``                 auto [2]_
==================  ======================  ===============================  =========

.. [1] The model tag is the one exception to "environment wins": a bento carries exactly the
   model named by its ``model_tag`` argument, so the variable is only a fallback for serving
   from source (``bentoml serve service:PhiOpsLLM`` in this directory).
.. [2] ``auto``: bfloat16 on CUDA, and on CPUs with AMX tiles (their bf16 matrix units):
   there the batched forward passes that serving runs measured 1.5x (decode, 32 rows) to 3.3x
   (prefill) faster than float32 for SmolLM2-135M; float32 on other CPUs (bf16 emulated
   there is slower). ``float32`` / ``bfloat16`` force one.

Limits are checked before any model compute: a prompt over ``max_prompt_tokens`` or a
``max_tokens`` over ``max_new_tokens`` is a 400; a request beyond ``max_concurrency`` in flight
is a 429 (BentoML's concurrency middleware, which leaves the health routes and ``/metrics``
alone); one not answered within ``request_timeout_s`` is a 504 and its generation is cancelled.

This module imports only BentoML, FastAPI and pydantic at import time: ``bentoml build``
imports it to find the service, and torch/transformers load only when the service starts.
Nothing here imports ``phiops``, so a bento needs only the packages listed in bentofile.yaml.
"""
import asyncio
import hashlib
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("bentoml.phiops")

# bf16 matmuls on CPU (oneDNN) JIT-compile a kernel per matrix shape, and every prefill brings new
# ones (rows x prompt length). Two caches keep each kernel with its scratchpad (~0.25 MB, more
# for more rows), both 1024 entries by default: oneDNN's primitive cache and, in front of it,
# PyTorch's ideep cache (LRU_CACHE_CAPACITY), which keeps alive what the first evicts. With only
# the first capped, the served worker grew 13.6 MB per 192 requests of bench/serve_cpu_load.py
# and still rose after 1,700; with both capped, 0.7 MB per 192 (no trend) after the warm-up
# round (bench/README.md). 256 still holds every decode shape (1-32 rows x the model's few
# weight shapes), and a kernel evicted and needed again costs ~1 ms to rebuild. Both are read
# at the first bf16 matmul, i.e. after this import; the environment still wins.
KERNEL_CACHE_CAPACITY = "256"
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, KERNEL_CACHE_CAPACITY)

# Defaults kept equal to phiops.config.ServeCfg (a test checks); this module must not import
# phiops because a bento ships only this directory.
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_MAX_PROMPT_TOKENS = 1024
DEFAULT_MAX_CONCURRENCY = 64  # twice the batch: a full batch running and a full one waiting
DEFAULT_REQUEST_TIMEOUT_S = 120
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_BATCH_WAIT_MS = 10  # what a request into an idle engine may wait for company
DEFAULT_DTYPE = "auto"
DTYPES = ("auto", "float32", "bfloat16")
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
    max_concurrency: int = Field(DEFAULT_MAX_CONCURRENCY, ge=1)
    request_timeout_s: int = Field(DEFAULT_REQUEST_TIMEOUT_S, ge=1)
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1)
    max_batch_wait_ms: int = Field(DEFAULT_MAX_BATCH_WAIT_MS, ge=0)
    dtype: Literal["auto", "float32", "bfloat16"] = DEFAULT_DTYPE


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    model_tag: str
    served_model_name: str
    max_new_tokens: int = Field(ge=1)
    max_prompt_tokens: int = Field(ge=1)
    max_concurrency: int = Field(ge=1)
    request_timeout_s: int = Field(ge=1)
    max_batch_size: int = Field(ge=1)
    max_batch_wait_ms: int = Field(ge=0)
    dtype: Literal["auto", "float32", "bfloat16"]


def _env_int(name: str, fallback: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return fallback
    try:
        value = int(raw)
    except ValueError:
        raise RuntimeError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise RuntimeError(f"{name}={value} must be >= {minimum}")
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
        max_concurrency=_env_int("PHIOPS_MAX_CONCURRENCY", args.max_concurrency),
        request_timeout_s=_env_int("PHIOPS_REQUEST_TIMEOUT_S", args.request_timeout_s),
        max_batch_size=_env_int("PHIOPS_MAX_BATCH_SIZE", args.max_batch_size),
        max_batch_wait_ms=_env_int("PHIOPS_MAX_BATCH_WAIT_MS", args.max_batch_wait_ms, minimum=0),
        dtype=_env_dtype(args.dtype),
    )


def _env_dtype(fallback: str) -> str:
    raw = os.environ.get("PHIOPS_DTYPE") or fallback
    if raw not in DTYPES:
        raise RuntimeError(f"PHIOPS_DTYPE={raw!r} is not one of {DTYPES}")
    return raw


def pick_dtype(setting: str, device: str) -> str:
    """The weights' dtype for `setting` on `device` (see the module doc, note 2)."""
    if setting != "auto":
        return setting
    if device == "cuda":
        return "bfloat16"
    import torch

    return "bfloat16" if torch.cpu._is_amx_tile_supported() else "float32"


SETTINGS = load_settings()


def _cancel_bentoml_request_timers() -> None:
    """Make BentoML's request-timeout middleware cancel its timer when the request ends.

    BentoML 1.4.40's ``TimeoutMiddleware`` arms ``loop.call_later(timeout, ...)`` per request and
    never cancels it. The timer handle holds a copy of the request's context (its tracing span
    and what hangs off it) until it fires, ``traffic.timeout`` (150) seconds later, so every
    request of the last 150 s stays in memory. Measured in process (the app under 32 client
    threads, a tiny model, 10 rounds of 400 requests): without this, over the last 3,600 requests
    +8,770 contexts and +7,200 span lists alive and RSS still rising (+18 %); with it, no object
    growth and RSS flat after the first 1,600 requests. This subclass is the same middleware (same 504, same backstop) with the timer
    cancelled. ``tests/integration/test_service.py`` checks that upstream still leaves the timer
    armed, so the patch goes once it is fixed there.
    """
    from bentoml._internal.server.http import traffic

    if getattr(traffic.TimeoutMiddleware, "phiops_cancels_timer", False):
        return
    upstream = traffic.TimeoutMiddleware

    class TimeoutMiddleware(upstream):  # type: ignore[misc,valid-type]
        phiops_cancels_timer = True

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] not in ("http", "websocket"):
                return await self.app(scope, receive, send)
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

            async def _send(message: Any) -> None:
                if not waiter.done():
                    waiter.set_result(None)
                await send(message)

            fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
            try:
                try:
                    await waiter
                except TimeoutError:
                    if fut.cancel():
                        resp = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                            status_code=504)
                        await resp(scope, receive, send)
                else:
                    await fut
            finally:
                timer.cancel()

    traffic.TimeoutMiddleware = TimeoutMiddleware


_cancel_bentoml_request_timers()


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


class _GenerationParams(_Strict):
    """The sampling and output fields both endpoints share."""

    model: str = Field(min_length=1, max_length=256)
    # Optional fields also accept an explicit null (some clients send one) meaning "default".
    max_tokens: int | None = Field(None, ge=1)
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

    def asked_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    @property
    def temp(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    @property
    def nucleus(self) -> float:
        return 1.0 if self.top_p is None else self.top_p


class ChatCompletionRequest(_GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    # Newer OpenAI clients send this name instead of max_tokens; it wins when both are given.
    max_completion_tokens: int | None = Field(None, ge=1)

    def asked_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_GenerationParams):
    # A list is accepted as OpenAI's client may send one, but it must hold exactly one prompt.
    prompt: str | list[str] = Field(min_length=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is served")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


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
# Generation helpers
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


# --------------------------------------------------------------------------------------------
# Checkpoint integrity, lineage, metrics (torch/transformers are imported lazily: see module doc)
# --------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: str, manifest: dict[str, str] | None, tag: str) -> None:
    """Check every checkpoint file against the sha256 manifest saved with the model.

    Raises:
        RuntimeError: no manifest, or a file is missing, unrecorded or differs (names the files).
    """
    if not manifest:
        raise RuntimeError(f"{tag}: the stored model has no sha256 manifest (metadata phiops.files); "
                           "save it with phiops.bento.save_model")
    found = {os.path.relpath(os.path.join(d, n), path) for d, _, names in os.walk(path) for n in names}
    problems = [f"{rel}: missing" for rel in sorted(set(manifest) - found)]
    problems += [f"{rel}: not in the manifest" for rel in sorted(found - set(manifest))]
    for rel in sorted(set(manifest) & found):
        actual = _sha256(os.path.join(path, rel))
        if actual != manifest[rel]:
            problems.append(f"{rel}: sha256 {actual[:16]}... but the manifest says {manifest[rel][:16]}...")
    if problems:
        raise RuntimeError(
            f"{tag}: checkpoint files differ from the sha256 manifest saved with the model; refusing to "
            "serve a damaged or altered model (save it again from the registry):\n  - " + "\n  - ".join(problems)
        )


def lineage(metadata: dict[str, Any]) -> dict[str, Any]:
    """Registry version, data hash and git revision from the stored model's metadata.

    ``phiops`` records them under ``"registry"`` (a dict, or the version string of older
    models); top-level keys of the same names are read too. Missing facts are None.
    """
    reg = metadata.get("registry")
    reg = reg if isinstance(reg, dict) else ({"version": reg} if isinstance(reg, str) else {})

    def pick(*keys: str) -> Any:
        for key in keys:
            for source in (reg, metadata):
                if source.get(key) is not None:
                    return source[key]
        return None

    return {
        "artifact": pick("artifact"),
        "registry_version": pick("version", "registry_version"),
        "data_hash": pick("data_hash"),
        "git_rev": pick("git_rev", "git_revision"),
        "git_tag": pick("git_tag"),
    }


class _Metrics:
    """The phiops Prometheus series; created once per process (BentoML's /metrics collects them)."""

    def __init__(self) -> None:
        # Imported here, not at module import: BentoML sets PROMETHEUS_MULTIPROC_DIR in the worker
        # after importing this module, and prometheus_client reads it at import.
        import prometheus_client as prom

        def get(kind: Callable[..., Any], name: str, doc: str, **kw: Any) -> Any:
            existing = prom.REGISTRY._names_to_collectors.get(name)  # re-imported service (tests)
            return existing if existing is not None else kind(name, doc, **kw)

        self.duration = get(prom.Histogram, "phiops_request_duration_seconds",
                            "Time from request to last byte of the response, by route and status.",
                            labelnames=["route", "status"],
                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300))
        self.generated = get(prom.Counter, "phiops_generated_tokens",
                             "Tokens generated (sampled), all requests, warm-up included.")
        self.prompt = get(prom.Counter, "phiops_prompt_tokens", "Prompt tokens prefilled.")
        self.forward = get(prom.Counter, "phiops_forward_passes", "Model forward passes, by phase.",
                           labelnames=["phase"])
        self.batch = get(prom.Histogram, "phiops_batch_rows", "Rows (requests) per forward pass, by phase.",
                         labelnames=["phase"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.running = get(prom.Gauge, "phiops_requests_running",
                           "Requests in a route handler (a stream counts until its first token is in).", multiprocess_mode="livesum")
        self.rejected = get(prom.Counter, "phiops_requests_rejected",
                            "Requests refused before any model compute, by reason.", labelnames=["reason"])


class _DurationMiddleware:
    """Observes each /v1 request's duration until its last body byte (streams included)."""

    metrics: "_Metrics | None" = None  # set by the service once its series exist

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.metrics is None:
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def _send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        route = scope.get("path", "").rsplit("/v1", 1)[-1] or "/"
        route = route if route in ("/chat/completions", "/completions", "/models") else "other"
        try:
            await self.app(scope, receive, _send)
        finally:
            self.metrics.duration.labels(route, str(status[0])).observe(time.perf_counter() - t0)


app.add_middleware(_DurationMiddleware)


def _now() -> int:
    return int(time.time())


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------


@bentoml.service(
    name="PhiOpsLLM",
    description="OpenAI-compatible completions over one phiops causal LM, continuously batched.",
    workers=1,  # one model copy per replica; its engine batches every request of the replica
    traffic={
        "max_concurrency": SETTINGS.max_concurrency,
        # The route answers 504 itself at request_timeout_s (OpenAI-shaped, generation cancelled);
        # BentoML's timeout is the backstop for anything that hangs before reaching it.
        "timeout": SETTINGS.request_timeout_s + 30,
    },
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

        from phiops.serve.engine import Engine

        self._ready = False
        self.settings = SETTINGS
        self.metrics = _Metrics()
        stored = self.model_ref
        self.model_tag = str(stored.tag)
        self.model_created = int(stored.info.creation_time.timestamp())
        meta = dict(stored.info.metadata or {})
        self.lineage = lineage(meta)
        path = stored.path_of(CHECKPOINT_SUBDIR)
        if not os.path.isdir(path) or not any(n.endswith(".safetensors") for n in os.listdir(path)):
            raise RuntimeError(f"{self.model_tag}: no safetensors checkpoint at {path}")
        t0 = time.perf_counter()
        verify_checkpoint(path, (meta.get("phiops") or {}).get("files"), self.model_tag)
        log.info("%s: checkpoint matches its sha256 manifest (%.1fs)", self.model_tag, time.perf_counter() - t0)

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = pick_dtype(self.settings.dtype, self.device)
        dtype = getattr(torch, self.dtype)
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
        log.info("loaded %s on %s (%s) in %.1fs", self.model_tag, self.device, self.dtype, time.perf_counter() - t0)
        solo = self._cuda_fastpath() if self.device == "cuda" else None

        def on_step(phase: str, rows: int, new_tokens: int) -> None:
            self.metrics.forward.labels(phase).inc()
            self.metrics.batch.labels(phase).observe(rows)
            self.metrics.generated.inc(new_tokens)

        self.engine = Engine(self.model, self.tokenizer, self.eos_ids, self.device,
                             max_batch_size=self.settings.max_batch_size,
                             max_wait_ms=self.settings.max_batch_wait_ms, on_step=on_step, solo=solo)
        _DurationMiddleware.metrics = self.metrics

        t0 = time.perf_counter()
        prompt = self._encode_chat([ChatMessage(role="user", content="Hello")])
        self._warmup(prompt)
        log.info("warm-up generation done in %.2fs; ready", time.perf_counter() - t0)
        self._ready = True

    def _cuda_fastpath(self) -> Any:
        """Int4 kernels for W4A16 layers and the solo-request decoder (module doc); None when off."""
        if os.environ.get("PHIOPS_CUDA_FASTPATH", "1") == "0":
            return None
        from phiops.serve.decode import (
            FusedDecoder,
            GraphDecoder,
            fused_unsupported,
            int4_linears,
            sliding_window,
        )

        swapped = int4_linears(self.model, self.device)
        if swapped:
            log.info("%d W4A16 linear layers run on the int4 weight-only kernel", swapped)
        max_len = self.settings.max_prompt_tokens + self.settings.max_new_tokens
        # Longer than the sliding window: those requests take the batched (dynamic cache) path.
        max_len = min(max_len, sliding_window(self.model) or max_len)
        reason = fused_unsupported(self.model)
        if reason is None:
            log.info("a lone request decodes through the Triton kernels (FusedDecoder)")
            return FusedDecoder(self.model, max_len, self.device)
        log.info("a lone request decodes through the compiled step (GraphDecoder): no Triton kernels for %s", reason)
        return GraphDecoder(self.model, max_len, self.device)

    def _warmup(self, prompt: list[int]) -> None:
        import threading

        from phiops.serve.engine import Request

        done, errors = threading.Event(), []

        def emit(ev: Any) -> None:
            if ev.error:
                errors.append(ev.error)
            if ev.finish_reason or ev.error:
                done.set()

        self.engine.submit(Request(prompt=prompt, max_new_tokens=WARMUP_TOKENS, emit=emit))
        if not done.wait(600) or errors:
            raise RuntimeError(f"{self.model_tag}: warm-up generation failed: {errors or 'timed out'}")
        self.metrics.prompt.inc(len(prompt))

    def __is_ready__(self) -> bool:
        return self._ready and self.engine.alive()

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
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

    def _cap(self, req: _GenerationParams) -> int:
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
        if name not in (self.settings.served_model_name, self.model_tag):
            raise self._refuse("unknown_model", APIError(
                404, "the requested model is not served here; see GET /v1/models",
                param="model", code="model_not_found"))

    # ---- generation ----------------------------------------------------------------------------

    def _submit(self, prompt: list[int], body: _GenerationParams, max_new: int) -> tuple[Any, asyncio.Queue]:
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

    async def _complete(self, prompt: list[int], body: _GenerationParams, max_new: int) -> tuple[str, int, str]:
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

    async def _stream(self, prompt: list[int], body: _GenerationParams, max_new: int,
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
                    yield _sse(opening)
                while True:
                    if ev.error:
                        log.error("generation failed: %s", ev.error)
                        yield _sse({"error": {"message": ev.error, "type": "server_error", "param": None,
                                              "code": None}})
                        break
                    if ev.text:
                        yield _sse(make_chunk(ev.text, None, False))
                    if ev.finish_reason:
                        n_out = ev.completion_tokens
                        yield _sse(make_chunk(None, ev.finish_reason, False))
                        if usage_chunk is not None:
                            yield _sse(usage_chunk({"prompt_tokens": len(prompt), "completion_tokens": n_out,
                                                    "total_tokens": len(prompt) + n_out}))
                        break
                    try:
                        async with asyncio.timeout_at(deadline):
                            ev = await events.get()
                    except TimeoutError:
                        yield _sse({"error": {"message": self._timeout().message, "type": "timeout_error",
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
                "lineage": self.lineage,
            }],
        }

    @app.post("/chat/completions", response_model=None)
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        return await self._guarded(self._chat(body))

    async def _chat(self, body: ChatCompletionRequest) -> Any:
        self._check_model(body.model)
        max_new = self._cap(body)
        # Off the event loop: templating and tokenizing a long prompt takes a while.
        prompt = await asyncio.to_thread(self._encode_chat, body.messages)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": _now(), "model": self.settings.served_model_name}
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

    @app.post("/completions", response_model=None)
    async def completions(self, body: CompletionRequest) -> Any:
        return await self._guarded(self._text_completion(body))

    async def _text_completion(self, body: CompletionRequest) -> Any:
        self._check_model(body.model)
        max_new = self._cap(body)
        prompt = await asyncio.to_thread(self._encode_text, body.text())
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": _now(), "model": self.settings.served_model_name}
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
