import pytest

from phiops.config import GateCfg
from phiops.gate import decide, explain, paired_bootstrap

CFG = GateCfg(min_task_metric=0.5, min_gain_over_base=0.1, max_loss_vs_production=0.02,
              max_quantized_ppl_increase=0.03, max_quantized_metric_decrease=0.02,
              confidence=0.95, bootstrap_samples=2000, seed=7)
IDS = [f"row{i}" for i in range(100)]


def _report(**rows):
    base = {"task_metric": 0.1, "perplexity": 3.0, "size_bytes": 1000}
    merged = {"task_metric": 0.9, "perplexity": 1.5, "size_bytes": 1000}
    return {"variants": {"base": base, "merged": merged, **rows}}


def _scores(correct: int) -> dict[str, float]:
    """`correct` of the 100 rows right (the first ones), the rest wrong."""
    return {i: float(k < correct) for k, i in enumerate(IDS)}


def _production(correct: int, version: str = "v1.0.0") -> dict:
    return {"version": version, "metrics": {"task_metric": correct / 100, "perplexity": 1.5, "size_bytes": 300},
            "scores": _scores(correct)}


# ---------------------------------------------------------------------------------------
# The bootstrap
# ---------------------------------------------------------------------------------------


def test_bootstrap_is_seeded_and_paired():
    a, b = _scores(90), _scores(85)
    one = paired_bootstrap(a, b, n_resamples=2000, confidence=0.95, seed=1)
    assert one == paired_bootstrap(a, b, n_resamples=2000, confidence=0.95, seed=1)
    assert one != paired_bootstrap(a, b, n_resamples=2000, confidence=0.95, seed=2)
    assert one["diff"] == pytest.approx(0.05) and one["n"] == 100
    assert one["ci_low"] <= one["diff"] <= one["ci_high"]
    # The 5 rows that differ all favour a: no resample can make the difference negative.
    assert one["ci_low"] >= 0.0
    # Identical models: a degenerate interval at 0.
    same = paired_bootstrap(a, a, n_resamples=500, confidence=0.95, seed=1)
    assert same["ci_low"] == same["ci_high"] == same["diff"] == 0.0


def test_bootstrap_pairs_only_common_rows():
    a = {"x": 1.0, "y": 1.0, "z": 0.0}
    res = paired_bootstrap(a, {"x": 0.0, "y": 1.0}, n_resamples=200, confidence=0.9, seed=0)
    assert res["n"] == 2
    with pytest.raises(ValueError, match="no test row"):
        paired_bootstrap(a, {"other": 1.0}, n_resamples=200, confidence=0.9, seed=0)


# ---------------------------------------------------------------------------------------
# Picking a variant
# ---------------------------------------------------------------------------------------


def test_picks_smallest_passing_variant():
    d = decide(CFG, _report(gptq={"task_metric": 0.9, "perplexity": 1.52, "size_bytes": 300},
                            awq={"task_metric": 0.89, "perplexity": 1.51, "size_bytes": 280}))
    assert d.passed and d.variant == "awq"
    assert d.checks == {"merged": [], "gptq": [], "awq": []}
    assert "smallest passing" in d.reasons[0] and any("gptq also passes" in r for r in d.reasons)


def test_smallest_variant_that_fails_is_skipped_for_the_next_smallest():
    d = decide(CFG, _report(gptq={"task_metric": 0.9, "perplexity": 1.52, "size_bytes": 300},
                            awq={"task_metric": 0.85, "perplexity": 1.51, "size_bytes": 280}))
    assert d.variant == "gptq"
    # 0.85 is 5.6 % below merged's 0.9: outside the 2 % allowed.
    assert d.checks["awq"] == ["task metric -5.6% vs merged < -2.0%"]


def test_quantized_variant_too_far_from_merged_is_not_chosen():
    d = decide(CFG, _report(gptq={"task_metric": 0.9, "perplexity": 1.6, "size_bytes": 300}))
    assert d.variant == "merged"
    assert d.checks["gptq"] == ["perplexity +6.7% vs merged > +3.0%"]


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------


def test_refuses_candidate_no_better_than_base():
    rep = _report()
    rep["variants"]["merged"]["task_metric"] = 0.15
    d = decide(CFG, rep)
    assert not d.passed and d.variant is None
    assert any("gain over base" in r for r in d.checks["merged"])
    assert d.reasons == [
        "no variant passed the gate",
        "merged: task metric 0.150 < minimum 0.500; gain over base +0.050 < required +0.100",
    ]


def test_refuses_candidate_worse_than_production():
    # Production gets 95 of 100 rows right, the candidate 90 (the same 90): a 5-point loss.
    d = decide(CFG, _report(), {"merged": _scores(90)}, _production(95))
    assert not d.passed and d.production == "v1.0.0"
    (fail,) = d.checks["merged"]
    assert fail.startswith("may lose to production v1.0.0 by more than 0.020")
    assert "95% CI" in fail and "100 paired rows" in fail
    assert d.vs_production["merged"]["ci_high"] <= 0
    assert "production v1.0.0" in d.metrics and "REJECT" in explain(d)


def test_point_estimate_within_tolerance_is_not_enough():
    # Mean difference -0.01 is inside the 0.02 tolerance, but 10 rows flip each way: noisy.
    # Non-inferiority needs the whole interval above -0.02, and it is not.
    prod = {i: float(k < 60) for k, i in enumerate(IDS)}
    cand = {i: float(10 <= k < 69) for k, i in enumerate(IDS)}  # loses rows 0-9, wins rows 60-68
    d = decide(CFG, _report(), {"merged": cand}, {"version": "v1.0.0", "metrics": {}, "scores": prod})
    ci = d.vs_production["merged"]
    assert ci["diff"] == pytest.approx(-0.01) and ci["ci_low"] < -0.02
    assert not d.passed


def test_accepts_candidate_as_good_as_production():
    # Same rows right as production plus three more: the interval lies above zero.
    d = decide(CFG, _report(), {"merged": _scores(93)}, _production(90))
    assert d.passed and d.variant == "merged"
    assert d.vs_production["merged"]["ci_low"] >= 0
    assert any("vs production v1.0.0" in r for r in d.reasons)


def test_candidate_without_per_example_scores_cannot_pass_production_rule():
    d = decide(CFG, _report(), {}, _production(90))
    assert not d.passed
    assert d.checks["merged"] == ["cannot compare with production v1.0.0: no test row was scored by both models"]
