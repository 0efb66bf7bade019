"""The local flow (`phiops run`, Prefect's temporary server) refusing bad data.

The whole chain with a person's approval, the unchanged rerun and the partial rerun after a
param change run against a real server and worker in test_scheduled_retrain.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_bad_data_fails_the_run_once_with_the_report_attached(tiny_models, make_project, tmp_path, monkeypatch):
    import sys

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, TaskRunFilter, \
        TaskRunFilterFlowRunId

    from flows.retrain import retrain

    proj = make_project(tmp_path, tiny_models["llama"])
    raw = proj / "data/raw/tickets.jsonl"
    raw.write_text(raw.read_text() + '{"instruction": "x", "input": "", "output": 42}\n')
    monkeypatch.chdir(proj)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}")

    state = retrain(root=str(proj), return_state=True)
    assert state.is_failed(), state
    with get_client(sync_client=True) as client:
        run_id = state.state_details.flow_run_id
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run_id])))
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    stages = [t for t in tasks if t.name.startswith("dvc_stage")]
    assert len(stages) == 1 and stages[0].state.is_failed() and stages[0].run_count == 1  # not retried
    (art,) = [a for a in arts if a.key == "data-validation"]
    assert "data/raw/tickets.jsonl:161: output: must be a string, got int 42 (rule type:output)" in art.data
    assert not (proj / "data/processed").exists() and not (proj / "models").exists()  # nothing downstream ran
    assert json.loads((proj / "data/quarantine/tickets.rejected.jsonl").read_text())["line"] == 161


def test_phiops_run_refusing_data_exits_4_without_traceback_and_keeps_the_last_good_rows(
        tiny_models, make_project, tmp_path):
    import os
    import subprocess
    import sys

    from phiops import cli, procs

    proj = make_project(tmp_path, tiny_models["llama"])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    subprocess.run([procs.dvc_bin(), "repro", "validate"], cwd=proj, env=env, check=True, capture_output=True)
    rows = proj / "data/validated/rows.jsonl"
    good, lock = rows.read_bytes(), (proj / "dvc.lock").read_text()

    raw = proj / "data/raw/tickets.jsonl"
    raw.write_bytes(raw.read_bytes() + b'{"instruction": "a\x00b", "input": "", "output": "x"}\n')
    res = subprocess.run([sys.executable, "-m", "phiops.cli", "run"], cwd=proj, env=env, capture_output=True, text=True)
    assert res.returncode == cli.EXIT_DATA, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-5000:]
    said = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and said[0].startswith("error: the data failed validation"), res.stderr[-3000:]
    assert "data/raw/tickets.jsonl:161:" in res.stderr and "NUL byte" in res.stderr, res.stderr[-5000:]  # the row
    # The last good accepted set stays, still the one dvc.lock pins; nothing downstream ran.
    assert rows.read_bytes() == good and (proj / "dvc.lock").read_text() == lock
    assert not (proj / "data/processed").exists()


def test_train_stage_publishes_its_live_metrics_while_it_runs(tiny_models, make_project, tmp_path, monkeypatch):
    import subprocess
    import sys

    import yaml
    from prefect import flow, get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    import flows.retrain as retrain_flow
    from phiops import live, procs

    proj = make_project(tmp_path, tiny_models["llama"])
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"].update(max_steps=4, logging_steps=1)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = lambda *a: subprocess.run(["git", *a], cwd=proj, check=True, capture_output=True, text=True).stdout  # noqa: E731
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "4 steps")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}")

    @flow
    def through_train(root: str) -> list[bool]:
        return [retrain_flow.dvc_stage(root, s) for s in ("validate", "format", "train")]

    state = through_train(str(proj), return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            key=ArtifactFilterKey(any_=["train-live"])))
    # A new version as each logging step's line arrived (a step or two may land between two
    # reads), then one with the final eval; the last is the whole curve as dvclive wrote it.
    tables = [a.data for a in sorted(arts, key=lambda a: a.created)]
    rows = [t.count("\n| ") - 1 for t in tables]  # data rows (the header row also starts a line with "| ")
    assert rows[0] < 4 and rows == sorted(rows) and rows[-2:] == [4, 4], tables
    curve = live.read(proj / "reports/train_live")
    assert tables[-1] == live.markdown(curve) and "eval/loss" in curve[-1] and "eval/loss" not in curve[-2]
    # dvclive left dvc.yaml alone and wrote only into the git-ignored outs: nothing but DVC's own lock is new.
    assert git("status", "--porcelain").split() == ["??", "dvc.lock"]
    out = subprocess.run([procs.dvc_bin(), "status", "train"], cwd=proj, check=True, capture_output=True, text=True)
    assert "up to date" in out.stdout, out.stdout  # a rerun would skip the stage
