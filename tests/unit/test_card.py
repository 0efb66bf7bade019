"""The model card: every number in it is the registry record's, which holds reports/eval.json.

The record here is built the way the flow builds it: an evaluation as the evaluate stage writes
it, the gate's real decision on it (with production and the paired bootstrap), registered in a
throwaway git repo. The card is then parsed (front matter as YAML, tables cell by cell) and each
number is compared with its source, not searched for as a string.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict

import pytest

from phiops import card, cli, config, gate
from phiops.paths import Layout
from phiops.registry import Registry

IDS = [f"row{i}" for i in range(40)]
ROW = {"task_metric": 0.1, "json_validity": 0.25, "embedding_similarity": 0.5012, "perplexity": 9.8731,
       "latency_s_per_request": 1.2345, "tokens_per_s": 81.3, "size_bytes": 538090408, "memory_bytes": 538090408,
       "peak_rss_bytes": 901234567, "peak_cuda_bytes": None, "n_samples": 40, "seconds": 12.5, "device": "cpu"}


def _eval_report() -> dict:
    variants = {
        "base": ROW,
        "merged": {**ROW, "task_metric": 0.875, "json_validity": 1.0, "perplexity": 1.4321, "embedding_similarity": 0.9312},
        "gptq": {**ROW, "task_metric": 0.85, "json_validity": 1.0, "perplexity": 1.4512, "size_bytes": 105432064,
                 "tokens_per_s": 40.7},
        "awq": {**ROW, "task_metric": 0.8625, "json_validity": 0.975, "perplexity": 1.4455, "size_bytes": 104857600,
                "tokens_per_s": 41.9, "embedding_similarity": None},
    }
    return {"metric": "json_fields", "test_rows": 120, "seed": 1234, "variants": variants,
            "vs_merged": {"gptq": {"perplexity_increase": 0.0133, "task_metric_change": -0.0286, "size_ratio": 0.1959},
                          "awq": {"perplexity_increase": 0.0094, "task_metric_change": -0.0143, "size_ratio": 0.1949}}}


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """v1.0.0 registered from a real gate decision against a production model, then approved."""
    monkeypatch.setenv("HOME", str(tmp_path))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("registry: {artifact: phiops-model}\n")
    model = tmp_path / "models" / "awq"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"awq weights")
    cfg = config.parse({})
    report = _eval_report()
    scores = {v: {i: float(k < 35) for k, i in enumerate(IDS)} for v in ("merged", "gptq", "awq")}
    prod = {"version": "v0.9.0", "metrics": {"task_metric": 0.8, "perplexity": 1.5, "size_bytes": 104000000},
            "scores": {i: float(k < 32) for k, i in enumerate(IDS)}}
    decision = gate.decide(cfg.gate, report, scores, prod)
    assert decision.passed and decision.variant == "awq" and decision.vs_production
    reg = Registry(Layout(tmp_path), "phiops-model")
    reg.register(model, {
        "variant": "awq", "data_hash": "3f2a9c0d.dir", "git_rev": "0123456789abcdef0123", "flow_run_id": "run-7",
        "params": cfg.dump(), "metrics": report["variants"]["awq"], "eval": report, "gate": asdict(decision),
        "approval": {"status": "pending"}, "dvc_out_md5": "77aa.dir",
        "data": {"source": "data/raw/tickets.jsonl", "rows_in": 1200, "accepted": 1190, "rejected": 10,
                 "rejected_by_rule": {"duplicate": 10}, "warnings_by_rule": {"pii:email": 3},
                 "splits": {"train": 1070, "test": 120}, "passed": True},
        "train": {"steps": 40, "train_loss": 0.8123, "eval_loss": 0.7011, "tokens_seen": 81234, "device": "cpu"},
    })
    return reg, report, decision


def _tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table of `text` as rows of {header: cell}."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif block:
            tables.append([dict(zip(block[0], row)) for row in block[2:]])
            block = []
    return tables


def _num(cell: str) -> float | None:
    return None if cell == "-" else float(cell)


def test_every_number_in_the_card_is_the_records(registered):
    reg, report, decision = registered
    text = reg.card("v1.0.0")

    front = card.parse_front_matter(text)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    assert front["datasets"] == ["3f2a9c0d.dir"] and "awq" in front["tags"]
    metrics = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    awq = report["variants"]["awq"]
    assert metrics == {"json_fields": awq["task_metric"], "json_validity": awq["json_validity"],
                       "perplexity": awq["perplexity"]}  # embedding similarity was not measured for awq

    tables = _tables(text)
    evaluation = next(t for t in tables if t and "vs_production_ci_low" in t[0])
    rows = {r["variant"]: r for r in evaluation}
    assert list(rows) == ["base", "merged", "gptq", "awq", "production v0.9.0"]
    checked = 0
    for name in ("base", "merged", "gptq", "awq"):
        for col in card.EVAL_COLUMNS:
            assert _num(rows[name][col]) == report["variants"][name][col], (name, col)
            checked += 1
        for col in card.CI_COLUMNS:
            want = decision.vs_production.get(name, {}).get(col)
            assert _num(rows[name][f"vs_production_{col}"]) == want, (name, col)
            checked += want is not None
    for col in ("task_metric", "perplexity", "size_bytes"):
        assert _num(rows["production v0.9.0"][col]) == decision.metrics["production v0.9.0"][col]
    assert checked == 4 * len(card.EVAL_COLUMNS) + 3 * len(card.CI_COLUMNS)

    vs_merged = {r["variant"]: r for r in next(t for t in tables if t and "size_ratio" in t[0])}
    for name, want in report["vs_merged"].items():
        assert {k: _num(v) for k, v in vs_merged[name].items() if k != "variant"} == want

    thresholds = {r["rule"]: r["threshold"] for r in next(t for t in tables if t and "threshold" in t[0])}
    assert {k: float(v) for k, v in thresholds.items()} == {k: float(v) for k, v in config.parse({}).gate.model_dump().items()}
    data = next(t for t in tables if t and "rows_in" in t[0] and "sha256" not in t[0])[0]
    assert {k: int(v) for k, v in data.items()} == {"rows_in": 1200, "accepted": 1190, "rejected": 10,
                                                    "train": 1070, "test": 120}
    trained = {r["measure"]: r["value"] for r in next(t for t in tables if t and "measure" in t[0])}
    assert (float(trained["train_loss"]), int(trained["steps"])) == (0.8123, 40)


def test_the_card_follows_the_record_not_a_template(registered):
    """A different evaluation gives a different card: no number is written by hand."""
    reg, report, _ = registered
    record = reg.record("v1.0.0")
    record["eval"]["variants"]["awq"]["perplexity"] = 7.777
    rows = {r["variant"]: r for r in next(t for t in _tables(card.render(record)) if t and "vs_production_n" in t[0])}
    assert rows["awq"]["perplexity"] == "7.777"


def test_card_is_committed_with_the_record_and_tells_the_decision(registered, capsys):
    reg, _, _ = registered
    root = reg.root
    tracked = subprocess.run(["git", "ls-files", "registry"], cwd=root, capture_output=True, text=True).stdout.split()
    assert tracked == ["registry/phiops-model/v1.0.0.json", "registry/phiops-model/v1.0.0.md"]
    approval = {r["decision"]: r for r in next(t for t in _tables(reg.card("v1.0.0")) if t and "approver" in t[0])}
    assert list(approval) == ["pending: waits for a person"]

    reg.record_decision("v1.0.0", {"approved": True, "approver": "ana@host", "reason": "beats v0.9 on billing",
                                   "decided_at": "2026-12-01T10:00:00+00:00", "policy": False})
    row = next(t for t in _tables(reg.card("v1.0.0")) if t and "approver" in t[0])[0]
    assert (row["decision"], row["approver"], row["when"], row["reason"]) == (
        "approved", "ana@host", "2026-12-01T10:00:00+00:00", "beats v0.9 on billing")
    status = subprocess.run(["git", "status", "--porcelain", "registry"], cwd=root, capture_output=True, text=True)
    assert status.stdout == ""  # the new card went into the decision's commit

    assert cli.main(["--root", str(root), "--params", str(root / "params.yaml"), "registry", "show", "v1.0.0",
                     "--card"]) == 0
    assert capsys.readouterr().out == reg.card("v1.0.0") + "\n"
