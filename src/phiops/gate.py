"""The gate: may a candidate be promoted, and which variant?

Rules (thresholds in params `gate`), checked for each candidate variant (merged, gptq, awq):
- its task metric reaches `min_task_metric` and beats the base's by `min_gain_over_base`;
- it does not lose to the production model by more than `max_loss_vs_production`, judged on
  a paired bootstrap confidence interval of (candidate - production) over the same test rows:
  the interval's lower end must be >= -max_loss_vs_production (non-inferiority);
- a quantized variant also stays within `max_quantized_ppl_increase` of the merged model's
  perplexity and `max_quantized_metric_decrease` of its task metric (both relative).
The gate picks the smallest qualifying variant (bytes of weights on disk). The decision, every
failed rule, the production comparison and the numbers it used are recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phiops.config import QUANT_METHODS, GateCfg
from phiops.io import write_json

CANDIDATES = ("merged", *QUANT_METHODS)


@dataclass(frozen=True)
class Decision:
    passed: bool
    variant: str | None
    reasons: list[str]
    checks: dict[str, list[str]] = field(default_factory=dict)  # variant -> failed rules ([] = ok)
    production: str | None = None  # the version compared against
    vs_production: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> bootstrap result
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # the numbers the rules read


def paired_bootstrap(
    candidate: dict[str, float], reference: dict[str, float], *, n_resamples: int, confidence: float, seed: int
) -> dict[str, Any]:
    """Percentile bootstrap CI of mean(candidate - reference) over the rows both scored.

    Pairing by row id removes the between-row variance that both models share (hard tickets
    are hard for both), so the interval is much tighter than comparing two means.

    Args:
        candidate: row id -> score.
        reference: row id -> score (production).
        n_resamples: bootstrap resamples.
        confidence: e.g. 0.95 for a 95 % interval.
        seed: numpy seed; the same inputs and seed give the same interval.

    Returns:
        ``{"diff", "ci_low", "ci_high", "n", "confidence", "n_resamples", "seed"}``.

    Raises:
        ValueError: no row was scored by both.
    """
    import numpy as np

    ids = sorted(set(candidate) & set(reference))
    if not ids:
        raise ValueError("no test row was scored by both models")
    d = np.array([candidate[i] - reference[i] for i in ids], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, 2_000_000 // len(d))  # bounded memory for large test splits
    for s in range(0, n_resamples, step):
        k = min(step, n_resamples - s)
        means[s : s + k] = d[rng.integers(0, len(d), size=(k, len(d)))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return {
        "diff": round(float(d.mean()), 6),
        "ci_low": round(float(lo), 6),
        "ci_high": round(float(hi), 6),
        "n": len(ids),
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
    }


def decide(
    cfg: GateCfg,
    eval_report: dict[str, Any],
    scores: dict[str, dict[str, float]] | None = None,
    production: dict[str, Any] | None = None,
) -> Decision:
    """Apply the gate rules to an evaluation.

    Args:
        cfg: gate thresholds.
        eval_report: `reports/eval.json` (its `variants` table).
        scores: per-example task scores, variant -> row id -> score
            (:func:`phiops.stages.evaluate.load_scores`); needed when there is a production model.
        production: production's evaluation on this test split
            (:func:`phiops.stages.evaluate.production`: version, metrics, scores), or None.

    Returns:
        The decision, with the chosen variant (or None) and the reasons.
    """
    table = eval_report["variants"]
    base, merged = table["base"], table["merged"]
    scores = scores or {}
    checks: dict[str, list[str]] = {}
    vs_prod: dict[str, dict[str, Any]] = {}
    level = f"{cfg.confidence:.0%}"
    for name in (n for n in CANDIDATES if n in table):
        row = table[name]
        fails = []
        m = row["task_metric"]
        if m < cfg.min_task_metric:
            fails.append(f"task metric {m:.3f} < minimum {cfg.min_task_metric:.3f}")
        if m - base["task_metric"] < cfg.min_gain_over_base:
            fails.append(f"gain over base {m - base['task_metric']:+.3f} < required {cfg.min_gain_over_base:+.3f}")
        if production is not None:
            try:
                ci = paired_bootstrap(
                    scores.get(name, {}), production["scores"],
                    n_resamples=cfg.bootstrap_samples, confidence=cfg.confidence, seed=cfg.seed,
                )
            except ValueError as exc:
                fails.append(f"cannot compare with production {production['version']}: {exc}")
            else:
                vs_prod[name] = ci
                if ci["ci_low"] < -cfg.max_loss_vs_production:
                    fails.append(
                        f"may lose to production {production['version']} by more than {cfg.max_loss_vs_production:.3f}: "
                        f"task metric difference {ci['diff']:+.3f}, {level} CI [{ci['ci_low']:+.3f}, {ci['ci_high']:+.3f}] "
                        f"over {ci['n']} paired rows"
                    )
        if name != "merged":
            rel_ppl = row["perplexity"] / merged["perplexity"] - 1
            if rel_ppl > cfg.max_quantized_ppl_increase:
                fails.append(f"perplexity {rel_ppl:+.1%} vs merged > +{cfg.max_quantized_ppl_increase:.1%}")
            floor = merged["task_metric"] * (1 - cfg.max_quantized_metric_decrease)
            if m < floor:
                rel_m = m / merged["task_metric"] - 1 if merged["task_metric"] else float("-inf")
                fails.append(f"task metric {rel_m:+.1%} vs merged < -{cfg.max_quantized_metric_decrease:.1%}")
        checks[name] = fails

    used = {n: {k: table[n].get(k) for k in ("task_metric", "perplexity", "size_bytes")} for n in table}
    if production is not None:
        used[f"production {production['version']}"] = {
            k: production["metrics"].get(k) for k in ("task_metric", "perplexity", "size_bytes")
        }
    prod_version = production["version"] if production is not None else None

    passing = sorted((table[n]["size_bytes"], n) for n, f in checks.items() if not f)
    if not passing:
        reasons = ["no variant passed the gate", *(f"{n}: {'; '.join(f)}" for n, f in checks.items())]
        return Decision(False, None, reasons, checks, prod_version, vs_prod, used)
    size, chosen = passing[0]
    reasons = [f"{chosen} passes every rule and is the smallest passing variant ({size / 1e6:.1f} MB)"]
    if chosen in vs_prod:
        ci = vs_prod[chosen]
        reasons.append(
            f"{chosen} vs production {prod_version}: {ci['diff']:+.3f}, {level} CI "
            f"[{ci['ci_low']:+.3f}, {ci['ci_high']:+.3f}] >= -{cfg.max_loss_vs_production:.3f}"
        )
    elif production is None:
        reasons.append("no production model yet: the production rule does not apply")
    reasons += [f"{n} also passes ({table[n]['size_bytes'] / 1e6:.1f} MB)" for _, n in passing[1:]]
    return Decision(True, chosen, reasons, checks, prod_version, vs_prod, used)


def explain(d: Decision) -> str:
    """A few lines a person reads: verdict, then each variant's failed rules."""
    lines = [f"gate: {'PASS -> ' + str(d.variant) if d.passed else 'REJECT'}"]
    lines += [f"  {r}" for r in d.reasons]
    if d.passed:  # a rejection's reasons already name each variant's failed rules
        lines += [f"  {name}: " + ("ok" if not fails else "; ".join(fails)) for name, fails in d.checks.items()]
    return "\n".join(lines)


def write(path: Path, d: Decision) -> None:
    write_json(path, asdict(d))
