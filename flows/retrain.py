"""The `retrain` flow: DVC stages as Prefect tasks, then gate -> approval -> promote -> bento.

This module only wires. Each DVC stage runs as one task through `dvc repro --single-item`, so
DVC stays the one caching authority: a stage whose deps and params are unchanged does nothing.
Promotion is never cached.

A candidate that passes the gate is registered (GTO stage `staging`) and waits for a person:
as a deployment run (a worker started it) the flow *suspends*: its process exits and the worker
slot is freed; `phiops approve <run-id>` (or the UI's form) reschedules it, and the rerun finds
every task of the first attempt in its persisted results, so no stage is redone. Run locally
(`phiops run`), it *pauses* in place. No decision within `approval.timeout_hours`: rejected.

Run:  phiops run            (or: python -m flows.retrain; scheduled: prefect.yaml)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, pause_flow_run, suspend_flow_run, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import INPUTS, RUN_ID  # noqa: E402
from prefect.context import get_run_context  # noqa: E402
from prefect.exceptions import FlowPauseTimeout  # noqa: E402
from prefect.input import RunInput  # noqa: E402
from pydantic import Field  # noqa: E402

from phiops import approval as approval_cli  # noqa: E402
from phiops import bento, config, deploy, eval_report, gate, lineage, registry  # noqa: E402
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
        # Its own process group, so that stopping this run (SIGTERM, cancel) stops dvc *and*
        # the stage it runs, instead of leaving an orphan writing outputs nobody records.
        start_new_session=True,
    )
    ran = False
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                logger.info(line)
            ran |= line.startswith("Running stage")
    except BaseException:  # SIGTERM (Prefect raises TerminationSignal here), cancel, Ctrl-C
        _stop_group(proc)
        raise
    if proc.wait() != 0:
        report = Layout(Path(root)).validate_markdown
        if stage == "validate" and report.exists():
            # The row-level report goes where the person looking at the failed run will see it.
            create_markdown_artifact(key="data-validation", markdown=report.read_text(),
                                     description="Why the data was refused (every rejected row is in data/quarantine/)")
            raise DataRefused(f"the data failed validation; see the data-validation artifact and {report}")
        raise RuntimeError(f"DVC stage {stage!r} failed (exit {proc.returncode}); see the log above")
    return ran


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """End dvc's process group: politely, then for good."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@task
def stage_order(root: str) -> list[str]:
    """The DVC stages in dependency order, as dvc.yaml defines them."""
    return lineage.stage_order(Path(root))


# Within one flow run (a suspended run resumed) scoring production again would give the same
# numbers; across runs never cached: production is registry state, not an input DVC hashes.
@task(cache_policy=RUN_ID + INPUTS)
def evaluate_production(root: str, cfg: config.Params) -> dict[str, Any] | None:
    """Score the production model on this run's test split (never cached: registry state)."""
    layout = Layout(Path(root))
    prod = registry.Registry(layout, cfg.registry.artifact).production()
    if prod is None:
        layout.eval_production.unlink(missing_ok=True)
        return None
    return evaluate.production(cfg, layout, prod)


@task(cache_policy=RUN_ID + INPUTS)
def decide(root: str, cfg: config.Params, prod_eval: dict[str, Any] | None) -> gate.Decision:
    layout = Layout(Path(root))
    report = lineage.read_json(layout.eval_report)
    decision = gate.decide(cfg.gate, report, evaluate.load_scores(layout), prod_eval)
    gate.write(layout.gate_report, decision)
    get_run_logger().info(gate.explain(decision))
    return decision


def publish(report: dict[str, Any], prod_eval: dict[str, Any] | None) -> str:
    """The eval table as Prefect artifacts (markdown and table); returns the markdown."""
    md = eval_report.render_markdown(report, prod_eval)
    create_markdown_artifact(key="eval-report", markdown=md, description="Evaluation of every variant")
    create_table_artifact(key="eval-table", table=eval_report.table_rows(report, prod_eval), description="Evaluation of every variant")
    return md


class Approval(RunInput):
    approve: bool
    reason: str = Field(min_length=1, description="why: recorded in the registry")
    approver: str = Field(min_length=1, description="who decides: recorded in the registry")


def approve(cfg: config.Params, report_md: str, decision: gate.Decision, version: str) -> dict[str, Any]:
    """Auto-approve by policy (embedded default only) or wait for a person.

    A deployment run suspends (its process exits; resuming reruns it, persisted task results
    keep finished work); a local run pauses in place. Past `approval.timeout_hours` the
    candidate is rejected: a paused run is told so here; a suspended one is failed by the
    Prefect server ("paused and never resumed") and never promoted.
    """
    if cfg.approval.mode == "auto":
        return {"approver": "policy:auto", "reason": "approval.mode=auto (embedded dev model)", "approved": True, "policy": True}
    form = Approval.with_initial_data(
        description=(f"# Approve {cfg.registry.artifact} {version} ({decision.variant})?\n\n{report_md}\n\n"
                     f"```\n{gate.explain(decision)}\n```\n\n"
                     f"Or from a shell: `phiops approve <this run id> --reason ...` / `phiops reject ...`"),
        approve=False,
    )
    timeout = int(cfg.approval.timeout_hours * 3600)
    logger = get_run_logger()
    run = get_run_context().flow_run
    try:
        if run.deployment_id is not None:
            logger.info("waiting for approval of %s: suspending (phiops approve %s --reason ...)", version, run.id)
            answer = suspend_flow_run(wait_for_input=form, timeout=timeout, key="approval")
        else:
            logger.info("waiting for approval of %s: pausing (phiops approve %s --reason ...)", version, run.id)
            answer = pause_flow_run(wait_for_input=form, timeout=timeout, key="approval")
    except FlowPauseTimeout:
        return {"approver": "policy:timeout", "reason": f"no decision within approval.timeout_hours={cfg.approval.timeout_hours}",
                "approved": False, "policy": True}
    return {"approver": answer.approver, "reason": answer.reason, "approved": answer.approve, "policy": False}


@task(cache_policy=None)
def stage_candidate(root: str, cfg: config.Params, decision: gate.Decision) -> dict[str, Any]:
    """Register the gate's pick as a new version in `staging` (the same files: the same version)."""
    layout = Layout(Path(root))
    reg = registry.Registry(layout, cfg.registry.artifact)
    run_id = str(get_run_context().task_run.flow_run_id)
    pending = {"status": "pending"}
    return reg.register(
        lineage.variant_dir(layout, decision.variant),
        lineage.collect(layout, cfg, decision, pending, flow_run_id=run_id),
    )


@task(cache_policy=None)
def conclude(root: str, cfg: config.Params, version: str, approval: dict[str, Any]) -> dict[str, Any]:
    """Write the decision into the version's record; approved: assign it to production."""
    from datetime import datetime, timezone

    reg = registry.Registry(Layout(Path(root)), cfg.registry.artifact)
    decided = {**approval, "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    prior = reg.record(version).get("approval") or {}
    if prior.get("approved") is not None:  # this run resumed after it already concluded
        decided = prior
    record = reg.record_decision(version, decided)
    if approval["approved"]:
        reg.set_production(version, approver=approval["approver"], reason=approval["reason"])
    return record


@task(cache_policy=None)
def reconcile_approvals(root: str, cfg: config.Params) -> list[dict[str, Any]]:
    """Versions whose approval run ended undecided (timed out while suspended) become rejected."""
    decided = approval_cli.reconcile(Layout(Path(root)), cfg.registry.artifact)
    for d in decided:
        get_run_logger().warning("%s rejected by %s: %s", d["version"], d["approver"], d["reason"])
    return decided


@task(cache_policy=None)
def build_bento(root: str, cfg: config.Params, record: dict[str, Any]) -> dict[str, str]:
    out = deploy.build_bento(Layout(Path(root)), cfg, record)
    get_run_logger().info("bento %s built for %s; containerize with: %s", out["bento"], record["version"], out["containerize"])
    return out


# persist_result: a suspended run is resumed by running it again; the persisted results of its
# finished tasks stand in for them (Prefect requires it for suspend_flow_run).
@flow(name="retrain", log_prints=True, retries=0, persist_result=True)
def retrain(root: str = ".", params: str = "params.yaml", ask: str | None = None) -> dict[str, Any]:
    """Run the chain; returns {"status": promoted|unchanged|rejected|refused, ...}."""
    logger = get_run_logger()
    root = str(Path(root).resolve())
    cfg = config.load(Path(root) / params)
    layout = Layout(Path(root))
    reconcile_approvals(root, cfg)

    ran = [s for s in stage_order(root) if dvc_stage(root, s)]
    report = lineage.read_json(layout.eval_report)

    reg = registry.Registry(layout, cfg.registry.artifact)
    prod = reg.production()
    if not ran and prod is not None and lineage.same_candidate(layout, prod):
        publish(report, None)
        msg = f"nothing changed: every DVC stage was up to date and {prod['version']} is in production"
        logger.info(msg)
        return {"status": "unchanged", "production": prod["version"], "stages_run": [], "message": msg}

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
    known = reg.find(lineage.variant_dir(layout, decision.variant))
    this_run = str(get_run_context().flow_run.id)
    if not ran and known is not None and known.get("flow_run_id") != this_run:
        # This candidate was decided, or waits for a decision, in another run: asking again
        # would put the same version before a person twice.
        a = known.get("approval") or {}
        if a.get("approved") is False:
            msg = (f"nothing changed: every DVC stage was up to date and this candidate is {known['version']}, "
                   f"rejected by {a.get('approver')} ({a.get('reason')})")
        elif a.get("approved") is None:
            msg = (f"nothing changed: every DVC stage was up to date and this candidate, {known['version']}, "
                   f"already waits for approval in flow run {known.get('flow_run_id')}")
        else:  # approved once, then rolled back: re-proposing it every week would be noise
            msg = (f"nothing changed: every DVC stage was up to date and this candidate, {known['version']}, was "
                   f"approved before and is no longer in production; `phiops promote {known['version']}` restores it")
        logger.info(msg)
        return {"status": "unchanged", "production": prod["version"] if prod else None, "stages_run": [],
                "candidate": known["version"], "message": msg}

    record = stage_candidate(root, cfg, decision)
    approval = approve(cfg, report_md, decision, record["version"])
    record = conclude(root, cfg, record["version"], approval)
    if not approval["approved"]:
        logger.warning("%s rejected by %s: %s; production stays %s", record["version"], approval["approver"],
                       approval["reason"], prod["version"] if prod else "unset")
        return {"status": "refused", "version": record["version"], "approval": approval, "stages_run": ran}
    built = build_bento(root, cfg, record)
    tag = built["bento"]
    result = {"status": "promoted", "version": record["version"], "variant": decision.variant, "bento": tag,
              "containerize": built["containerize"], "stages_run": ran}
    print(f"promoted {record['version']}; bento {tag}; containerize with: {built['containerize']}")
    if ask:
        result["answer"] = bento.ask(tag, ask)
        print(f"served model answered: {result['answer']}")
    return result


if __name__ == "__main__":
    print(retrain())
