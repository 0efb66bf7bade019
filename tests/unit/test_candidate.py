"""The candidate's state and the gate run, without Prefect: on a throwaway git repo, no model."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from phiops import candidate, config
from phiops.io import write_json, write_jsonl
from phiops.paths import Layout
from phiops.registry import Registry

IDS = [f"row{i}" for i in range(20)]


@pytest.fixture
def proj(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the registry's fallback git identity
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (tmp_path / "models/merged").mkdir(parents=True)
    (tmp_path / "models/merged/model.safetensors").write_bytes(b"weights-v1")
    return tmp_path


def _lock(proj, md5: str) -> None:
    (proj / "dvc.lock").write_text(yaml.safe_dump(
        {"schema": "2.0", "stages": {"merge": {"outs": [{"path": "models/merged", "md5": md5}]}}}))


# -- nothing ran, production is current --------------------------------------------------------------

def test_unchanged_production_only_when_nothing_ran_and_lock_points_at_production(proj):
    layout = Layout(proj)
    _lock(proj, "abc.dir")
    prod = {"version": "v3.0.0", "model_path": "models/merged", "dvc_out_md5": "abc.dir"}

    out = candidate.unchanged_production(layout, prod, ran=[])
    assert out is not None
    assert out.result() == {
        "status": "unchanged", "production": "v3.0.0", "stages_run": [],
        "message": "nothing changed: every DVC stage was up to date and v3.0.0 is in production"}
    assert candidate.unchanged_production(layout, prod, ran=["train"]) is None
    assert candidate.unchanged_production(layout, None, ran=[]) is None
    _lock(proj, "def.dir")  # dvc.lock now points at other files
    assert candidate.unchanged_production(layout, prod, ran=[]) is None


# -- the gate's pick is already registered -------------------------------------------------------

def test_known_candidate_says_what_became_of_it(proj):
    layout = Layout(proj)
    reg = Registry(layout, "phiops-model")
    v1 = reg.register(proj / "models/merged", {"variant": "merged", "flow_run_id": "run-1",
                                               "approval": {"status": "pending"}})["version"]

    def known(ran=(), run="run-2", production="v0.0.0"):
        return candidate.known_candidate(reg, layout, "merged", list(ran), run, production)

    waiting = known()
    assert waiting.candidate == v1 and waiting.production == "v0.0.0"
    assert waiting.message.endswith(f"this candidate, {v1}, already waits for approval in flow run run-1")
    assert waiting.result() == {"status": "unchanged", "production": "v0.0.0", "stages_run": [],
                                "candidate": v1, "message": waiting.message}

    reg.record_decision(v1, {"approved": False, "approver": "ana", "reason": "misroutes billing"})
    assert known().message.endswith(f"this candidate is {v1}, rejected by ana (misroutes billing)")

    reg.record_decision(v1, {"approved": True, "approver": "ana", "reason": "fine"})
    assert f"approved before and is no longer in production; `phiops promote {v1}` restores it" in known().message

    # Not "known": something ran (a new candidate), this very run registered it (resumed), or other files.
    assert known(ran=["evaluate"]) is None
    assert known(run="run-1") is None
    (proj / "models/merged/model.safetensors").write_bytes(b"weights-v2")
    assert known() is None


# -- evaluate production, then decide --------------------------------------------------------------

def _evaluation(proj, merged_right: int) -> None:
    """This run's evaluation: base gets 2 of 20 rows right, merged `merged_right`."""
    layout = Layout(proj)
    row = lambda m: {"task_metric": m, "perplexity": 1.5, "size_bytes": 1000, "n_samples": 20}  # noqa: E731
    write_json(layout.eval_report, {"metric": "json_fields", "test_rows": 20,
                                    "variants": {"base": row(0.1), "merged": row(merged_right / 20)}})
    write_jsonl(layout.eval_samples, [
        {"variant": v, "id": i, "score": float(k < (2 if v == "base" else merged_right))}
        for v in ("base", "merged") for k, i in enumerate(IDS)])


def test_evaluate_and_decide_without_an_evaluation_refuses(proj):
    with pytest.raises(candidate.CandidateError, match="reports/eval.json is missing"):
        candidate.evaluate_and_decide(config.parse({}), Layout(proj))


def test_evaluate_and_decide_without_production(proj):
    layout = Layout(proj)
    _evaluation(proj, merged_right=18)
    write_json(layout.eval_production, {"version": "stale"})
    decision, prod_eval = candidate.evaluate_and_decide(config.parse({}), layout)
    assert decision.passed and decision.variant == "merged" and prod_eval is None
    assert "no production model yet: the production rule does not apply" in decision.reasons
    assert not layout.eval_production.exists()  # an earlier run's production score would mislead
    assert json.loads(layout.gate_report.read_text())["variant"] == "merged"


def test_evaluate_and_decide_compares_with_production(proj):
    layout = Layout(proj)
    cfg = config.parse({"gate": {"bootstrap_samples": 200}})
    reg = Registry(layout, "phiops-model")
    # Production is these very files: evaluate.production reuses this run's merged row, loads no model.
    v1 = reg.register(proj / "models/merged", {"variant": "merged"})["version"]
    reg.set_production(v1, approver="ana", reason="first")
    _evaluation(proj, merged_right=18)

    decision, prod_eval = candidate.evaluate_and_decide(cfg, layout)
    assert prod_eval["version"] == v1 and prod_eval["source"].startswith("working tree models/merged")
    assert decision.production == v1 and decision.vs_production["merged"]["diff"] == 0.0
    assert decision.passed  # identical scores: no loss against production
    assert json.loads(layout.eval_production.read_text())["version"] == v1
    gate = json.loads(layout.gate_report.read_text())
    assert gate["production"] == v1 and gate["passed"] is True
