"""`phiops run` loads the project's flow from prefect.yaml's entrypoint and maps its outcome to an exit code.

The flow here is a stand-in written into the project (the real chain runs in tests/e2e): what is
under test is the CLI around it, on Prefect's temporary server.
"""

from __future__ import annotations

import json
import sys

import pytest

from phiops import cli

pytestmark = pytest.mark.integration

FLOW = '''\
import json
from pathlib import Path

from prefect import flow

from phiops import procs


@flow(name="retrain")
def retrain(root: str = ".", params: str = "params.yaml", ask: str | None = None) -> dict:
    outcome = json.loads((Path(root) / "outcome.json").read_text())
    if outcome == "bad data":
        raise procs.DataRefused("the data failed validation", Path(root) / "reports/validate.md")
    return {**outcome, "params": params}
'''


def test_run_exit_codes_follow_the_flows_outcome(tmp_path, monkeypatch, capsys):
    from prefect import get_client

    proj = tmp_path / "proj"
    (proj / "flows").mkdir(parents=True)
    (proj / "flows/retrain.py").write_text(FLOW)
    (proj / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(proj)
    # The old way put the project root on sys.path and imported `flows.retrain` from it.
    imported_before = "flows.retrain" in sys.modules
    with get_client(sync_client=True) as client:
        client.hello()  # one temporary server for the three runs

    def run(outcome: object) -> tuple[int, str, str]:
        (proj / "outcome.json").write_text(json.dumps(outcome))
        try:
            rc = cli.main(["run"])
        except SystemExit as exc:
            rc = exc.code
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, err = run({"status": "promoted", "version": "v1.0.0"})
    assert rc == cli.EXIT_OK, err
    result = json.loads(out[out.index("{"):])
    assert result["version"] == "v1.0.0" and result["params"] == str(proj / "params.yaml")
    assert str(proj) not in sys.path

    rc, _, err = run({"status": "rejected", "production": "v1.0.0"})
    assert rc == cli.EXIT_REFUSED and "error: the gate rejected the candidate; production stays v1.0.0" in err

    rc, _, err = run({"status": "refused", "version": "v2.0.0", "approval": {"approver": "ana", "reason": "no"}})
    assert rc == cli.EXIT_REFUSED and "error: v2.0.0 refused by ana (no)" in err

    rc, _, err = run("bad data")
    assert rc == cli.EXIT_DATA and "error: the data failed validation" in err

    with pytest.raises(KeyError):  # a status the CLI does not know is a bug, never a success
        run({"status": "maybe"})
    assert ("flows.retrain" in sys.modules) == imported_before
