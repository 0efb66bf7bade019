"""Stage `evaluate`: score base, merged and quantized variants on the test split.

For each variant: perplexity on the assistant tokens of the test split, the task metric on
greedy generations, generation latency and tokens/s, size on disk and in memory. Outputs a
metrics JSON (DVC metrics), a markdown report a person reads before approving, a CSV table
(DVC plots) and the per-example scores (the gate's bootstrap reads them).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiops import models, templates
from phiops.config import QUANT_METHODS, Params
from phiops.io import read_jsonl, write_json, write_jsonl, write_text
from phiops.lineage import variant_dir
from phiops.metrics import METRICS
from phiops.paths import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateOutputs:
    report: Path
    markdown: Path
    table: Path
    samples: Path


def variants(cfg: Params, layout: Layout) -> dict[str, Path]:
    """Name -> checkpoint directory of every variant to score, base first."""
    out = {"base": Path(models.resolve(cfg.model.base))}
    out.update({v: variant_dir(layout, v) for v in ("merged", *QUANT_METHODS)})
    return out


def perplexity(model: Any, rows: list[dict[str, Any]], pad_id: int, batch_size: int) -> float:
    """exp(mean NLL) over the label (assistant) tokens of `rows`."""
    import torch

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in chunk], device=device)
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in chunk], device=device)
        mask = (torch.arange(width, device=device)[None, :] < torch.tensor([len(r["input_ids"]) for r in chunk], device=device)[:, None]).long()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        nll += float(loss)
        count += int((shift_labels != -100).sum())
    return math.exp(nll / max(count, 1))


def generate(model: Any, tok: Any, prompts: list[list[dict[str, str]]], cfg: Params, stops: list[int]) -> tuple[list[str], int, float]:
    """Greedy answers for chat prompts, batched with left padding.

    Returns:
        (answers, generated token count, seconds).
    """
    import torch

    device = next(model.parameters()).device
    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    answers: list[str] = []
    n_tokens, seconds = 0, 0.0
    bs = cfg.evaluate.batch_size
    for i in range(0, len(prompts), bs):
        texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts[i : i + bs]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=cfg.evaluate.max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tok.pad_token_id,
            )
        seconds += time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1] :]
        for row in new:
            keep = [int(t) for t in row if int(t) != tok.pad_token_id]
            keep = keep[: next((j for j, t in enumerate(keep) if t in stops), len(keep))]
            n_tokens += len(keep) + 1
            answers.append(tok.decode(keep, skip_special_tokens=True))
    return answers, n_tokens, seconds


def score_variant(name: str, path: Path, cfg: Params, test: list[dict[str, Any]]) -> tuple[dict[str, Any], list[float], list[str]]:
    """Load one variant and compute its row of the table."""
    import torch

    device = models.pick_device(cfg.train.device)
    tok = models.load_tokenizer(path)
    if name == "base":
        templates.apply(tok, cfg.model.chat_template)
    torch.manual_seed(cfg.train.seed)
    model = models.load_causal_lm(path, device=device).eval()
    stops = models.stop_ids(tok, path)
    ppl = perplexity(model, test, tok.pad_token_id, cfg.evaluate.batch_size)
    sample = test[: cfg.evaluate.max_samples]
    answers, n_tok, secs = generate(model, tok, [r["messages"][:-1] for r in sample], cfg, stops)
    metric = METRICS[cfg.evaluate.metric]
    scores = [metric(a, r["messages"][-1]["content"]) for a, r in zip(answers, sample)]
    row = {
        "perplexity": round(ppl, 4),
        "task_metric": round(sum(scores) / len(scores), 4),
        "json_validity": round(sum(METRICS["json_validity"](a, "") for a in answers) / len(answers), 4),
        "latency_s_per_request": round(secs / len(sample) * cfg.evaluate.batch_size, 4),
        "tokens_per_s": round(n_tok / secs, 1) if secs else None,
        "size_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")),
        "memory_bytes": int(model.get_memory_footprint()),
        "n_samples": len(sample),
    }
    del model
    return row, scores, answers


def run(cfg: Params, layout: Layout) -> EvaluateOutputs:
    """Evaluate every variant on the test split.

    Returns:
        Paths of the metrics JSON, the markdown report, the CSV table and the per-example scores.
    """
    test = list(read_jsonl(layout.test_split))
    table: dict[str, dict[str, Any]] = {}
    samples: list[dict[str, Any]] = []
    for name, path in variants(cfg, layout).items():
        t0 = time.time()
        row, scores, answers = score_variant(name, path, cfg, test)
        table[name] = row
        log.info("evaluate %s: %s (%.0f s)", name, row, time.time() - t0)
        for r, s, a in zip(test, scores, answers):
            samples.append({"variant": name, "id": r["id"], "score": s, "answer": a})

    report = {"metric": cfg.evaluate.metric, "test_rows": len(test), "variants": table}
    write_json(layout.eval_report, report)
    write_jsonl(layout.eval_samples, samples)
    write_text(layout.eval_table, _csv(table))
    write_text(layout.eval_markdown, render_markdown(report))
    return EvaluateOutputs(layout.eval_report, layout.eval_markdown, layout.eval_table, layout.eval_samples)


_COLUMNS = ("task_metric", "json_validity", "perplexity", "size_bytes", "memory_bytes", "latency_s_per_request", "tokens_per_s")


def _csv(table: dict[str, dict[str, Any]]) -> str:
    lines = ["variant," + ",".join(_COLUMNS)]
    lines += [f"{name}," + ",".join(str(row[c]) for c in _COLUMNS) for name, row in table.items()]
    return "\n".join(lines) + "\n"


def render_markdown(report: dict[str, Any]) -> str:
    """The eval table as markdown: what the approver reads."""
    head = "| variant | " + " | ".join(_COLUMNS) + " |"
    sep = "|" + "---|" * (len(_COLUMNS) + 1)
    rows = []
    for name, row in report["variants"].items():
        cells = []
        for c in _COLUMNS:
            v = row[c]
            cells.append(f"{v / 1e6:.1f} MB" if c.endswith("_bytes") else str(v))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return (
        f"# Evaluation\n\nTask metric: `{report['metric']}` on {report['test_rows']} test rows "
        f"(generation on the first {next(iter(report['variants'].values()))['n_samples']}).\n\n"
        + "\n".join([head, sep, *rows])
        + "\n"
    )
