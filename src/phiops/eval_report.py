"""The evaluation report: what `evaluate` measured, as a CSV table, PNG plots and markdown.

Pure rendering of ``reports/eval.json``'s variant table (:mod:`phiops.stages.evaluate` scores,
this module shows): the CSV and plots are DVC plots, the markdown and table rows are what the
approver reads (the flow posts them as Prefect artifacts). Nothing here loads a model.

The markdown names the device and dtype each row was scored in: the evaluate stage loads each
variant in the served dtype (``serve.dtype``), so a bf16 row and an fp32 row are not the same
arithmetic, and the reader should see which is which.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from phiops.gate import CANDIDATES
from phiops.io import write_bytes
from phiops.paths import Layout

PLOTS = ("quality", "size_perplexity", "speed_memory")

_COLUMNS = (
    "task_metric", "json_validity", "embedding_similarity", "perplexity", "size_bytes", "memory_bytes", "weights",
    "peak_rss_bytes", "peak_cuda_bytes", "latency_s_per_request", "tokens_per_s",
)


def table_csv(table: dict[str, dict[str, Any]]) -> str:
    """The variant table as CSV (a DVC plot): one row per variant, an empty cell where unmeasured.

    Args:
        table: variant name -> its row (``reports/eval.json``'s ``variants``).

    Returns:
        The CSV text, header first.
    """
    lines = ["variant," + ",".join(_COLUMNS)]
    lines += [f"{name}," + ",".join("" if row.get(c) is None else str(row[c]) for c in _COLUMNS) for name, row in table.items()]
    return "\n".join(lines) + "\n"


def _cell(col: str, value: Any) -> str:
    if value is None:
        return "-"
    if col.endswith("_bytes"):
        return f"{value / 1e6:.1f} MB"
    return str(value)


def _ordered(table: dict[str, Any]) -> list[tuple[str, Any]]:
    """base, merged, gptq, awq, then anything else (eval.json's keys come back sorted)."""
    order = ("base", *CANDIDATES)
    return sorted(table.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))


def table_rows(report: dict[str, Any], prod: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The table as a list of rows (a Prefect table artifact), production last if given."""
    rows = [{"variant": n, **{c: _cell(c, r.get(c)) for c in _COLUMNS}} for n, r in _ordered(report["variants"])]
    if prod is not None:
        rows.append({"variant": f"production {prod['version']}", **{c: _cell(c, prod["metrics"].get(c)) for c in _COLUMNS}})
    return rows


def render_markdown(report: dict[str, Any], prod: dict[str, Any] | None = None, plot_dir: Path | str | None = None) -> str:
    """The eval table as markdown: what the approver reads.

    Args:
        report: `reports/eval.json`.
        prod: the production evaluation (:func:`phiops.stages.evaluate.production`), shown as the last row.
        plot_dir: where the PNGs are, relative to the markdown file; None leaves them out.
    """
    rows = table_rows(report, prod)
    head = "| variant | " + " | ".join(_COLUMNS) + " |"
    sep = "|" + "---|" * (len(_COLUMNS) + 1)
    body = [f"| {r['variant']} | " + " | ".join(r[c] for c in _COLUMNS) + " |" for r in rows]
    first = next(iter(report["variants"].values()))
    parts = [
        "# Evaluation\n",
        f"Task metric: `{report['metric']}` on the first {first['n_samples']} of {report['test_rows']} test rows "
        f"(perplexity on all of them; answer tokens only).\n",
        "\n".join([head, sep, *body]) + "\n",
    ]
    scored = _ordered(report["variants"])
    if prod is not None:
        scored.append((f"production {prod['version']}", prod["metrics"]))
    parts.append("Scored on (device / dtype, as served): " + "; ".join(
        f"{n} {r.get('device') or '?'} / {r.get('dtype') or '?'}" for n, r in scored) + ".\n")
    if report.get("vs_merged"):
        parts.append("Quantized vs merged: " + "; ".join(
            f"{n} perplexity {v['perplexity_increase']:+.1%}, size {v['size_ratio']:.0%} of merged"
            + _memory_note(v.get("memory_ratio"), report["variants"].get(n, {}).get("weights"))
            + (f", task metric {v['task_metric_change']:+.1%}" if v.get("task_metric_change") is not None else "")
            for n, v in report["vs_merged"].items()
        ) + ".\n")
    if prod is not None:
        parts.append(f"Production {prod['version']} ({prod.get('variant')}) scored from: {prod['source']}.\n")
    if plot_dir is not None:
        parts.append("\n".join(f"![{p}]({Path(plot_dir) / f'eval_{p}.png'})" for p in PLOTS) + "\n")
    return "\n".join(parts)


def _memory_note(ratio: float | None, weights: str | None) -> str:
    """The memory the variant holds against merged, and why: the file's size is only a benefit
    where its weights stay packed (`weights`, from :func:`phiops.serve.decode.weights_held`)."""
    if ratio is None:
        return ""
    return f", memory {ratio:.0%} of merged" + (f" (weights: {weights})" if weights else "")


def write_plots(layout: Layout, table: dict[str, dict[str, Any]]) -> tuple[Path, ...]:
    """Three PNGs (DVC plots): quality scores, size vs perplexity, speed and peak memory."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    names = [n for n, _ in _ordered(table)]
    x = range(len(names))
    paths = []

    fig, ax = plt.subplots(figsize=(7, 3.5))
    cols = [c for c in ("task_metric", "json_validity", "embedding_similarity") if any(table[n].get(c) is not None for n in names)]
    w = 0.8 / len(cols)
    for k, c in enumerate(cols):
        ax.bar([i + k * w for i in x], [table[n].get(c) or 0.0 for n in names], w, label=c)
    ax.set_xticks([i + w * (len(cols) - 1) / 2 for i in x], names)
    ax.set_ylim(0, 1.25)  # headroom for the legend above the bars
    ax.set_title("Quality by variant (higher is better)")
    ax.legend(fontsize=8, loc="upper left", ncols=len(cols))
    paths.append(_save(fig, layout.eval_plot("quality")))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in names:
        ax.scatter(table[n]["size_bytes"] / 1e6, table[n]["perplexity"])
        ax.annotate(n, (table[n]["size_bytes"] / 1e6, table[n]["perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel("perplexity (answer tokens)")
    ax.set_title("Size vs perplexity (lower left is better)")
    paths.append(_save(fig, layout.eval_plot("size_perplexity")))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5))
    a1.bar(names, [table[n]["tokens_per_s"] or 0.0 for n in names])
    a1.set_title("generation tokens/s")
    mem_key = "peak_cuda_bytes" if all(table[n].get("peak_cuda_bytes") for n in names) else "peak_rss_bytes"
    a2.bar(names, [table[n][mem_key] / 1e6 for n in names])
    a2.set_title(f"{mem_key.removesuffix('_bytes').replace('_', ' ')} (MB)")
    for a in (a1, a2):
        a.tick_params(axis="x", labelsize=8)
    paths.append(_save(fig, layout.eval_plot("speed_memory")))
    return tuple(paths)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    # No timestamp or version in the PNG: the same table gives the same bytes.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path
