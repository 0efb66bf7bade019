"""Serve a built bento on localhost and ask it: what ``phiops ask`` and ``phiops run --ask`` do.

:func:`serving` runs ``bentoml serve <bento>`` on a free localhost port until its block ends;
:func:`chat` posts one chat completion to a running service; :func:`ask` does both.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phiops.bento import BentoError, bentoml_cli, cli_env
from phiops.procs import stop_group

log = logging.getLogger(__name__)



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
    cmd = [*bentoml_cli(), "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryDirectory(prefix="phiops-serve-") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=cli_env(),
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
            # The server runs in its own session (circus arbiter + worker processes): stop the
            # whole group this call started, politely first.
            stop_group(proc, grace=20.0)


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


