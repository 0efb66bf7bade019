"""The candidate's state and the gate run, without Prefect: on a throwaway git repo, no model."""

from __future__ import annotations

import json
import shutil
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


# -- fail closed: a state read that fails stops the decision, naming the cause --------------------

def _production(proj) -> tuple[Layout, Registry]:
    layout = Layout(proj)
    reg = Registry(layout, "phiops-model")
    reg.register(proj / "models/merged", {"variant": "merged"})
    reg.set_production("v1.0.0", approver="ana", reason="first")
    return layout, reg


def _tags(proj) -> str:
    return subprocess.run(["git", "tag"], cwd=proj, capture_output=True, text=True, check=True).stdout


def test_a_gto_failure_stops_the_gate_instead_of_skipping_the_production_rule(proj, monkeypatch):
    import gto.api

    from phiops.artifacts import RegistryError

    layout, reg = _production(proj)
    _evaluation(proj, merged_right=18)
    tags = _tags(proj)
    real = gto.api.history
    monkeypatch.setattr(gto.api, "history", lambda *a, **k: (_ for _ in ()).throw(OSError("packed-refs: I/O error")))
    with pytest.raises(RegistryError, match="packed-refs: I/O error"):
        candidate.evaluate_and_decide(config.parse({}), layout)
    assert not layout.gate_report.exists()  # no decision was written
    monkeypatch.setattr(gto.api, "history", real)
    assert reg.production()["version"] == "v1.0.0" and _tags(proj) == tags


def test_a_corrupt_production_tag_stops_the_gate(proj):
    from phiops.artifacts import RegistryError

    layout, reg = _production(proj)
    _evaluation(proj, merged_right=18)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", "phiops-model#production#x",
                    "-m", "{}"], cwd=proj, check=True)
    with pytest.raises(RegistryError, match="phiops-model#production#x"):
        candidate.evaluate_and_decide(config.parse({}), layout)
    assert not layout.gate_report.exists()


def test_production_files_behind_a_missing_dvc_remote_stop_the_gate(proj):
    from phiops import procs
    from phiops.artifacts import RegistryError

    layout, reg = _production(proj)
    # Production's files are gone from the working tree and DVC's cache; the remote is not there.
    subprocess.run([procs.dvc_bin(), "init", "-q"], cwd=proj, check=True)
    subprocess.run([procs.dvc_bin(), "remote", "add", "-d", "gone", str(proj / "no-such-remote")], cwd=proj, check=True)
    (proj / "models/merged/model.safetensors").write_bytes(b"candidate weights")
    _evaluation(proj, merged_right=18)
    with pytest.raises(RegistryError, match="cannot restore models/merged of phiops-model@v1.0.0 from DVC"):
        candidate.evaluate_and_decide(config.parse({}), layout)
    assert not layout.gate_report.exists()
    assert reg.production()["version"] == "v1.0.0"


@pytest.mark.parametrize("damage", ["half-written", "a directory"])
def test_an_unreadable_dvc_lock_is_not_an_empty_one(proj, damage):
    from phiops import lineage

    layout = Layout(proj)
    lock = proj / "dvc.lock"
    if damage == "half-written":
        lock.write_text("schema: '2.0'\nstages:\n  merge:\n    outs: [{path: models/merged, md5: ab")
    else:
        lock.unlink()
        lock.mkdir()
    prod = {"version": "v1.0.0", "model_path": "models/merged", "dvc_out_md5": "abc.dir"}
    with pytest.raises(lineage.LineageError, match="dvc.lock"):
        candidate.unchanged_production(layout, prod, ran=[])
    with pytest.raises(lineage.LineageError, match="dvc.lock"):
        lineage.out_hash(layout, "models/merged")


def test_two_unknown_hashes_are_not_the_same_candidate(proj):
    # A record without a hash and a dvc.lock without the out must not read as "production is current".
    layout = Layout(proj)
    prod = {"version": "v1.0.0", "model_path": "models/merged", "dvc_out_md5": None}
    assert candidate.unchanged_production(layout, prod, ran=[]) is None


def _lineage_project(proj, raw_params: dict, ran: dict) -> Layout:
    """dvc.lock as DVC writes it after validate and merge ran with `ran`'s param values."""
    (proj / "params.yaml").write_text(yaml.safe_dump(raw_params))
    (proj / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "validate": {"cmd": "phiops stage validate", "deps": [{"path": "data/raw", "md5": "raw.dir"}],
                     "params": {"params.yaml": {"data.raw": ran["data.raw"]}}},
        "train": {"cmd": "phiops stage train", "params": {"params.yaml": {"train": ran["train"]}},
                  "outs": [{"path": "models/adapter", "md5": "a.dir"}]},
        "merge": {"cmd": "phiops stage merge", "outs": [{"path": "models/merged", "md5": "m.dir"}]}}}))
    (proj / "models/adapter").mkdir(parents=True)
    (proj / "models/adapter/adapter_model.safetensors").write_bytes(b"adapter")
    write_json(Layout(proj).validate_report, {"rows_in": 22, "accepted": 20, "rejected": 2, "problems": ["..."]})
    write_json(Layout(proj).train_report, {"steps": 40, "train_loss": 0.5, "trainable_params_by_module": {}})
    _evaluation(proj, merged_right=18)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "code"],
                   cwd=proj, check=True)
    return Layout(proj)


def test_lineage_records_only_what_ran(proj):
    from phiops import gate, lineage

    raw = {"data": {"raw": "data/raw/tickets.jsonl"}, "train": {"max_steps": 40}}
    layout = _lineage_project(proj, raw, {"data.raw": "data/raw/tickets.jsonl", "train": {"max_steps": 40}})
    cfg = config.parse(raw)
    decision = gate.Decision(True, "merged", ["ok"])
    rec = lineage.collect(layout, cfg, decision, {"status": "pending"}, "run-1")
    assert (rec["dvc_out_md5"], rec["data_hash"], rec["params"]["train"]["max_steps"]) == ("m.dir", "raw.dir", 40)
    # What the card and an export need, kept with the version: report summaries, and the adapter
    # and merged model it came from with their DVC hash and sha256.
    assert rec["data"] == {"rows_in": 22, "accepted": 20, "rejected": 2} and rec["train"] == {"steps": 40, "train_loss": 0.5}
    assert {n: (c["model_path"], c["dvc_out_md5"], list(c["files"])) for n, c in rec["components"].items()} == {
        "adapter": ("models/adapter", "a.dir", ["adapter_model.safetensors"]),
        "merged": ("models/merged", "m.dir", ["model.safetensors"])}

    # params.yaml edited after the stages ran: dvc.lock says train ran with 40 steps.
    (proj / "params.yaml").write_text(yaml.safe_dump({**raw, "train": {"max_steps": 2}}))
    with pytest.raises(lineage.LineageError, match=r"params.yaml is not the params this run loaded \(train.max_steps"):
        lineage.collect(layout, cfg, decision, {}, "run-1")
    cfg2 = config.parse({**raw, "train": {"max_steps": 2}})
    with pytest.raises(lineage.LineageError, match=r"train: train ran with \{'max_steps': 40\}, params.yaml holds"):
        lineage.collect(layout, cfg2, decision, {}, "run-1")

    # The candidate's files are not pinned by dvc.lock: nothing says what produced them.
    (proj / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(lineage.LineageError, match="dvc.lock pins no models/gptq"):
        lineage.collect(layout, cfg, gate.Decision(True, "gptq", ["ok"]), {}, "run-1")

    # The adapter it came from is gone: an export of it could not be checked, so nothing is recorded.
    shutil.rmtree(proj / "models/adapter")
    with pytest.raises(lineage.LineageError, match="models/adapter is missing"):
        lineage.collect(layout, cfg, decision, {}, "run-1")


def test_lineage_without_a_commit_is_refused(tmp_path):
    from phiops import lineage

    with pytest.raises(lineage.LineageError, match="git cannot name the commit"):
        lineage.git_rev(tmp_path)


def test_reconcile_refuses_a_damaged_flow_run_id(proj):
    from phiops import approval
    from phiops.artifacts import RegistryError

    reg = Registry(Layout(proj), "phiops-model")
    reg.register(proj / "models/merged", {"variant": "merged", "flow_run_id": "not-a-uuid",
                                          "approval": {"status": "pending"}})
    with pytest.raises(RegistryError, match="v1.0.0: its record names flow run 'not-a-uuid'"):
        approval.reconcile(Layout(proj), "phiops-model")
