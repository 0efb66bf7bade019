"""An optional API key on the OpenAI routes: ``Authorization: Bearer <key>``.

The key comes from the environment (``PHIOPS_API_KEY``), never from the bento's arguments: a
bento is an artifact that is copied around, a key is a secret of one deployment. Unset, the
routes are open, and the service listens on 127.0.0.1 unless ``serve.host`` opens it
(``phiops.config.ServeCfg``). BentoML's own ``/livez``, ``/readyz`` and ``/metrics`` stay open:
probes and scrapers carry no key.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from fastapi.responses import JSONResponse

from phiops.serve.protocol import error_body

API_KEY_ENV = "PHIOPS_API_KEY"


def api_key(environ: Any = None) -> str | None:
    """The configured key, or None (open); blank counts as unset."""
    value = (os.environ if environ is None else environ).get(API_KEY_ENV, "").strip()
    return value or None


class ApiKeyMiddleware:
    """Refuses a request to the app it wraps without the right bearer token (401, OpenAI's shape)."""

    def __init__(self, app: Any, key: str | None = None) -> None:
        self.app = app
        self.key = (key if key is not None else api_key() or "").encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.key:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        if not hmac.compare_digest(given, self.key):  # constant time: no key guessing by timing
            resp = JSONResponse(error_body("missing or wrong API key (Authorization: Bearer ...)",
                                           code="invalid_api_key"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        await self.app(scope, receive, send)
