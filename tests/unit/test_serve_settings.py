"""phiops.serve.settings: the service's limits are ServeCfg's, overridable from the environment."""

from __future__ import annotations

import pytest

from phiops.config import ServeCfg
from phiops.serve.settings import ServiceArgs, env_name, resolve


def test_defaults_are_servecfg_and_the_tag_names_the_model() -> None:
    s = resolve(ServiceArgs(model_tag="m:v1"), environ={})
    assert s.model_tag == "m:v1" and s.served_model_name == "m"
    assert {k: getattr(s, k) for k in ServeCfg.model_fields} == ServeCfg().model_dump()


def test_baked_arguments_then_environment_win() -> None:
    args = ServiceArgs(model_tag="m:v1", served_model_name="served", max_new_tokens=16, dtype="float32")
    s = resolve(args, environ={"PHIOPS_MAX_BATCH_SIZE": "4", "PHIOPS_DTYPE": "bfloat16", "PHIOPS_SERVED_MODEL": "x"})
    assert (s.max_new_tokens, s.max_batch_size, s.dtype, s.served_model_name) == (16, 4, "bfloat16", "x")
    # The model tag is baked: the variable is only a fallback.
    assert resolve(args, environ={"PHIOPS_MODEL_TAG": "other:v9"}).model_tag == "m:v1"
    assert resolve(ServiceArgs(), environ={"PHIOPS_MODEL_TAG": "other:v9"}).model_tag == "other:v9"


@pytest.mark.parametrize(("var", "value", "rule"), [
    ("PHIOPS_MAX_NEW_TOKENS", "0", "greater than or equal to 1"),
    ("PHIOPS_MAX_CONCURRENCY", "ten", "valid integer"),
    ("PHIOPS_DTYPE", "float16", "'auto', 'float32' or 'bfloat16'"),
])
def test_a_bad_override_names_the_variable_and_the_rule(var: str, value: str, rule: str) -> None:
    with pytest.raises(RuntimeError, match="invalid serving settings") as err:
        resolve(ServiceArgs(model_tag="m:v1"), environ={var: value})
    assert f"{var}={value!r}" in str(err.value) and rule in str(err.value)


def test_every_limit_has_an_override_and_no_model_is_an_error() -> None:
    assert [env_name(f) for f in ServeCfg.model_fields] == [
        "PHIOPS_MAX_NEW_TOKENS", "PHIOPS_MAX_PROMPT_TOKENS", "PHIOPS_MAX_CONCURRENCY", "PHIOPS_REQUEST_TIMEOUT_S",
        "PHIOPS_MAX_BATCH_SIZE", "PHIOPS_MAX_BATCH_WAIT_MS", "PHIOPS_KV_CACHE_FRACTION", "PHIOPS_PREFILL_CHUNK_TOKENS",
        "PHIOPS_DTYPE", "PHIOPS_MAX_N",
        "PHIOPS_QUEUE_WAIT_BUDGET_S", "PHIOPS_HOST"]
    with pytest.raises(RuntimeError, match="no model to serve"):
        resolve(ServiceArgs(), environ={})
    with pytest.raises(Exception, match="extra"):  # a misspelt bento argument is refused
        ServiceArgs(model_tag="m:v1", max_new_tokns=3)
