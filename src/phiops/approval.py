"""A person's decision on a candidate waiting in a Prefect flow run, given from the command line.

The retrain flow suspends (deployment) or pauses (local run) after the gate passes, with a
form whose description holds the eval report. This module lists such runs and answers their
form through the Prefect API, exactly as the Prefect UI does: the run resumes and records the
approver and reason in the registry. It talks to the server in ``PREFECT_API_URL``; when the
server requires auth (``PREFECT_SERVER_API_AUTH_STRING``), ``PREFECT_API_AUTH_STRING`` must
match or the server refuses with 401 and nothing changes.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from typing import Any
from uuid import UUID

log = logging.getLogger(__name__)


class ApprovalError(RuntimeError):
    """The decision could not be delivered (no server, refused, not waiting, timed out)."""


def default_approver() -> str:
    """Who is deciding: ``$PHIOPS_APPROVER``, else ``user@host`` of this shell."""
    return os.environ.get("PHIOPS_APPROVER") or f"{getpass.getuser()}@{socket.gethostname()}"


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ApprovalError(
            "PREFECT_API_URL is not set: approvals go to the Prefect server the run lives on "
            "(`eval \"$(infra/services.sh env)\"` after `infra/services.sh start`)"
        )
    return str(url)


def _explain_http(exc: Exception, url: str) -> ApprovalError:
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        if code in (401, 403):
            return ApprovalError(
                f"the Prefect API at {url} refused the request (HTTP {code}): it requires authentication; "
                "set PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING"
            )
        if code == 404:
            return ApprovalError(f"no such flow run on {url}")
        return ApprovalError(f"the Prefect API at {url} answered HTTP {code}: {exc.response.text[:300]}")
    return ApprovalError(f"cannot reach the Prefect API at {url}: {type(exc).__name__}: {exc}")


def pending() -> list[dict[str, Any]]:
    """Flow runs waiting for an approval (paused or suspended, with an input form), oldest first."""
    import httpx
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    url = _api_url()
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
    except (httpx.HTTPError, OSError) as exc:
        raise _explain_http(exc, url) from exc
    out = []
    for r in runs:
        details = r.state.state_details if r.state else None
        if details is None or details.run_input_keyset is None:
            continue
        out.append({"id": str(r.id), "name": r.name, "state": r.state.name,
                    "since": str(r.state.timestamp), "timeout": str(details.pause_timeout or "")})
    return sorted(out, key=lambda r: r["since"])


def decide(run_id: str, *, approve: bool, reason: str, approver: str) -> dict[str, Any]:
    """Answer the approval form of flow run `run_id`; the run resumes with the decision.

    Args:
        run_id: the flow run's id (``phiops approvals`` lists them).
        approve: True to promote the candidate, False to reject it.
        reason: why (required; recorded in the registry).
        approver: who decides (recorded in the registry).

    Returns:
        ``{"id", "name", "decision"}``.

    Raises:
        ApprovalError: bad id, empty reason, no server, authentication refused, the run is
            not waiting for approval, or its approval timed out.
    """
    import httpx
    from prefect import get_client
    from prefect.exceptions import FlowPauseTimeout, ObjectNotFound

    if not reason.strip():
        raise ApprovalError("--reason must say why (it goes into the registry)")
    if not approver.strip():
        raise ApprovalError("--approver must not be empty")
    try:
        uid = UUID(run_id)
    except ValueError:
        raise ApprovalError(f"{run_id!r} is not a flow run id (a UUID; `phiops approvals` lists them)") from None
    url = _api_url()
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(uid)
            state = run.state
            if state is None or not state.is_paused() or state.state_details.run_input_keyset is None:
                raise ApprovalError(
                    f"flow run {run_id} ({run.name}) is {state.name if state else 'without state'}, "
                    "not waiting for an approval")
            res = client.resume_flow_run(uid, run_input={"approve": approve, "reason": reason, "approver": approver})
    except ObjectNotFound:
        raise ApprovalError(f"no flow run {run_id} on {url}") from None
    except (httpx.HTTPError, OSError) as exc:
        raise _explain_http(exc, url) from exc
    except FlowPauseTimeout:
        raise ApprovalError(f"flow run {run_id}: the approval timed out; the run was rejected") from None
    if res.status.value == "REJECT":
        if res.state is not None and res.state.is_failed():
            raise ApprovalError(f"flow run {run_id}: the approval timed out (approval.timeout_hours); the run failed")
        raise ApprovalError(f"flow run {run_id}: Prefect refused the decision: {res.details.reason}")
    return {"id": run_id, "name": run.name, "decision": "approved" if approve else "rejected"}


def reconcile(layout: Any, artifact: str) -> list[dict[str, Any]]:
    """Record a policy rejection for each version still pending whose approval run has ended.

    A suspended run left past ``approval.timeout_hours`` is failed by the Prefect server's
    pause-expiration service ("paused and never resumed"): no process of it is left to write
    the decision, so the version would read "pending" for ever. Here the registry catches up:
    such a version becomes rejected by ``policy:timeout`` (or ``policy:run-ended`` when its run
    ended otherwise, e.g. cancelled). Runs the server does not know (a local run's temporary
    server) are left alone. Called by ``phiops approvals`` and at the start of every retrain.

    Returns:
        One ``{"version", "flow_run", "approver", "reason"}`` per decision recorded.

    Raises:
        ApprovalError: the Prefect server cannot be reached or refused (nothing is recorded).
        RegistryError: the registry cannot be read or written, or a record's flow run id is
            damaged. Nothing here is skipped silently: the retrain flow stops on these.
    """
    import httpx
    from datetime import datetime, timezone

    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from phiops.artifacts import RegistryError
    from phiops.registry import Registry

    reg = Registry(layout, artifact)
    waiting = [r for r in reg.history() if (r.get("approval") or {}).get("approved") is None and r.get("flow_run_id")]
    if not waiting:
        return []
    ids = {}
    for r in waiting:  # before any server call: a damaged record stops reconcile whole
        try:
            ids[r["version"]] = UUID(str(r["flow_run_id"]))
        except ValueError:
            raise RegistryError(
                f"{artifact} {r['version']}: its record names flow run {r['flow_run_id']!r}, not a run id; "
                "the registry record is damaged, so whether its approval ended cannot be known") from None
    from prefect.settings import PREFECT_API_URL

    url = str(PREFECT_API_URL.value() or "Prefect's ephemeral server")
    out = []
    try:
        with get_client(sync_client=True) as client:
            for r in waiting:
                run_id = ids[r["version"]]
                try:
                    run = client.read_flow_run(run_id)
                except ObjectNotFound:
                    # Not an error: the run lives on another server (a local run's temporary
                    # one). The version stays pending, which promotes nothing; said, not hidden.
                    log.warning("%s %s waits on flow run %s, which %s does not know; left pending",
                                artifact, r["version"], run_id, url)
                    continue
                state = run.state
                if state is None or not state.is_final():
                    continue
                timed_out = "never resumed" in (state.message or "")
                decision = {
                    "approved": False,
                    "approver": "policy:timeout" if timed_out else "policy:run-ended",
                    "reason": (f"no decision within approval.timeout_hours: flow run {run.name} {state.message}"
                               if timed_out else
                               f"flow run {run.name} ended {state.name} before a decision ({state.message})"),
                    "policy": True,
                    "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                reg.record_decision(r["version"], decision)
                out.append({"version": r["version"], "flow_run": str(run.id), "approver": decision["approver"],
                            "reason": decision["reason"]})
    except (httpx.HTTPError, OSError) as exc:
        raise _explain_http(exc, url) from exc
    return out
