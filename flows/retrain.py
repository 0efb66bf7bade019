"""The `retrain` flow: DVC stages as Prefect tasks, then gate -> approval -> promote -> bento.

This module only wires. One `dvc status` first says whether anything changed; if nothing did,
no stage is started. Otherwise each DVC stage runs as one task through `dvc repro --single-item`,
so DVC stays the one caching authority: a stage whose deps and params are unchanged does nothing.
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
from collections.abc import Callable
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
from phiops import candidate, config, deploy, eval_report, gate, lineage, live, procs, registry, runlock  # noqa: E402
from phiops.paths import Layout  # noqa: E402
from phiops.serve import client  # noqa: E402


@task(retries=0)  # a retry cannot fix bad data or a bad config; DVC resumes what finished
def dvc_stage(root: str, stage: str) -> bool:
    """Reproduce one DVC stage, streaming its log into the Prefect run.

    Returns:
        True if the stage executed, False if DVC found it unchanged.
    """
    on_line = get_run_logger().info
    if stage == "train":
        on_line = publish_live(Path(root), on_line)
    try:
        return procs.run_dvc_stage(Path(root), stage, on_line)
    except procs.DataRefused as exc:
        # The row-level report goes where the person looking at the failed run will see it.
        create_markdown_artifact(key="data-validation", markdown=exc.report.read_text(),
                                 description="Why the data was refused (every rejected row is in data/quarantine/)")
        raise procs.DataRefused(f"{exc}\n(the same report is the run's data-validation artifact)",
                                exc.report) from None


def publish_live(root: Path, on_line: Callable[[str], None]) -> Callable[[str], None]:
    """Wrap the train stage's line handler: after a line, if dvclive has logged a new step, publish
    the live metrics as the `train-live` markdown artifact (one more version per logging step).

    The stage knows nothing of Prefect; it writes dvclive's files, this reads them back. DVC
    removes the stage's outs before its first line, so an earlier run's curve is never shown.
    """
    layout = Layout(root)
    shown, seen = "", None

    def handle(line: str) -> None:
        nonlocal shown, seen
        on_line(line)
        # dvclive rewrites its summary after each logged step (train or eval): the curves are
        # read back only when it changed, not after every line the stage prints.
        try:
            stat = layout.train_live_metrics.stat()
        except OSError:
            return
        if (stat.st_mtime_ns, stat.st_size) == seen:
            return
        try:
            rows = live.read(layout.train_live)
        except (OSError, ValueError):  # a display only, never a decision: the next line tries again
            return
        seen = (stat.st_mtime_ns, stat.st_size)
        table = live.markdown(rows)
        if rows and table != shown:  # a new step, or the final eval on the last one
            create_markdown_artifact(key="train-live", markdown=table,
                                     description="Train stage metrics, one row per logging step (dvclive)")
            shown = table

    return handle


# Persisted like every task of the run: a suspended run resumed gets the first attempt's answer
# (its stages then stand in from their own persisted results), not "nothing changed" from the
# outputs that attempt wrote.
@task
def changed_stages(root: str) -> dict[str, list[Any]]:
    """`dvc status`, in this process: the stages DVC would reproduce and why ({} = none)."""
    return lineage.changed_stages(Path(root))


@task
def stage_order(root: str) -> list[str]:
    """The DVC stages in dependency order, as dvc.yaml defines them."""
    return lineage.stage_order(Path(root))


# Within one flow run (a suspended run resumed) scoring production again would give the same
# numbers; across runs never cached: production is registry state, not an input DVC hashes.
@task(cache_policy=RUN_ID + INPUTS)
def gate_candidate(root: str, cfg: config.Params) -> tuple[gate.Decision, dict[str, Any] | None]:
    """Score the production model, then apply the gate (never cached across runs: registry state)."""
    decision, prod_eval = candidate.evaluate_and_decide(cfg, Layout(Path(root)))
    get_run_logger().info(gate.explain(decision))
    return decision, prod_eval


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
def build_bento(root: str, cfg: config.Params, record: dict[str, Any]) -> dict[str, Any]:
    # The bento, and the image and local container where params ask for them (container/deploy.on_promote).
    out = deploy.release(Layout(Path(root)), cfg, record)
    get_run_logger().info("bento %s built for %s; containerize with: %s", out["bento"], record["version"], out["containerize"])
    return out


# persist_result: a suspended run is resumed by running it again; the persisted results of its
# finished tasks stand in for them (Prefect requires it for suspend_flow_run).
@flow(name="retrain", log_prints=True, retries=0, persist_result=True)
def retrain(root: str = ".", params: str = "params.yaml", ask: str | None = None) -> dict[str, Any]:
    """Run the chain; returns {"status": promoted|unchanged|rejected|refused, ...}.

    `params` must be what the DVC stages read (params.yaml, or the same config): the registry
    records it. One run per checkout at a time (:mod:`phiops.runlock`).
    """
    logger = get_run_logger()
    root = str(Path(root).resolve())
    cfg = config.require_dvc_params(Path(root), Path(root) / params)
    run = get_run_context().flow_run
    # A deployment run resumed after its approval already registered its candidate; it carries
    # a person's decision, so it waits for the checkout instead of failing and losing it.
    resumed = any(r.get("flow_run_id") == str(run.id)
                  for r in registry.Registry(Layout(Path(root)), cfg.registry.artifact).history())
    with runlock.hold(Path(root), owner=f"flow run {run.name} ({run.id})", wait=resumed, on_wait=logger.info):
        return _retrain(root, cfg, ask)


def _retrain(root: str, cfg: config.Params, ask: str | None) -> dict[str, Any]:
    logger = get_run_logger()
    layout = Layout(Path(root))
    reconcile_approvals(root, cfg)

    # One `dvc status` up front: with nothing to reproduce, no `dvc repro` process is started
    # per stage just to find that out (about a second each). With anything changed every stage
    # goes through DVC as before: a downstream stage only shows as changed once its upstream ran.
    changed = changed_stages(root)
    if changed:
        logger.info("DVC status: %s", "; ".join(f"{s}: {c}" for s, c in changed.items()))
        ran = [s for s in stage_order(root) if dvc_stage(root, s)]
    else:
        logger.info("DVC status: every stage is up to date; no stage was started")
        ran = []
    report = lineage.read_json(layout.eval_report)

    reg = registry.Registry(layout, cfg.registry.artifact)
    prod = reg.production()
    unchanged = candidate.unchanged_production(layout, prod, ran)
    if unchanged is not None:
        publish(report, None)
        logger.info(unchanged.message)
        return unchanged.result()

    decision, prod_eval = gate_candidate(root, cfg)
    report_md = publish(report, prod_eval)
    if not decision.passed:
        logger.warning(
            "candidate rejected; nothing was registered and production stays %s:\n%s",
            prod["version"] if prod else "unset", gate.explain(decision),
        )
        return {"status": "rejected", "reasons": decision.reasons, "checks": decision.checks, "stages_run": ran,
                "production": prod["version"] if prod else None}
    # A candidate decided, or waiting for a decision, in another run: asking again would put
    # the same version before a person twice.
    unchanged = candidate.known_candidate(reg, layout, decision.variant, ran, str(get_run_context().flow_run.id),
                                          prod["version"] if prod else None)
    if unchanged is not None:
        logger.info(unchanged.message)
        return unchanged.result()

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
        result["answer"] = client.ask(tag, ask)
        print(f"served model answered: {result['answer']}")
    return result


if __name__ == "__main__":
    print(retrain())
