"""The whole chain through the Prefect flow, on a tiny random model, in a throwaway repo.

Checks each artifact, the registry entry and the bento; that a rerun with nothing changed
executes no stage; that changing a train param re-executes train and what follows, nothing
before it. The manual approval is given through Prefect's own resume API from a second
thread, as a person would from the UI.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e


def _approve_when_paused(stop: threading.Event, approvals: list) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    while not stop.is_set():
        try:
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
                )
            for run in runs:
                resume_flow_run(run.id, run_input={"approve": True, "reason": "e2e test", "approver": "tester"})
                approvals.append(str(run.id))
        except Exception:  # the temporary server may still be starting
            pass
        time.sleep(1.0)


def _run(proj: Path) -> dict:
    from prefect import get_client

    from flows.retrain import retrain

    # Start Prefect's temporary server here, before two threads race to start the same
    # process-wide instance (the loser sees it "running" with no process yet).
    with get_client(sync_client=True) as client:
        client.hello()
    stop, approvals = threading.Event(), []
    t = threading.Thread(target=_approve_when_paused, args=(stop, approvals), daemon=True)
    t.start()
    try:
        result = retrain(root=str(proj))
    finally:
        stop.set()
        t.join(timeout=10)
    result["approvals"] = approvals
    return result


def test_whole_chain_then_noop_then_partial_rerun(tiny_models, make_project, tmp_path, monkeypatch):
    import sys

    proj = make_project(tmp_path, tiny_models["llama"])
    monkeypatch.chdir(proj)
    monkeypatch.syspath_prepend(str(proj))
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}")

    first = _run(proj)
    assert first["status"] == "promoted", first
    assert first["approvals"], "the flow never paused for approval"
    for rel in ("data/validated/rows.jsonl", "data/processed/train.jsonl", "models/adapter/adapter_model.safetensors",
                "models/merged/model.safetensors", "models/gptq/config.json", "models/awq/config.json",
                "reports/eval.json", "reports/eval.md", "reports/gate.json", "dvc.lock"):
        assert (proj / rel).exists(), rel
    record = json.loads((proj / "registry/phiops-model/v1.0.0.json").read_text())
    assert record["approval"]["approver"] == "tester" and record["variant"] == first["variant"]
    assert record["data_hash"] and record["files"]
    tags = subprocess.run(["git", "tag"], cwd=proj, capture_output=True, text=True).stdout.split()
    assert "phiops-model@v1.0.0" in tags and any(t.startswith("phiops-model#production") for t in tags)
    import bentoml

    assert bentoml.get(first["bento"]).tag.version == "v1.0.0"

    second = _run(proj)
    assert second["status"] == "unchanged" and second["stages_run"] == [], second

    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["lr"] = params["train"]["lr"] / 2
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(proj)
    assert third["status"] == "promoted", third
    assert third["stages_run"][0] == "train"
    assert "validate" not in third["stages_run"] and "format" not in third["stages_run"]
    assert {"merge", "quantize@gptq", "quantize@awq", "evaluate"} <= set(third["stages_run"])
    assert third["version"] == "v2.0.0"
    # v1 was in production and the working tree now holds the new candidate: v1 was restored from
    # DVC at its GTO tag, checked against its sha256, scored, and compared row by row.
    prod_eval = json.loads((proj / "reports/eval_production.json").read_text())
    assert prod_eval["version"] == "v1.0.0" and prod_eval["source"] == "DVC cache at phiops-model@v1.0.0"
    assert len(prod_eval["scores"]) == params["evaluate"]["max_samples"]
    gate = json.loads((proj / "reports/gate.json").read_text())
    assert gate["production"] == "v1.0.0" and set(gate["vs_production"]) == {"merged", "gptq", "awq"}


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
