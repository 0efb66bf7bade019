"""The OpenAI wire schema served (request models, error bodies), apart from any engine.

Every field OpenAI defines for the two routes is named here, in one of three kinds (README,
"Compatibility"): supported; accepted and ignored (with the reason beside it); or refused with a
400 that names the field and says it is not supported (``tools``, images, audio, ...). A field
OpenAI does not define is a 400 too, never silently ignored.

Types are strict: an integer field takes a JSON integer only (``"10"``, ``10.0`` and ``true`` are
refused), a boolean field a JSON boolean. A bad request is refused here, before any model
compute; error messages state the rule broken and never quote request content, not even the
name of an unknown field (a client's key is client text).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

INT64 = 2**63  # seeds: OpenAI documents a 64-bit integer
MAX_N = 128  # the protocol's bound on `n`; the service's own (ServeCfg.max_n) is checked in serving

Int = StrictInt
Bool = StrictBool
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


def _unsupported(what: str) -> Any:
    """A field validator refusing any value but null/empty for a field this service cannot honour."""

    def check(cls: Any, v: Any) -> Any:
        if v is None or v == [] or v == {}:
            return None
        raise ValueError(f"{what} is not supported by this service")

    return check


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


_PART_KINDS = {"image_url": "images are", "input_audio": "audio input is", "file": "file inputs are",
               "refusal": "refusal parts are"}


class ChatMessage(_Strict):
    # developer: newer clients' name for system (mapped to system for the chat template)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)  # accepted; chat templates do not render it
    # assistant messages from tool-using conversations: refused, naming the field
    tool_calls: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None

    _no_tool_calls = field_validator("tool_calls", "function_call")(classmethod(_unsupported("tool calling")))
    _no_refusal = field_validator("refusal")(classmethod(_unsupported("refusal")))
    _no_audio = field_validator("audio")(classmethod(_unsupported("audio")))

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in _PART_KINDS:
                    raise ValueError(f"{_PART_KINDS[kind]} not supported by this service (text only)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _roles(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("role") in ("tool", "function"):
            raise ValueError("tool and function messages are not supported by this service")
        return v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: Bool = False
    include_obfuscation: Bool | None = None  # accepted, ignored: nothing to obfuscate on a local service


class JSONSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: Bool | None = None  # the grammar always holds the output to the schema


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self


class GenerationParams(_Strict):
    """The sampling and output fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str = Field(min_length=1, max_length=256)
    # Optional fields also accept an explicit null (some clients send one) meaning "default".
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: 1.0, as OpenAI
    top_p: float | None = Field(None, gt=0.0, le=1.0)  # None: 1.0
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=-INT64, lt=INT64)
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    n: Int | None = Field(None, ge=1, le=MAX_N)  # up to the service's max_n (checked in serving)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # accepted, ignored: identifiers for abuse tracking and billing, nothing to track here
    user: str | None = Field(None, max_length=256)
    # refused: not something this service can honour
    logit_bias: Any = None

    _no_logit_bias = field_validator("logit_bias")(classmethod(_unsupported("logit_bias")))

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

    def choices(self) -> int:
        return self.n or 1

    def top_logprobs_asked(self) -> int | None:
        """None: no log-probabilities; k: the sampled token's and the top k."""
        return None

    @property
    def temp(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    @property
    def nucleus(self) -> float:
        return 1.0 if self.top_p is None else self.top_p


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    # Newer OpenAI clients send this name instead of max_tokens; it wins when both are given.
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # accepted, ignored (README, Compatibility): nothing is stored, one tier, no cache to key
    store: Bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = Field(None, max_length=32)
    prompt_cache_key: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    modalities: list[Literal["text"]] | None = None  # text is the only output modality
    # refused
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None

    _no_tools = field_validator("tools", "tool_choice", "functions", "function_call",
                                "parallel_tool_calls")(classmethod(_unsupported("tool calling")))
    _no_audio = field_validator("audio")(classmethod(_unsupported("audio output")))
    _no_prediction = field_validator("prediction")(classmethod(_unsupported("predicted output")))
    _no_search = field_validator("web_search_options")(classmethod(_unsupported("web search")))
    _no_reasoning = field_validator("reasoning_effort", "verbosity")(classmethod(_unsupported("this option (reasoning models only)")))

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def asked_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class CompletionRequest(GenerationParams):
    # One prompt: text or token ids (lm-evaluation-harness sends ids); a list must hold exactly one.
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(min_length=1)
    echo: Bool | None = False  # the prompt before the completion (with logprobs: scored, token by token)
    logprobs: Int | None = Field(None, ge=0, le=5)
    best_of: Int | None = Field(None, ge=1)  # only best_of == n (the default) is served
    suffix: Any = None

    _no_suffix = field_validator("suffix")(classmethod(_unsupported("suffix (insertion)")))

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)) and len(v) != 1:
            raise ValueError("exactly one prompt per request is served")
        if isinstance(v, list) and v and isinstance(v[0], list) and not v[0]:
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.choices():
            raise ValueError("best_of other than n is not supported by this service")
        return self

    def text(self) -> str | list[int]:
        """The one prompt: its text, or its token ids."""
        p = self.prompt
        if isinstance(p, str):
            return p
        return p[0] if isinstance(p[0], (str, list)) else list(p)  # type: ignore[return-value]

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


# Every name the schemas define: an error location shows only these (anything else in a location
# is a client's key, and is never echoed).
_KNOWN = {name for model in (ChatCompletionRequest, CompletionRequest, ChatMessage, TextPart, StreamOptions,
                             ResponseFormat, JSONSchemaFormat) for name in model.model_fields} | {"schema", "body"}


class APIError(Exception):
    """An OpenAI-style error response; the message never quotes request content."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, kind=self.kind,
                              headers=self.headers)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, param=self.param, code=self.code, kind=self.kind)


def error_body(message: str, *, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, param=param, code=code, kind=kind), status_code=status, headers=headers)


def _loc(parts: tuple[Any, ...]) -> str:
    # Only the schema's own names and list indices are shown: any other key in a location is
    # the client's (an unknown field, a metadata key), and an error body never reflects client text.
    shown: list[str] = []
    for p in parts:
        if isinstance(p, int):
            shown.append(str(p))
        elif str(p) in _KNOWN:
            shown.append(str(p))
        elif "[" in str(p) or "-" in str(p):  # pydantic's union-branch labels, e.g. list[TextPart]
            continue
        else:
            shown.append("?")
    if shown and shown[0] == "body":
        shown = shown[1:]
    return ".".join(shown) or "body"


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, first = [], None
    for err in exc.errors():
        loc_parts = tuple(err.get("loc", ()))
        if err.get("type") == "extra_forbidden":  # the last part is the unknown key itself
            loc_parts = loc_parts[:-1]
        loc = "body" if err.get("type") == "json_invalid" else _loc(loc_parts)
        first = first or loc
        if err.get("type") == "json_invalid":
            problems.append("body: not valid JSON")
        elif err.get("type") == "extra_forbidden":
            problems.append(f"{loc}: has a field this service does not know (README, Compatibility)")
        else:
            # pydantic's `msg` states the rule ("Input should be ..."), never the input itself;
            # the `input` entry is dropped on purpose.
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
    # one line per problem, without repeats (a union reports each branch)
    problems = list(dict.fromkeys(problems))
    return "; ".join(problems[:10]) or "invalid request", first



def add_error_handlers(app: FastAPI) -> None:
    """Every error the app returns, in OpenAI's ``{"error": {...}}`` shape."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(exc)
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own details ("Not Found", "Method Not Allowed") name no request content.
        return error_response(exc.status_code, str(exc.detail), kind="invalid_request_error",
                              code="not_found" if exc.status_code == 404 else None,
                              headers=getattr(exc, "headers", None))


def add_fallback_route(app: FastAPI) -> None:
    """Any other path under the app: a 404 in OpenAI's shape (call after the last route is added).

    BentoML mounts the app passively: a path no route of the app matches falls through to
    BentoML's own router, whose 404 is plain text.
    """

    @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def _not_found(rest: str) -> JSONResponse:
        return error_response(404, "no such route; this service serves /v1/chat/completions, /v1/completions, "
                              "/v1/models", code="not_found")


def now() -> int:
    return int(time.time())


def sse(data: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
