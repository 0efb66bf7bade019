"""`phiops run`'s temporary Prefect server (phiops.prefect_api): started early, records the run
where Prefect's own would (PREFECT_HOME's database), and is gone when the command ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phiops import prefect_api

pytestmark = pytest.mark.integration

FLOW = '''\
import sys

from prefect import flow


@flow(name="retrain")
def retrain(root: str = ".", params: str = "params.yaml", ask: str | None = None) -> dict:
    # This process talks to a server it did not import.
    return {"status": "unchanged", "server_app_imported": "prefect.server.api.server" in sys.modules}
'''

READ_RUNS = '''\
import json

from prefect import get_client

with get_client(sync_client=True) as c:
    print(json.dumps([[r.flow_id is not None, r.state.name] for r in c.read_flow_runs()]))
'''


def _processes_with(needle: str) -> list[int]:
    """Pids whose environment holds `needle` (KEY=value)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle.encode() in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def test_no_server_is_started_when_an_api_url_is_set(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert prefect_api.start_early() is None


def test_the_run_is_recorded_in_prefect_home_and_the_server_is_gone_after(tmp_path):
    proj, home = tmp_path / "proj", tmp_path / "prefect-home"
    (proj / "flows").mkdir(parents=True)
    (proj / "flows/retrain.py").write_text(FLOW)
    (proj / "params.yaml").write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    res = subprocess.run([sys.executable, "-m", "phiops.cli", "run"], cwd=proj, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["status"] == "unchanged" and out["server_app_imported"] is False, out
    assert "Error logging to API" not in res.stderr, res.stderr[-3000:]  # the last logs went before the server
    assert _processes_with(f"PREFECT_HOME={home}") == []  # no server left behind

    # A later process on the same PREFECT_HOME (Prefect's own temporary server) finds the run, completed.
    seen = subprocess.run([sys.executable, "-c", READ_RUNS], env=env, capture_output=True, text=True, timeout=600)
    assert seen.returncode == 0, seen.stderr[-3000:]
    assert json.loads(seen.stdout.strip().splitlines()[-1]) == [[True, "Completed"]]


def _environ(pid: int, marker: str = "PREFECT__SERVER_EPHEMERAL", timeout: float = 60.0) -> dict[str, str]:
    """The environment the process runs with, once it has exec'd (its own ``marker`` variable is there).

    Read right after Popen, /proc/PID/environ can still be the forked parent's, or empty mid-exec: a
    fresh-clone run under load read neither key (KeyError) in both cases of the test below.
    """
    deadline = time.monotonic() + timeout
    while True:
        raw = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        if marker in env or time.monotonic() > deadline:
            return env
        time.sleep(0.05)


@pytest.mark.parametrize("user", [None, "true"])
def test_the_temporary_server_runs_without_automations_unless_the_user_asks(monkeypatch, user):
    key = "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # An earlier in-process flow test imports Prefect's server application; start_early then keeps
    # Prefect's way. This test is about phiops' own server.
    monkeypatch.delitem(sys.modules, "prefect.server.api.server", raising=False)
    if user is None:
        monkeypatch.delenv(key, raising=False)  # tests/conftest.py sets the same default
    else:
        monkeypatch.setenv(key, user)
    server = prefect_api.start_early()
    assert server is not None
    try:
        env = _environ(server._proc.pid)
    finally:
        server.stop()
    assert env[key] == (user or "false")
    assert env["PREFECT__SERVER_EPHEMERAL"] == "1"
