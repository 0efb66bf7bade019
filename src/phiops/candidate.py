"""This run's candidate: is there anything new to decide, and may it pass the gate?

The retrain flow asks three questions in this order, and `phiops gate` asks the second:

1. :func:`unchanged_production`: nothing ran and production already is the model dvc.lock
   points at: nothing to evaluate, nothing to decide.
2. :func:`evaluate_and_decide`: score production on this run's test split, apply the gate.
3. :func:`known_candidate`: the gate's pick is a version another run already registered
   (rejected, waiting for a person, or approved and since rolled back): asking again would put
   the same version before a person twice.

All three read registry state and let its errors through (fail closed): "could not read" never
reads as "nothing there".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phiops import gate, lineage, registry
from phiops.config import Params
from phiops.gate import Decision
from phiops.paths import Layout
from phiops.stages import evaluate


class CandidateError(RuntimeError):
    """The candidate cannot be judged: an artifact the gate reads is missing."""


@dataclass(frozen=True)
class Unchanged:
    """Nothing to decide in this run; the flow ends with status "unchanged".

    Attributes:
        message: one sentence saying why, for the log and the result.
        production: the version in production, or None.
        candidate: the already registered version this run's candidate is, if any.
    """

    message: str
    production: str | None
    candidate: str | None = None

    def result(self) -> dict[str, Any]:
        """The flow's return value for this outcome."""
        out: dict[str, Any] = {"status": "unchanged", "production": self.production, "stages_run": []}
        if self.candidate is not None:
            out["candidate"] = self.candidate
        out["message"] = self.message
        return out


def unchanged_production(layout: Layout, production: dict[str, Any] | None, ran: list[str]) -> Unchanged | None:
    """Nothing ran and production is the model the current dvc.lock points at?

    Args:
        layout: artifact paths (dvc.lock is read).
        production: the production registry record, or None.
        ran: the DVC stages this run executed.

    Returns:
        The "unchanged" outcome, or None when there is something to evaluate.
    """
    if ran or production is None or not lineage.same_candidate(layout, production):
        return None
    return Unchanged(
        f"nothing changed: every DVC stage was up to date and {production['version']} is in production",
        production["version"],
    )


def known_candidate(reg: registry.Registry, layout: Layout, variant: str, ran: list[str],
                    flow_run_id: str, production: str | None) -> Unchanged | None:
    """Is the gate's pick a version that another flow run registered, and nothing ran?

    A version registered by *this* run (a suspended run resumed) is not "known": the run goes
    on to its approval.

    Args:
        reg: the registry.
        layout: artifact paths.
        variant: the variant the gate chose.
        ran: the DVC stages this run executed; any at all means a new candidate.
        flow_run_id: this flow run's id.
        production: the version in production, or None.

    Returns:
        The "unchanged" outcome naming the known version and what became of it, or None.

    Raises:
        RegistryError: the registry cannot be read.
    """
    if ran:
        return None
    known = reg.find(lineage.variant_dir(layout, variant))
    if known is None or known.get("flow_run_id") == flow_run_id:
        return None
    version, a = known["version"], known.get("approval") or {}
    if a.get("approved") is False:
        msg = (f"nothing changed: every DVC stage was up to date and this candidate is {version}, "
               f"rejected by {a.get('approver')} ({a.get('reason')})")
    elif a.get("approved") is None:
        msg = (f"nothing changed: every DVC stage was up to date and this candidate, {version}, "
               f"already waits for approval in flow run {known.get('flow_run_id')}")
    else:  # approved once, then rolled back: re-proposing it every week would be noise
        msg = (f"nothing changed: every DVC stage was up to date and this candidate, {version}, was "
               f"approved before and is no longer in production; `phiops promote {version}` restores it")
    return Unchanged(msg, production, version)


def evaluate_and_decide(cfg: Params, layout: Layout) -> tuple[Decision, dict[str, Any] | None]:
    """Score production on this run's test split, then apply the gate; write `reports/gate.json`.

    Production is registry state, not a DVC input, so it is scored here, outside the DVC
    stages, every time the gate runs. With no production model the stale
    `reports/eval_production.json` of an earlier run is removed, so no report shows it.

    Args:
        cfg: the validated params (gate thresholds, registry artifact).
        layout: artifact paths (reads `reports/eval.json` and the per-row scores).

    Returns:
        The gate's decision, and production's evaluation (None without a production model).

    Raises:
        CandidateError: `reports/eval.json` is missing (the evaluate stage has not run).
        RegistryError: production's files cannot be found or differ from its record.
    """
    if not layout.eval_report.exists():
        raise CandidateError(f"{layout.eval_report} is missing: run the evaluate stage first (`dvc repro evaluate`)")
    prod = registry.Registry(layout, cfg.registry.artifact).production()
    if prod is None:
        layout.eval_production.unlink(missing_ok=True)
        prod_eval = None
    else:
        prod_eval = evaluate.production(cfg, layout, prod)
    report = lineage.read_json(layout.eval_report)
    decision = gate.decide(cfg.gate, report, evaluate.load_scores(layout), prod_eval)
    gate.write(layout.gate_report, decision)
    return decision, prod_eval
