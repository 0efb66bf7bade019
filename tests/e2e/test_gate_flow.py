"""The retrain flow with a candidate worse than production: rejected, said why, registry untouched.

The DVC stages and the production scoring are stubbed (their own tests cover them); what runs
for real is the flow's wiring after evaluation: production comparison, gate, artifacts, and the
refusal to touch the registry.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from phiops.io import write_json, write_jsonl
from phiops.paths import Layout
from phiops.registry import Registry
from phiops.stages import evaluate  # its production() is what the gate task scores production with

pytestmark = pytest.mark.e2e
IDS = [f"row{i}" for i in range(100)]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the registry's fallback git identity
    proj = tmp_path / "proj"
    layout = Layout(proj)
    (proj / "models/merged").mkdir(parents=True)
    (proj / "models/merged/model.safetensors").write_bytes(b"production weights")
    # As DVC leaves it: the raw data and the candidate pinned (a registration records both).
    (proj / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "validate": {"cmd": "phiops stage validate", "deps": [{"path": "data/raw", "md5": "raw.dir"}]},
        "train": {"cmd": "phiops stage train", "outs": [{"path": "models/adapter", "md5": "adapter.dir"}]},
        "merge": {"cmd": "phiops stage merge", "outs": [{"path": "models/merged", "md5": "merged.dir"}]}}}))
    (proj / "models/adapter").mkdir()
    (proj / "models/adapter/adapter_model.safetensors").write_bytes(b"adapter weights")
    write_json(layout.validate_report, {"rows_in": 100, "accepted": 100, "rejected": 0})
    write_json(layout.train_report, {"steps": 4, "train_loss": 0.5})
    # Manual approval with a short timeout: if the gate wrongly passed, the flow fails fast instead of waiting.
    (proj / "params.yaml").write_text(yaml.safe_dump({"approval": {"mode": "manual", "timeout_hours": 0.001}}))
    _git(proj, "init", "-q")
    _git(proj, "add", "-A")
    _git(proj, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    reg = Registry(layout, "phiops-model")
    reg.register(proj / "models/merged", {"variant": "merged", "metrics": {"task_metric": 0.95}})
    reg.set_production("v1.0.0", approver="ana", reason="first")

    # This run's evaluation: the candidate beats the base but gets 80 rows right where production got 95.
    row = lambda m, size: {"task_metric": m, "perplexity": 1.5, "size_bytes": size, "n_samples": 100}  # noqa: E731
    write_json(layout.eval_report, {"metric": "json_fields", "test_rows": 100, "variants": {
        "base": row(0.1, 1000), "merged": row(0.8, 1000), "gptq": row(0.8, 300), "awq": row(0.8, 280)}})
    write_jsonl(layout.eval_samples, [
        {"variant": v, "id": i, "score": float(k < (10 if v == "base" else 80))}
        for v in ("base", "merged", "gptq", "awq") for k, i in enumerate(IDS)])
    return proj, reg


def test_worse_candidate_is_rejected_and_production_unchanged(project, monkeypatch):
    import flows.retrain as flow
    from prefect import get_client

    proj, reg = project
    tags_before, head_before = _git(proj, "tag"), _git(proj, "rev-parse", "HEAD")
    history_before = reg.history()

    monkeypatch.setattr(flow, "changed_stages", lambda root: {"evaluate": ["changed deps"]})
    monkeypatch.setattr(flow, "stage_order", lambda root: ["evaluate"])
    monkeypatch.setattr(flow, "dvc_stage", lambda root, stage: True)  # "evaluate ran"
    scored = []

    def production(cfg, layout, record):
        scored.append(record["version"])
        return {"version": record["version"], "variant": "merged", "source": "stub", "files_verified": True,
                "metrics": {"task_metric": 0.95, "perplexity": 1.4, "size_bytes": 1000},
                "scores": {i: float(k < 95) for k, i in enumerate(IDS)}}

    monkeypatch.setattr(evaluate, "production", production)
    with get_client(sync_client=True) as client:
        client.hello()  # start Prefect's temporary server before the flow
    result = flow.retrain(root=str(proj))

    assert result["status"] == "rejected" and result["production"] == "v1.0.0"
    assert scored == ["v1.0.0"]
    assert result["reasons"][0] == "no variant passed the gate"
    assert result["reasons"][1].startswith("merged: may lose to production v1.0.0 by more than 0.000")
    for variant in ("merged", "gptq", "awq"):
        assert any(r.startswith("may lose to production v1.0.0") for r in result["checks"][variant]), variant
    gate = json.loads((proj / "reports/gate.json").read_text())
    assert gate["passed"] is False and gate["production"] == "v1.0.0"
    assert gate["vs_production"]["merged"]["ci_high"] < 0
    # Nothing registered, nothing promoted, no commit, no tag.
    assert reg.production()["version"] == "v1.0.0"
    assert reg.history() == history_before
    assert _git(proj, "tag") == tags_before and _git(proj, "rev-parse", "HEAD") == head_before


def test_no_decision_within_the_timeout_is_a_rejection(project, monkeypatch):
    """A local run pauses for a person; past approval.timeout_hours the candidate is rejected by policy."""
    import flows.retrain as flow
    from prefect import get_client

    proj, reg = project
    layout = Layout(proj)
    (proj / "models/merged/model.safetensors").write_bytes(b"candidate weights")  # not production's files
    row = lambda m, ppl, size: {"task_metric": m, "perplexity": ppl, "size_bytes": size, "n_samples": 100}  # noqa: E731
    # merged beats production (100 vs 95 rows right); the quantized variants fail the perplexity rule.
    write_json(layout.eval_report, {"metric": "json_fields", "test_rows": 100, "variants": {
        "base": row(0.1, 1.5, 1000), "merged": row(1.0, 1.5, 1000), "gptq": row(1.0, 9.0, 300), "awq": row(1.0, 9.0, 280)}})
    write_jsonl(layout.eval_samples, [
        {"variant": v, "id": i, "score": float(v != "base" or k < 10)}
        for v in ("base", "merged", "gptq", "awq") for k, i in enumerate(IDS)])
    (proj / "params.yaml").write_text(yaml.safe_dump({"approval": {"mode": "manual", "timeout_hours": 0.0003}}))  # ~1 s

    monkeypatch.setattr(flow, "changed_stages", lambda root: {"evaluate": ["changed deps"]})
    monkeypatch.setattr(flow, "stage_order", lambda root: ["evaluate"])
    monkeypatch.setattr(flow, "dvc_stage", lambda root, stage: True)
    monkeypatch.setattr(evaluate, "production", lambda cfg, layout, record: {
        "version": record["version"], "variant": "merged", "source": "stub", "files_verified": True,
        "metrics": {"task_metric": 0.95, "perplexity": 1.4, "size_bytes": 1000},
        "scores": {i: float(k < 95) for k, i in enumerate(IDS)}})
    with get_client(sync_client=True) as client:
        client.hello()
    result = flow.retrain(root=str(proj))

    assert result["status"] == "refused" and result["version"] == "v2.0.0", result
    decision = reg.record("v2.0.0")["approval"]
    assert decision["approved"] is False and decision["approver"] == "policy:timeout" and decision["policy"] is True
    assert "approval.timeout_hours" in decision["reason"]
    assert reg.production()["version"] == "v1.0.0"  # staged, never promoted
    staged = [e["version"] for e in reg.events() if e.get("event") == "assignment" and e.get("stage") == "staging"]
    assert "v2.0.0" in staged


def _stub_stages(monkeypatch, flow) -> None:
    monkeypatch.setattr(flow, "changed_stages", lambda root: {"evaluate": ["changed deps"]})
    monkeypatch.setattr(flow, "stage_order", lambda root: ["evaluate"])
    monkeypatch.setattr(flow, "dvc_stage", lambda root, stage: True)


def test_a_registry_that_cannot_be_read_stops_the_run(project, monkeypatch):
    """GTO fails: the run stops naming the cause, instead of reading "no production" and skipping that rule."""
    import gto.api

    import flows.retrain as flow
    from prefect import get_client

    from phiops.artifacts import RegistryError

    proj, reg = project
    tags_before, head_before = _git(proj, "tag"), _git(proj, "rev-parse", "HEAD")
    (proj / "models/merged/model.safetensors").write_bytes(b"candidate weights")
    _stub_stages(monkeypatch, flow)
    real = gto.api.history
    monkeypatch.setattr(gto.api, "history", lambda *a, **k: (_ for _ in ()).throw(OSError("refs/tags: Input/output error")))
    with get_client(sync_client=True) as client:
        client.hello()
    with pytest.raises(RegistryError, match="refs/tags: Input/output error"):
        flow.retrain(root=str(proj))
    monkeypatch.setattr(gto.api, "history", real)
    assert reg.production()["version"] == "v1.0.0" and len(reg.history()) == 1
    assert _git(proj, "tag") == tags_before and _git(proj, "rev-parse", "HEAD") == head_before
    assert not (proj / "reports/gate.json").exists()  # no decision was taken


def test_params_the_dvc_stages_did_not_run_with_are_refused(project, monkeypatch):
    """`params` other than params.yaml: the stages would run params.yaml, the record would say X."""
    import flows.retrain as flow
    from prefect import get_client

    from phiops.config import DvcParamsError

    proj, reg = project
    (proj / "other.yaml").write_text(yaml.safe_dump({"approval": {"mode": "manual", "timeout_hours": 0.001},
                                                     "train": {"max_steps": 7}}))
    ran = []
    monkeypatch.setattr(flow, "stage_order", lambda root: ran.append(root) or ["evaluate"])
    with get_client(sync_client=True) as client:
        client.hello()
    with pytest.raises(DvcParamsError, match="train.max_steps: 7 here, params.yaml has -1"):
        flow.retrain(root=str(proj), params="other.yaml")
    assert ran == [] and len(reg.history()) == 1  # nothing ran, nothing registered
