from phiops.config import GateCfg
from phiops.gate import decide

CFG = GateCfg(min_task_metric=0.5, min_gain_over_base=0.1, max_loss_vs_production=0.02,
              max_quantized_ppl_increase=0.03, max_quantized_metric_drop=0.02)


def _report(**rows):
    base = {"task_metric": 0.1, "perplexity": 3.0, "size_bytes": 1000}
    merged = {"task_metric": 0.9, "perplexity": 1.5, "size_bytes": 1000}
    return {"variants": {"base": base, "merged": merged, **rows}}


def test_picks_smallest_passing_variant():
    d = decide(CFG, _report(gptq={"task_metric": 0.9, "perplexity": 1.52, "size_bytes": 300},
                            awq={"task_metric": 0.89, "perplexity": 1.51, "size_bytes": 280}), None)
    assert d.passed and d.variant == "awq"
    assert d.checks["gptq"] == [] and d.checks["awq"] == []


def test_quantized_variant_too_far_from_merged_is_not_chosen():
    d = decide(CFG, _report(gptq={"task_metric": 0.9, "perplexity": 1.6, "size_bytes": 300}), None)
    assert d.variant == "merged"
    assert any("perplexity" in r for r in d.checks["gptq"])


def test_refuses_candidate_no_better_than_base():
    rep = _report()
    rep["variants"]["merged"]["task_metric"] = 0.15
    d = decide(CFG, rep, None)
    assert not d.passed and d.variant is None
    assert any("gain over base" in r for r in d.checks["merged"])


def test_refuses_candidate_worse_than_production():
    d = decide(CFG, _report(), {"version": "v1.0.0", "metrics": {"task_metric": 0.95}})
    assert not d.passed
    assert any("loses to production v1.0.0" in r for r in d.checks["merged"])
