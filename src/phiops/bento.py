"""Package a promoted checkpoint for serving with BentoML, and ask the served model.

Three steps, each usable alone:

1. :func:`save_model` copies a safetensors checkpoint directory into the BentoML model store as
   ``name:version`` (the files under ``checkpoint/``, their sha256 in the model's metadata).
2. :func:`build` builds the bento of ``services/`` (service.py + bentofile.yaml) with that model.
   The model tag and serving limits are *bento arguments*: stored in the bento's bento.yaml and
   restored by every ``bentoml serve`` of it, in or out of a container, so the service always
   loads exactly the model the bento carries.
3. :func:`serving` / :func:`ask` run ``bentoml serve <bento>`` on a free localhost port and
   query its OpenAI-compatible ``/v1/chat/completions``.

Stores live under ``$BENTOML_HOME`` (default ``~/bentoml``), read at each call, so a test
that points it at a temporary directory never touches the user's stores. Building and
serving run the ``bentoml`` CLI in a subprocess: it resolves ``$BENTOML_HOME`` afresh, keeps
the service's heavy imports out of this process, and is the same path an operator uses.

A Docker engine is never needed: :func:`containerize_command` gives the command to run where
one exists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from phiops.io import dir_manifest, sha256_file
from phiops.models import ModelError, check_safetensors

log = logging.getLogger(__name__)

# Weights are loaded only from safetensors; pickle-format files never enter the model store
# (a bento is shipped to other machines, where loading a pickle would run arbitrary code).
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
CHECKPOINT_SUBDIR = "checkpoint"  # inside the stored model; services/service.py reads the same
_META_KEY = "phiops"  # reserved key of the stored model's metadata
_TAG_OUT = re.compile(r"__tag__:(\S+)")


class BentoError(RuntimeError):
    """The model store, a build or a served bento is not in the expected state."""


# --------------------------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------------------------


def bentoml_home() -> Path:
    """The BentoML home in effect: ``$BENTOML_HOME`` if set, else ``~/bentoml``."""
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser()


def _model_store() -> Any:
    # An explicit store instead of BentoML's process-wide default: that one is fixed the first
    # time any store is touched, so a later change of $BENTOML_HOME (tests) would be ignored.
    from bentoml._internal.models import ModelStore

    path = bentoml_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(path))


def _bento_store() -> Any:
    from bentoml._internal.bento import BentoStore

    path = bentoml_home() / "bentos"
    path.mkdir(parents=True, exist_ok=True)
    return BentoStore(str(path))


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["BENTOML_HOME"] = str(bentoml_home())
    # Usage tracking phones home; this machine has no internet, and a pipeline shouldn't.
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    return env


def _bentoml_cli() -> list[str]:
    return [sys.executable, "-m", "bentoml"]


# --------------------------------------------------------------------------------------------
# save_model
# --------------------------------------------------------------------------------------------


def _checkpoint_files(model_dir: Path) -> list[Path]:
    files, skipped = [], []
    for p in sorted(model_dir.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix.lower() in _PICKLE_SUFFIXES:
            skipped.append(str(p.relative_to(model_dir)))
            continue
        files.append(p)
    if skipped:
        log.warning("%s: not storing pickle-format files %s (only safetensors are loaded)", model_dir, skipped)
    return files


def save_model(model_dir: Path, name: str, version: str, metadata: dict[str, Any]) -> str:
    """Copy a safetensors checkpoint directory into the BentoML model store as ``name:version``.

    The files land under ``checkpoint/`` of the stored model; their sha256 manifest is kept in
    the model's metadata under the reserved key ``"phiops"`` (``{"format", "files"}``), next to
    the caller's ``metadata``. Pickle-format files (``*.bin``, ``*.pt``...) are left out.

    Idempotent: if ``name:version`` already exists and its stored files match both its recorded
    manifest and ``model_dir``, nothing is copied and the tag is returned.

    Args:
        model_dir: checkpoint directory (config.json, *.safetensors, tokenizer files; a
            compressed-tensors W4A16 checkpoint is the same shape).
        name: BentoML model name (lowercase letters, digits, ``-``, ``_``, ``.``).
        version: model version (same alphabet), e.g. the registry version.
        metadata: JSON-serialisable facts to keep with the model (metrics, lineage...).

    Returns:
        The tag, ``"name:version"``.

    Raises:
        ModelError: ``model_dir`` is not a directory holding ``*.safetensors`` weights.
        ValueError: bad name/version, metadata not JSON-serialisable or using key ``"phiops"``.
        BentoError: the tag exists with different files, or its stored files are damaged
            (delete it with ``bentoml models delete name:version`` and save again).
    """
    import bentoml
    from bentoml._internal.tag import Tag
    from bentoml.exceptions import NotFound

    model_dir = Path(model_dir)
    check_safetensors(model_dir)
    if _META_KEY in metadata:
        raise ValueError(f"metadata key {_META_KEY!r} is reserved for phiops' file manifest")
    try:
        user_meta = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
    if name != name.lower() or version != version.lower():
        # BentoML would lowercase silently; a tag must be what the caller recorded elsewhere.
        raise ValueError(f"invalid model tag {name}:{version}: use lowercase")
    try:
        tag = Tag(name, version)
    except Exception as exc:  # bentoml's own ValueError subclass; its message says the rule
        raise ValueError(f"invalid model tag {name}:{version}: {exc}") from None

    files = _checkpoint_files(model_dir)
    manifest = {str(p.relative_to(model_dir)): sha256_file(p) for p in files}
    store = _model_store()

    try:
        existing = store.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        recorded = (existing.info.metadata.get(_META_KEY) or {}).get("files")
        if recorded != manifest:
            raise BentoError(
                f"model {tag} already exists in {bentoml_home()} with different files than {model_dir}; "
                "a version is immutable: save under a new version"
            )
        actual = dir_manifest(Path(existing.path_of(CHECKPOINT_SUBDIR)))
        if actual != recorded:
            raise BentoError(
                f"model {tag} in {bentoml_home()} is damaged (files differ from its manifest); "
                f"run `bentoml models delete {tag} -y` and save it again"
            )
        log.info("model %s already in the store with identical files", tag)
        return str(tag)

    meta = {**user_meta, _META_KEY: {"format": "hf-safetensors", "files": manifest}}
    with bentoml.models.create(tag, labels={"project": "phiops"}, metadata=meta, _model_store=store) as model:
        dest = Path(model.path_of(CHECKPOINT_SUBDIR))
        for src, rel in zip(files, manifest):
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
        copied = dir_manifest(dest)
        if copied != manifest:  # a copy must never silently differ from what was recorded
            raise BentoError(f"copy of {model_dir} into the model store does not match its sha256 manifest")
    log.info("saved %s (%d files) to %s", tag, len(files), bentoml_home() / "models")
    return str(tag)


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------


def containerize_command(bento_tag: str) -> list[str]:
    """The command that turns a built bento into an OCI image (needs a Docker engine)."""
    return ["bentoml", "containerize", bento_tag]


def _bento_name(bentofile: Path) -> str:
    data = yaml.safe_load(bentofile.read_text(encoding="utf-8")) or {}
    name = data.get("name")
    if not name:
        raise BentoError(f"{bentofile}: no `name`; phiops needs a fixed bento name")
    return str(name)


def build(
    model_tag: str,
    version: str,
    *,
    service_dir: Path,
    served_model_name: str | None = None,
    max_new_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    max_concurrency: int | None = None,
    request_timeout_s: int | None = None,
    max_batch_size: int | None = None,
    max_batch_wait_ms: int | None = None,
    dtype: str | None = None,
    lock_packages: bool = True,
    timeout: float = 1800,
) -> str:
    """Build the bento of ``service_dir`` serving ``model_tag``, as ``<bento name>:<version>``.

    Runs ``bentoml build <service_dir> -f <service_dir>/bentofile.yaml --version <version>
    --arg-file <args>``. The args file bakes the model tag (resolved to a concrete version) and
    the limits given here into the bento; omitted limits take the service defaults. Python
    packages are pinned in bentofile.yaml and, with ``lock_packages``, locked against PyPI by
    uv (needs the package index; the first build installs ``uv`` if missing). The docker
    section is kept, so ``bentoml containerize <tag>`` works wherever a Docker engine exists.

    Idempotent: if the bento tag exists and was built for the same model and limits, it is
    returned without rebuilding.

    Args:
        model_tag: a model in the store, e.g. from :func:`save_model` (``name:latest`` resolves
            to the concrete version before it is baked in).
        version: the bento version (typically the model's registry version).
        service_dir: the directory holding service.py and bentofile.yaml (``services/``).
        served_model_name: the ``model`` id clients send; default the model tag's name.
        max_new_tokens: cap on generated tokens per request; default the service's (128).
        max_prompt_tokens: cap on prompt tokens per request; default the service's (1024).
        max_concurrency, request_timeout_s, max_batch_size, max_batch_wait_ms, dtype: the
            service's other limits (``phiops.config.ServeCfg``; ``**cfg.serve.model_dump()`` passes
            them all); None keeps the service's default.
        lock_packages: lock the Python requirements with uv; False keeps the pins as written
            (faster; for tests and offline builds).
        timeout: seconds before the build subprocess is killed.

    Returns:
        The bento tag, ``"<name>:<version>"``.

    Raises:
        BentoError: the model is not in the store, the bento tag exists for another model, or
            ``bentoml build`` fails (its output tail is in the message).
    """
    from bentoml.exceptions import NotFound

    service_dir = Path(service_dir).resolve()
    bentofile = service_dir / "bentofile.yaml"
    if not (service_dir / "service.py").is_file() or not bentofile.is_file():
        raise BentoError(f"{service_dir}: expected service.py and bentofile.yaml")
    try:
        model = _model_store().get(model_tag)
    except NotFound:
        raise BentoError(f"model {model_tag} is not in the store at {bentoml_home()}; save_model first") from None
    args: dict[str, Any] = {"model_tag": str(model.tag)}
    if served_model_name is not None:
        args["served_model_name"] = served_model_name
    if max_new_tokens is not None:
        args["max_new_tokens"] = int(max_new_tokens)
    if max_prompt_tokens is not None:
        args["max_prompt_tokens"] = int(max_prompt_tokens)
    for key, value in (("max_concurrency", max_concurrency), ("request_timeout_s", request_timeout_s),
                       ("max_batch_size", max_batch_size), ("max_batch_wait_ms", max_batch_wait_ms)):
        if value is not None:
            args[key] = int(value)
    if dtype is not None:
        args["dtype"] = str(dtype)

    bento_tag = f"{_bento_name(bentofile)}:{version}"
    try:
        existing = _bento_store().get(bento_tag)
    except NotFound:
        existing = None
    if existing is not None:
        if dict(existing.info.args or {}) == args:
            log.info("bento %s already built for %s", bento_tag, model.tag)
            return bento_tag
        raise BentoError(
            f"bento {bento_tag} exists with arguments {existing.info.args}, not {args}; "
            "build under a new version (or `bentoml delete` it)"
        )

    with tempfile.TemporaryDirectory(prefix="phiops-bento-") as tmp:
        args_file = Path(tmp) / "args.yaml"
        args_file.write_text(yaml.safe_dump(args, sort_keys=True), encoding="utf-8")
        if not lock_packages:
            config = yaml.safe_load(bentofile.read_text(encoding="utf-8"))
            config.setdefault("python", {})["lock_packages"] = False
            bentofile = Path(tmp) / "bentofile.yaml"
            bentofile.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        cmd = [*_bentoml_cli(), "build", str(service_dir), "-f", str(bentofile), "--version", version,
               "--arg-file", str(args_file), "-o", "tag"]
        log.info("building bento %s: %s", bento_tag, " ".join(cmd))
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BentoError(f"bentoml build did not finish within {timeout:.0f}s") from None
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-30:])
        raise BentoError(f"bentoml build failed (exit {res.returncode}):\n{tail}")
    found = _TAG_OUT.search(res.stdout)
    built = found.group(1) if found else bento_tag
    if built != bento_tag:
        raise BentoError(f"bentoml build produced {built}, expected {bento_tag}")
    log.info("built %s in %.1fs; containerize where a Docker engine exists with: %s",
             built, time.perf_counter() - t0, " ".join(containerize_command(built)))
    return built


# --------------------------------------------------------------------------------------------
# serve / ask
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no server log>"


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    # The server runs in its own session (circus arbiter + worker processes): signal the whole
    # group this call started, politely first.
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def serving(bento_tag: str, *, port: int | None = None, timeout: float = 300) -> Iterator[str]:
    """Run ``bentoml serve <bento_tag>`` on localhost until the block ends; yield its base URL.

    Waits until ``/readyz`` answers 200 (model loaded, warm-up generation done). The server
    is always stopped on exit, also when the block raises.

    Args:
        bento_tag: a bento in the store, e.g. from :func:`build`.
        port: the port to listen on; default a free one.
        timeout: seconds to wait for readiness.

    Yields:
        The base URL, e.g. ``"http://127.0.0.1:40123"``.

    Raises:
        BentoError: the server exits or is not ready within ``timeout`` (log tail included).
    """
    import httpx

    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [*_bentoml_cli(), "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryDirectory(prefix="phiops-serve-") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=_cli_env(),
                                    start_new_session=True)
        try:
            t0 = time.perf_counter()
            deadline = t0 + timeout
            with httpx.Client(timeout=5.0) as client:
                while True:
                    if proc.poll() is not None:
                        raise BentoError(f"bentoml serve {bento_tag} exited with {proc.returncode}:\n{_tail(log_path)}")
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{base}/readyz").status_code == 200:
                            break
                    if time.perf_counter() > deadline:
                        raise BentoError(f"{bento_tag} not ready after {timeout:.0f}s:\n{_tail(log_path)}")
                    time.sleep(0.5)
            log.info("%s ready at %s after %.1fs", bento_tag, base, time.perf_counter() - t0)
            yield base
        finally:
            _stop(proc)


def chat(base_url: str, prompt: str, *, system: str | None = None, max_tokens: int | None = None,
         temperature: float = 0.0, timeout: float = 300) -> dict[str, Any]:
    """POST one chat completion to a running phiops service and return the response JSON.

    Args:
        base_url: the server, e.g. from :func:`serving`.
        prompt: the user message.
        system: an optional system message.
        max_tokens: completion cap (over the service's own cap the request is refused with a 400).
        temperature: 0 (default) is greedy decoding, so answers are reproducible.
        timeout: seconds for the request.

    Returns:
        The OpenAI ``chat.completion`` object.

    Raises:
        BentoError: a non-200 response (the service's error message included).
    """
    import httpx

    with httpx.Client(timeout=timeout) as client:
        models = client.get(f"{base_url}/v1/models")
        if models.status_code != 200:
            raise BentoError(f"GET /v1/models: HTTP {models.status_code}: {models.text[:500]}")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        body: dict[str, Any] = {"model": models.json()["data"][0]["id"], "messages": messages,
                                "temperature": temperature}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        res = client.post(f"{base_url}/v1/chat/completions", json=body)
    if res.status_code != 200:
        raise BentoError(f"POST /v1/chat/completions: HTTP {res.status_code}: {res.text[:500]}")
    return res.json()


def ask(bento_tag: str, prompt: str, *, port: int | None = None, timeout: float = 300,
        system: str | None = None, max_tokens: int | None = None) -> str:
    """Serve a bento, ask it one question, stop it; return the answer text.

    Greedy decoding (temperature 0), so the same bento gives the same answer.

    Args:
        bento_tag: a bento in the store, e.g. from :func:`build`.
        prompt: the user message.
        port: the port to serve on; default a free one.
        timeout: seconds for startup to ready, and again for the request.
        system: an optional system message.
        max_tokens: completion cap (over the service's own cap the request is refused with a 400).

    Returns:
        The assistant message content.

    Raises:
        BentoError: the server did not become ready, or the request failed.
    """
    with serving(bento_tag, port=port, timeout=timeout) as base:
        res = chat(base, prompt, system=system, max_tokens=max_tokens, timeout=timeout)
    return str(res["choices"][0]["message"]["content"])


__all__ = [
    "BentoError",
    "CHECKPOINT_SUBDIR",
    "ModelError",
    "ask",
    "bentoml_home",
    "build",
    "chat",
    "containerize_command",
    "free_port",
    "save_model",
    "serving",
]
