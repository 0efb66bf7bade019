"""One run per checkout: the run lock refuses a second run at once, or waits for a resumed one. No model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from phiops import cli, runlock

HOLD = """
import sys, time
from pathlib import Path
from phiops import runlock
with runlock.hold(Path(sys.argv[1]), owner="flow run brave-otter (1234)"):
    print("held", flush=True)
    time.sleep(3600)  # the test kills it; importing Prefect alone can take a minute on a loaded machine
"""


def _holder(root):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_with_who_holds_it(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(runlock.RunLockedError) as info:
            with runlock.hold(tmp_path, owner="me"):
                pytest.fail("entered a held lock")
        msg = str(info.value)
        assert f"flow run brave-otter (1234) (pid {proc.pid}, since " in msg
        assert ".phiops/run.lock" in msg and "one run per checkout" in msg
        assert cli.exit_code(info.value) == cli.EXIT_REFUSED
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9: no cleanup code runs
    proc.wait()
    with runlock.hold(tmp_path, owner="me") as path:
        assert json.loads(path.read_text())["owner"] == "me"
    assert path.read_text() == ""  # released: no stale owner shown to the next run


def test_a_resumed_run_waits_for_the_lock(tmp_path):
    said = []
    entered = threading.Event()

    def resumed():
        with runlock.hold(tmp_path, owner="resumed", wait=True, on_wait=said.append, poll_s=0.05):
            entered.set()

    with runlock.hold(tmp_path, owner="first"):
        t = threading.Thread(target=resumed)
        t.start()
        time.sleep(0.3)
        assert not entered.is_set()  # waits while the first run holds it
    t.join(5)
    assert entered.is_set()
    assert said and said[0].startswith("waiting for first (pid ")


def test_the_lock_file_is_git_ignored():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(["git", "check-ignore", "-q", str(runlock.LOCK)], cwd=root)
    assert res.returncode == 0, f"{runlock.LOCK} must be in .gitignore: a run would leave the tree dirty"


def test_phiops_run_refuses_before_starting_prefect(tmp_path, capsys):
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows/retrain.py").write_text("raise SystemExit('the flow must not even load')\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    proc = _holder(tmp_path)
    try:
        rc = cli.main(["--root", str(tmp_path), "--params", str(tmp_path / "params.yaml"), "run"])
        err = capsys.readouterr().err
        assert rc == cli.EXIT_REFUSED and "error: flow run brave-otter (1234)" in err and "Traceback" not in err
    finally:
        proc.kill()
        proc.wait()
