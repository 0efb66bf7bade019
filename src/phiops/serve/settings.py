"""Which model the service serves, and its limits: ``phiops.config.ServeCfg``, the one schema.

A bento carries its settings as *bento arguments* (``bentoml build --arg-file``, written by
``phiops.bento.build`` from ``params.yaml``'s ``serve`` section); an operator retunes a built bento
without rebuilding it through ``PHIOPS_<FIELD>`` environment variables, which win:

==================  ======================  ===============================
setting             bento argument          environment override
==================  ======================  ===============================
model tag           ``model_tag``           ``PHIOPS_MODEL_TAG`` [1]_
served model name   ``served_model_name``   ``PHIOPS_SERVED_MODEL``
every limit         its ``ServeCfg`` name   ``PHIOPS_`` + its name, upper case
==================  ======================  ===============================

(``PHIOPS_MAX_NEW_TOKENS``, ``PHIOPS_MAX_PROMPT_TOKENS``, ``PHIOPS_MAX_CONCURRENCY``,
``PHIOPS_REQUEST_TIMEOUT_S``, ``PHIOPS_MAX_BATCH_SIZE``, ``PHIOPS_MAX_BATCH_WAIT_MS``,
``PHIOPS_KV_CACHE_FRACTION``, ``PHIOPS_PREFILL_CHUNK_TOKENS``, ``PHIOPS_DTYPE``, ...;
each is validated by ``ServeCfg``'s own rules.)

.. [1] The model tag is the one exception to "environment wins": a bento carries exactly the
   model named by its ``model_tag`` argument, so the variable is only a fallback for serving
   from source (``bentoml serve service:PhiOpsLLM`` in ``services/``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import ConfigDict, ValidationError

from phiops.config import ServeCfg

ENV_PREFIX = "PHIOPS_"


class ServiceArgs(ServeCfg):
    """The bento arguments: the model, and every limit under its ``ServeCfg`` name."""

    model_config = ConfigDict(protected_namespaces=())

    model_tag: str | None = None
    served_model_name: str | None = None


class Settings(ServeCfg):
    """The resolved settings of one running service (limits validated by ``ServeCfg``)."""

    model_config = ConfigDict(protected_namespaces=())

    model_tag: str
    served_model_name: str


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def resolve(args: ServiceArgs, environ: Mapping[str, str] | None = None) -> Settings:
    """The service's settings from its bento arguments and the environment (module doc).

    Args:
        args: the bento arguments (``bentoml.use_arguments(ServiceArgs)``).
        environ: the environment (default ``os.environ``).

    Returns:
        The settings; every limit checked by ``ServeCfg``'s rules.

    Raises:
        RuntimeError: no model tag is configured, or a value breaks a rule (names the variable
            or argument, and the rule).
    """
    env = os.environ if environ is None else environ
    tag = args.model_tag or env.get("PHIOPS_MODEL_TAG")
    if not tag:
        raise RuntimeError(
            "no model to serve: build with phiops.bento.build (which bakes --arg model_tag into "
            "the bento) or, serving from source, pass --arg model_tag=NAME:VERSION or set "
            "PHIOPS_MODEL_TAG"
        )
    values = {name: getattr(args, name) for name in ServeCfg.model_fields}
    from_env = {name: env[env_name(name)] for name in ServeCfg.model_fields if env.get(env_name(name))}
    try:
        return Settings(
            model_tag=tag,
            served_model_name=env.get("PHIOPS_SERVED_MODEL") or args.served_model_name or tag.split(":", 1)[0],
            **{**values, **from_env},
        )
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            where = f"{env_name(field)}={from_env[field]!r}" if field in from_env else f"bento argument {field}"
            problems.append(f"{where}: {err['msg']}")
        raise RuntimeError("invalid serving settings: " + "; ".join(problems)) from None
