"""phiops LLM service: BentoML's routes mapped onto ``phiops.serve`` (the logic lives there).

Routes (a FastAPI app mounted at ``/v1``; BentoML adds ``/livez``, ``/readyz``, ``/metrics``):

- ``POST /v1/chat/completions`` and ``POST /v1/completions``: JSON, or server-sent events with
  ``stream: true`` (``phiops.serve.openai_serving``; the accepted fields: ``phiops.serve.protocol``).
- ``GET /v1/models`` and ``GET /v1/models/{id}``: the served model with its lineage (registry
  version, data hash, git rev).
- ``GET /readyz``: 200 only after the checkpoint matched its sha256 manifest, the model loaded
  and one warm-up generation ran through the batching engine (``phiops.serve.engine``).
- ``GET /metrics``: BentoML's request metrics plus ``phiops_*`` (``phiops.serve.observability``).

The model and the limits are bento arguments baked by ``phiops.bento.build`` from
``params.yaml``'s ``serve`` section, and ``PHIOPS_*`` variables retune a built bento
(``phiops.serve.settings``). A request beyond ``max_concurrency`` in flight is a 429 (BentoML's
concurrency middleware, which leaves the health routes and ``/metrics`` alone), in OpenAI's error
shape with ``Retry-After`` (``phiops.serve.bentoml_compat``). The server listens on ``serve.host``
(127.0.0.1 unless configured); ``PHIOPS_API_KEY`` set, the ``/v1`` routes want it as a bearer token.

Importing this module loads no torch (``bentoml build`` imports it to find the service); the
model loads when the service starts. The bento carries ``phiops`` as a wheel.
"""

from typing import Any

import bentoml
from fastapi import FastAPI, Request

from phiops.serve import bentoml_compat
from phiops.serve.auth import ApiKeyMiddleware
from phiops.serve.checkpoint import IntegrityError
from phiops.serve.loader import cap_kernel_caches, load_stored
from phiops.serve.observability import DurationMiddleware, Metrics
from phiops.serve.openai_serving import OpenAIServing
from phiops.serve.protocol import ChatCompletionRequest, CompletionRequest, add_error_handlers, add_fallback_route
from phiops.serve.settings import ServiceArgs, resolve

cap_kernel_caches()  # before torch's first bf16 matmul
bentoml_compat.cancel_request_timers()
bentoml_compat.openai_shaped_overload()
SETTINGS = resolve(bentoml.use_arguments(ServiceArgs))

app = FastAPI(title="phiops OpenAI-compatible API", version="1")
add_error_handlers(app)
app.add_middleware(ApiKeyMiddleware)  # inside DurationMiddleware: a 401 is timed too
app.add_middleware(DurationMiddleware)


@bentoml.service(
    name="PhiOpsLLM",
    description="OpenAI-compatible completions over one phiops causal LM, continuously batched.",
    workers=1,  # one model copy per replica; its engine batches every request of the replica
    http={"host": SETTINGS.host},
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
        self._ready = False
        self.metrics = Metrics()
        DurationMiddleware.metrics = self.metrics
        try:
            loaded = load_stored(self.model_ref, SETTINGS)
        except IntegrityError as exc:
            bentoml_compat.stop_server(str(exc))  # no restart loop: a restart cannot repair the files
            raise
        self.serving = OpenAIServing(loaded, SETTINGS, self.metrics)
        self._ready = True

    def __is_ready__(self) -> bool:
        return self._ready and self.serving.alive()

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.serving.close()

    @app.get("/models")
    async def list_models(self) -> dict[str, Any]:
        return self.serving.models()

    @app.get("/models/{model_id:path}")
    async def get_model(self, model_id: str) -> dict[str, Any]:
        return self.serving.model(model_id)

    @app.post("/chat/completions", response_model=None)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        return await self.serving.chat(body, request)

    @app.post("/completions", response_model=None)
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        return await self.serving.completion(body, request)


add_fallback_route(app)  # after the routes above: any other /v1 path is an OpenAI-shaped 404
