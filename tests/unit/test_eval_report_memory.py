"""The eval table says how a variant holds its weights, and its memory against merged (issue 17)."""

from __future__ import annotations

from phiops import eval_report

_ROW = {"task_metric": 0.5, "json_validity": 1.0, "embedding_similarity": None, "perplexity": 3.2,
        "latency_s_per_request": 1.0, "tokens_per_s": 20.0, "peak_rss_bytes": 900_000_000,
        "peak_cuda_bytes": None, "n_samples": 4}


def _report(gptq_weights: str, gptq_memory: int) -> dict:
    merged = {**_ROW, "size_bytes": 538_090_408, "memory_bytes": 269_045_204, "weights": "bfloat16 dense"}
    gptq = {**_ROW, "size_bytes": 173_186_776, "memory_bytes": gptq_memory, "weights": gptq_weights}
    return {"metric": "exact_match", "test_rows": 10, "variants": {"merged": merged, "gptq": gptq},
            "vs_merged": {"gptq": {"perplexity_increase": 0.01, "task_metric_change": 0.0, "size_ratio": 0.3219,
                                   "memory_ratio": round(gptq_memory / merged["memory_bytes"], 4)}}}


def test_packed_w4a16_shows_its_packed_memory_and_how_it_is_held() -> None:
    report = _report("int4 packed 210/210 linears", 116_400_000)
    md = eval_report.render_markdown(report)
    assert "memory 43% of merged (weights: int4 packed 210/210 linears)" in md
    csv = eval_report.table_csv(report["variants"]).splitlines()
    assert csv[0].split(",").index("weights") == csv[0].split(",").index("memory_bytes") + 1
    assert csv[2].split(",")[csv[0].split(",").index("weights")] == "int4 packed 210/210 linears"
    rows = {r["variant"]: r for r in eval_report.table_rows(report)}
    assert rows["gptq"]["memory_bytes"] == "116.4 MB" and rows["gptq"]["weights"] == "int4 packed 210/210 linears"


def test_dequantized_w4a16_is_not_credited_with_its_file_size() -> None:
    # Where the kernel could not take the layers, the table shows the memory actually held.
    report = _report("dequantized 210/210 linears", 269_045_204)
    md = eval_report.render_markdown(report)
    assert "size 32% of merged, memory 100% of merged (weights: dequantized 210/210 linears)" in md
