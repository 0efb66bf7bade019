"""Serving: one causal LM behind an OpenAI-compatible API, continuously batched.

The modules, from the wire inwards (the layering of vLLM's ``entrypoints/openai``):

- ``protocol``: the OpenAI request models and error bodies; a bad request is refused here.
- ``openai_serving``: turns a validated request into engine calls and engine events into
  OpenAI responses (JSON or server-sent events); knows nothing of BentoML.
- ``engine``: the continuous batcher (one thread owns the model); ``decode`` and ``kernels``:
  the CUDA fast paths for a lone request.
- ``loader``: verify the stored checkpoint, load it, pick the dtype and decoder.
- ``settings``: which model and the limits (``phiops.config.ServeCfg``, the one schema).
- ``observability``: the ``phiops_*`` Prometheus series; ``bentoml_compat``: the one patch of
  BentoML we need; ``client``: serve a bento locally and ask it.

``services/service.py`` only maps BentoML's routes onto ``openai_serving``. Importing this
package (or ``settings``/``protocol``) loads no torch: ``bentoml build`` imports the service to
find it, and torch loads when the service starts.
"""
