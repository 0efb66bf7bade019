"""The gate: may a candidate be promoted, and which variant?

Rules (thresholds in params `gate`):
- the merged model must reach `min_task_metric` and beat the base by `min_gain_over_base`;
- it must not lose to the production model by more than `max_loss_vs_production`;
- a quantized variant qualifies only if it passes the same absolute rules and stays within
  `max_quantized_ppl_increase` (relative) and `max_quantized_metric_drop` of the merged model.
The gate picks the smallest qualifying variant (bytes on disk). Every reason is recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phiops.config import GateCfg
from phiops.io import write_json


@dataclass(frozen=True)
class Decision:
    passed: bool
    variant: str | None
    reasons: list[str]
    checks: dict[str, list[str]] = field(default_factory=dict)  # variant -> failed rules ([] = ok)


def decide(cfg: GateCfg, eval_report: dict[str, Any], production: dict[str, Any] | None) -> Decision:
    """Apply the gate rules to an evaluation report.

    Args:
        cfg: gate thresholds.
        eval_report: `reports/eval.json` (its `variants` table).
        production: the current production registry record, or None.

    Returns:
        The decision, with the chosen variant (or None) and the reasons.
    """
    table = eval_report["variants"]
    base, merged = table["base"], table["merged"]
    prod_metric = (production or {}).get("metrics", {}).get("task_metric")
    checks: dict[str, list[str]] = {}
    for name, row in table.items():
        if name == "base":
            continue
        fails = []
        m = row["task_metric"]
        if m < cfg.min_task_metric:
            fails.append(f"task metric {m:.3f} < minimum {cfg.min_task_metric:.3f}")
        if m - base["task_metric"] < cfg.min_gain_over_base:
            fails.append(f"gain over base {m - base['task_metric']:+.3f} < required {cfg.min_gain_over_base:+.3f}")
        if prod_metric is not None and prod_metric - m > cfg.max_loss_vs_production:
            fails.append(
                f"loses to production {production['version']} by {prod_metric - m:.3f} "
                f"(> {cfg.max_loss_vs_production:.3f})"
            )
        if name != "merged":
            limit = merged["perplexity"] * (1 + cfg.max_quantized_ppl_increase)
            if row["perplexity"] > limit:
                rel = row["perplexity"] / merged["perplexity"] - 1
                fails.append(f"perplexity +{rel:.1%} vs merged > +{cfg.max_quantized_ppl_increase:.1%}")
            if merged["task_metric"] - m > cfg.max_quantized_metric_drop:
                fails.append(f"task metric drop {merged['task_metric'] - m:.3f} vs merged > {cfg.max_quantized_metric_drop:.3f}")
        checks[name] = fails

    passing = sorted((table[n]["size_bytes"], n) for n, f in checks.items() if not f)
    if not passing:
        return Decision(False, None, ["no variant passed the gate"], checks)
    size, chosen = passing[0]
    reasons = [
        f"{chosen} passes every rule and is the smallest passing variant ({size / 1e6:.1f} MB)",
        *(f"{n} also passes ({table[n]['size_bytes'] / 1e6:.1f} MB)" for _, n in passing[1:]),
    ]
    return Decision(True, chosen, reasons, checks)


def explain(d: Decision) -> str:
    """A few lines a person reads: verdict, then each variant's failed rules."""
    lines = [f"gate: {'PASS -> ' + str(d.variant) if d.passed else 'REJECT'}"]
    lines += [f"  {r}" for r in d.reasons]
    for name, fails in d.checks.items():
        lines.append(f"  {name}: " + ("ok" if not fails else "; ".join(fails)))
    return "\n".join(lines)


def write(path: Path, d: Decision) -> None:
    write_json(path, asdict(d))
