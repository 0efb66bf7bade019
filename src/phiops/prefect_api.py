"""The Prefect API a `phiops run` talks to: the configured server, or a temporary one started early.

Without PREFECT_API_URL, Prefect starts a temporary server the first time a flow needs its API: it
imports its whole server application into the calling process (3-4 s on a loaded 2-core CPU),
then starts the server's own process, which imports it again and opens the database, and waits
for it. All of that comes after the flow was loaded, one step after the other.

`phiops run` starts that same server itself, as its first step: Prefect's own command line
(uvicorn over ``prefect.server.api.server:create_app``, the same environment flags, so the same
database under PREFECT_HOME records the run), and points this process at it for the run. Its
start then overlaps this process's imports and the flow's loading, and this process never
imports the server application. With PREFECT_API_URL set (infra/services.sh, a profile)
nothing is started: the run goes to that server, as before.

This module imports nothing of Prefect at load time (importing Prefect is what it overlaps).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


# Prefect's own default is 20 s; a slow start on a loaded 2-core CPU is not an error (cli.py).
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
POLL_S = 0.1  # Prefect polls its temporary server's health as often
PORT_IN_USE = 3  # uvicorn's exit code when the port was taken between choosing and binding it
STOP_GRACE_S = 5.0  # Prefect gives its temporary server as long to stop
# A temporary server's defaults; the user's environment wins. Analytics off, as flows/retrain.py
# sets it (this starts before it loads). Triggers (the automations service) off: a temporary
# server lives for one run and holds no automations, yet the service's periodic evaluation kept
# ~14 % of a core busy on an idle server (28 % -> 14 % of a core with it off, 2-core Intel Xeon).
TEMPORARY_SERVER_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false"}


class TemporaryServer:
    """A Prefect API server process started for one run; `stop()` ends it.

    Attributes:
        url: its API URL (``http://127.0.0.1:PORT/api``).
    """

    def __init__(self) -> None:
        self.url = ""
        self._proc: subprocess.Popen | None = None
        self._start()

    def _start(self) -> None:
        spec = importlib.util.find_spec("prefect")  # where it is installed, without importing it
        assert spec is not None and spec.origin is not None, "prefect is not installed"
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            # As Prefect's SubprocessASGIServer sets them: no UI, the ephemeral server's own setup.
            env={**TEMPORARY_SERVER_ENV, **os.environ, "PREFECT_UI_ENABLED": "0",
                 "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
            # The run's process group, as Prefect's: a Ctrl-C or a group kill of the run reaches it too.
        )

    def wait_ready(self, timeout: float) -> None:
        """Until the server answers its health check.

        Raises:
            RuntimeError: it exited, or did not answer within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        retries = 3
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code == PORT_IN_USE and retries:
                retries -= 1
                self._start()
                continue
            if code is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {code} before it answered")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(POLL_S)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s "
                           f"({STARTUP_TIMEOUT_ENV} sets how long to wait)")

    def stop(self) -> None:
        """End the server (SIGTERM, then SIGKILL after a few seconds, as Prefect does); safe to call twice."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def _drain() -> None:
    """Send the run's last logs and events before its server goes (Prefect would send them at
    exit, to a server that is gone by then: "Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    EventsWorker.drain_all(timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_early() -> TemporaryServer | None:
    """Start the temporary server now, if this run will need one; None if it will not.

    Only the environment is read here (reading Prefect's settings imports Prefect): a
    PREFECT_API_URL from a profile is seen by :func:`api`, which then stops this server.
    A process that already imported Prefect's server application (a test that started
    Prefect's own temporary server) keeps Prefect's way.

    Returns:
        The started server, or None.
    """
    if os.environ.get("PREFECT_API_URL") or "prefect.server.api.server" in sys.modules:
        return None
    return TemporaryServer()


@contextlib.contextmanager
def api(server: TemporaryServer | None) -> Iterator[str | None]:
    """Inside: this process's Prefect client uses `server`, once it answers; on exit it stops.

    Args:
        server: from :func:`start_early`, or None (Prefect's settings decide, as always).

    Yields:
        The API URL the run uses, or None when Prefect's own settings decide.

    Raises:
        RuntimeError: the server did not start (see :meth:`TemporaryServer.wait_ready`).
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    try:
        settings = get_current_settings()
        if server is None or settings.api.url or not settings.server.ephemeral.enabled:
            # Configured elsewhere (a profile, prefect.toml), or temporary servers are disabled:
            # Prefect's own settings decide, and its own error says so.
            if server is not None:
                server.stop()
            yield None
            return
        server.wait_ready(float(os.environ.get(STARTUP_TIMEOUT_ENV) or settings.server.ephemeral.startup_timeout_seconds))
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            try:
                yield server.url
            finally:
                _drain()
    finally:
        if server is not None:
            server.stop()
