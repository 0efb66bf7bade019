"""Shared fixtures. Tiers: unit (no model), integration (tiny random models), e2e (whole flow)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Offline by construction: nothing may reach a model hub during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
# The temporary Prefect servers of `phiops run` and of this process (tests that run a flow in
# process start Prefect's own, which lives until the session ends) get the same defaults.
from phiops.prefect_api import TEMPORARY_SERVER_ENV  # noqa: E402

for _key, _value in TEMPORARY_SERVER_ENV.items():
    os.environ.setdefault(_key, _value)
# Prefect's temporary server logs its shutdown at interpreter exit, after pytest has closed the
# streams ("I/O operation on closed file"); tests read no Prefect INFO logs.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Tests that talk to Prefect without a server start its temporary one; under CI's load its start
# took longer than Prefect's 20 s default (the same default `phiops run` raises, see cli.py).
from phiops.cli import EPHEMERAL_STARTUP_TIMEOUT_S  # noqa: E402
from phiops.procs import lean_gc  # noqa: E402

# This process imports the whole stack and loads many tiny models: the CLI's GC policy
# (bench/process_gc.py) spares it most full collections of a heap that mostly only grows.
lean_gc()

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S)

# Without a GPU the Triton kernels (phiops/serve/kernels.py) run under Triton's interpreter.
# It must be chosen before anything imports triton (torch.compile does, in other tests).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = {
    # vocab_size matches the embedded tokenizer so real chat-formatted data can be used.
    "llama": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    },
    "phi3": {
        "model_type": "phi3", "vocab_size": 49152, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "original_max_position_embeddings": 512,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False,
    },
    "phi": {
        "model_type": "phi", "vocab_size": 49152, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 512, "partial_rotary_factor": 0.5,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    },
}


@pytest.fixture(scope="session")
def builtin_model() -> Path:
    """The embedded SmolLM2 checkpoint (built once per cache; its tokenizer serves tiny models)."""
    from phiops.models import ensure_builtin

    return ensure_builtin()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, builtin_model) -> dict[str, Path]:
    """Random-weight checkpoints of each architecture, seconds to build."""
    from phiops.models import tiny_random

    root = tmp_path_factory.mktemp("tiny")
    return {name: tiny_random(arch, root / name, tokenizer_from=builtin_model) for name, arch in TINY.items()}


@pytest.fixture
def git_dvc_project(tmp_path, monkeypatch) -> Callable[..., Path]:
    """Makes ``tmp_path/<name>`` (default ``proj``): git + DVC, the given dvc.yaml and files, all in one commit.

    HOME is the test's own (no global git identity: the registry's fallback is exercised) and
    this interpreter's bin comes first on PATH (the stages' ``python``, ``dvc``).
    """
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def make(dvc_yaml: str, files: dict[str, str] | None = None, dirs: tuple[str, ...] = (), name: str = "proj") -> Path:
        proj = tmp_path / name
        proj.mkdir()
        for cmd in (("git", "init", "-q"), ("dvc", "init", "-q")):
            subprocess.run(cmd, cwd=proj, check=True, capture_output=True)
        (proj / "dvc.yaml").write_text(dvc_yaml)
        (proj / "params.yaml").write_text("registry: {artifact: phiops-model}\n")
        for rel, text in (files or {}).items():
            (proj / rel).write_text(text)
        for rel in dirs:
            (proj / rel).mkdir(parents=True)
        for cmd in (("git", "add", "-A"), ("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline")):
            subprocess.run(cmd, cwd=proj, check=True, capture_output=True)
        return proj

    return make


@pytest.fixture(scope="session")
def tiny_configs() -> dict[str, dict[str, Any]]:
    """The tiny architectures above, for tests that build their own model."""
    return TINY


@pytest.fixture(scope="session")
def greedy_reference() -> Callable[..., tuple[list[int], list[Any]]]:
    """The greedy reference below, as a fixture: a test module cannot import it by name, since
    `conftest` in sys.modules is whichever tier's conftest pytest imported last."""
    return _greedy_reference


def _greedy_reference(model: Any, prompt: list[int], n: int, device: str = "cpu") -> tuple[list[int], list[Any]]:
    """Greedy tokens and last-position logits from the plain forward over a DynamicCache (what
    generate does): the reference the decoders and the int4 layers are held to."""
    from transformers import DynamicCache

    cache, tokens, logits = DynamicCache(), [], []
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        for _ in range(n):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1].float())
            ids = out.logits[:, -1:].argmax(-1)
            tokens.append(int(ids))
    return tokens, logits


@pytest.fixture
def kernels() -> Any:
    """phiops.serve.kernels; without CUDA under Triton's interpreter (turned on above), on ``kernels.DEVICE``."""
    pytest.importorskip("triton")
    from phiops.serve import kernels as phiops_kernels

    assert phiops_kernels.INTERPRET == (not torch.cuda.is_available())
    return phiops_kernels

