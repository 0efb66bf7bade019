"""The `retrain` flow: DVC stages as Prefect tasks, then gate -> approval -> promote -> bento.

This module only wires. Each DVC stage runs as one task through `dvc repro --single-item`, so
DVC stays the one caching authority: a stage whose deps and params are unchanged does nothing.
Promotion is never cached.

Run:  phiops run            (or: python -m flows.retrain)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, pause_flow_run, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.context import get_run_context  # noqa: E402
from prefect.input import RunInput  # noqa: E402

from phiops import bento, config, gate, lineage, registry  # noqa: E402
from phiops.paths import Layout  # noqa: E402
from phiops.stages import evaluate  # noqa: E402


def _dvc() -> str:
    return str(Path(sys.executable).with_name("dvc"))


class DataRefused(RuntimeError):
    """The validate stage refused the data: the run fails, nothing downstream runs."""


@task(retries=0)  # a retry cannot fix bad data or a bad config; DVC resumes what finished
def dvc_stage(root: str, stage: str) -> bool:
    """Reproduce one DVC stage, streaming its log into the Prefect run.

    Returns:
        True if the stage executed, False if DVC found it unchanged.
    """
    logger = get_run_logger()
    proc = subprocess.Popen(
        [_dvc(), "repro", "--single-item", stage],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # dvc runs `phiops stage ...`: find it beside this interpreter even if the venv is not activated.
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    ran = False
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info(line)
        ran |= line.startswith("Running stage")
    if proc.wait() != 0:
        report = Layout(Path(root)).validate_markdown
        if stage == "validate" and report.exists():
            # The row-level report goes where the person looking at the failed run will see it.
            create_markdown_artifact(key="data-validation", markdown=report.read_text(),
                                     description="Why the data was refused (every rejected row is in data/quarantine/)")
            raise DataRefused(f"the data failed validation; see the data-validation artifact and {report}")
        raise RuntimeError(f"DVC stage {stage!r} failed (exit {proc.returncode}); see the log above")
    return ran


@task
def stage_order(root: str) -> list[str]:
    """The DVC stages in dependency order, as dvc.yaml defines them."""
    return lineage.stage_order(Path(root))


@task(cache_policy=None)
def evaluate_production(root: str, cfg: config.Params) -> dict[str, Any] | None:
    """Score the production model on this run's test split (never cached: registry state)."""
    layout = Layout(Path(root))
    prod = registry.Registry(layout, cfg.registry.artifact).production()
    if prod is None:
        layout.eval_production.unlink(missing_ok=True)
        return None
    return evaluate.production(cfg, layout, prod)


@task(cache_policy=None)
def decide(root: str, cfg: config.Params, prod_eval: dict[str, Any] | None) -> gate.Decision:
    layout = Layout(Path(root))
    report = lineage.read_json(layout.eval_report)
    decision = gate.decide(cfg.gate, report, evaluate.load_scores(layout), prod_eval)
    gate.write(layout.gate_report, decision)
    get_run_logger().info(gate.explain(decision))
    return decision


def publish(report: dict[str, Any], prod_eval: dict[str, Any] | None) -> str:
    """The eval table as Prefect artifacts (markdown and table); returns the markdown."""
    md = evaluate.render_markdown(report, prod_eval)
    create_markdown_artifact(key="eval-report", markdown=md, description="Evaluation of every variant")
    create_table_artifact(key="eval-table", table=evaluate.table_rows(report, prod_eval), description="Evaluation of every variant")
    return md


class Approval(RunInput):
    approve: bool
    reason: str
    approver: str


def approve(cfg: config.Params, report_md: str, decision: gate.Decision) -> dict[str, Any]:
    """Auto-approve by policy (embedded default only) or wait for a person."""
    if cfg.approval.mode == "auto":
        return {"approver": "policy:auto", "reason": "approval.mode=auto (embedded dev model)", "approved": True, "policy": True}
    answer = pause_flow_run(
        wait_for_input=Approval.with_initial_data(
            description=f"{report_md}\n\n```\n{gate.explain(decision)}\n```\n\nApprove promotion of **{decision.variant}**?",
            approve=False,
            reason="",
            approver="",
        ),
        timeout=int(cfg.approval.timeout_hours * 3600),
    )
    return {"approver": answer.approver, "reason": answer.reason, "approved": answer.approve, "policy": False}


@task(cache_policy=None)
def promote(root: str, cfg: config.Params, decision: gate.Decision, approval: dict[str, Any]) -> dict[str, Any]:
    layout = Layout(Path(root))
    reg = registry.Registry(layout, cfg.registry.artifact)
    run_id = str(get_run_context().task_run.flow_run_id)
    record = reg.register(
        lineage.variant_dir(layout, decision.variant),
        lineage.collect(layout, cfg, decision, approval, flow_run_id=run_id),
    )
    reg.set_production(record["version"], approver=approval["approver"], reason=approval["reason"])
    return record


@task(cache_policy=None)
def build_bento(root: str, cfg: config.Params, record: dict[str, Any]) -> str:
    layout = Layout(Path(root))
    model_tag = bento.save_model(
        layout.root / record["model_path"], cfg.registry.artifact, record["version"], {"registry": record["version"]}
    )
    tag = bento.build(
        model_tag,
        record["version"],
        service_dir=layout.root / "services",
        served_model_name=cfg.registry.artifact,
        max_new_tokens=cfg.serve.max_new_tokens,
        max_prompt_tokens=cfg.serve.max_prompt_tokens,
    )
    get_run_logger().info("bento %s built; containerize with: bentoml containerize %s", tag, tag)
    return tag


@flow(name="retrain", log_prints=True, retries=0)
def retrain(root: str = ".", params: str = "params.yaml", ask: str | None = None) -> dict[str, Any]:
    """Run the chain; returns {"status": promoted|unchanged|rejected|refused, ...}."""
    logger = get_run_logger()
    root = str(Path(root).resolve())
    cfg = config.load(Path(root) / params)
    layout = Layout(Path(root))

    ran = [s for s in stage_order(root) if dvc_stage(root, s)]
    report = lineage.read_json(layout.eval_report)

    reg = registry.Registry(layout, cfg.registry.artifact)
    prod = reg.production()
    if not ran and prod is not None and lineage.same_candidate(layout, prod):
        publish(report, None)
        logger.info("nothing changed: every DVC stage was up to date and %s is in production", prod["version"])
        return {"status": "unchanged", "production": prod["version"], "stages_run": []}

    prod_eval = evaluate_production(root, cfg)
    report_md = publish(report, prod_eval)
    decision = decide(root, cfg, prod_eval)
    if not decision.passed:
        logger.warning(
            "candidate rejected; nothing was registered and production stays %s:\n%s",
            prod["version"] if prod else "unset", gate.explain(decision),
        )
        return {"status": "rejected", "reasons": decision.reasons, "checks": decision.checks, "stages_run": ran,
                "production": prod["version"] if prod else None}
    approval = approve(cfg, report_md, decision)
    if not approval["approved"]:
        return {"status": "refused", "approval": approval, "stages_run": ran}
    record = promote(root, cfg, decision, approval)
    tag = build_bento(root, cfg, record)
    result = {"status": "promoted", "version": record["version"], "variant": decision.variant, "bento": tag, "stages_run": ran}
    if ask:
        result["answer"] = bento.ask(tag, ask)
        print(f"served model answered: {result['answer']}")
    return result


if __name__ == "__main__":
    print(retrain())
