"""The OpenAI wire schema served (request models, error bodies), apart from any engine.

Unknown fields are a 400, never silently ignored. A bad request is refused here, before any
model compute; error messages state the rule broken and never quote request content (an
unknown field's name is shown only when it looks like an identifier).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

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


class GenerationParams(_Strict):
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


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    # Newer OpenAI clients send this name instead of max_tokens; it wins when both are given.
    max_completion_tokens: int | None = Field(None, ge=1)

    def asked_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(GenerationParams):
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
        return error_response(self.status, self.message, param=self.param, code=self.code, kind=self.kind)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
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


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
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
        return error_response(exc.status_code, str(exc.detail), kind="invalid_request_error")


def now() -> int:
    return int(time.time())


def sse(data: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
