"""Stage `evaluate`: score every variant on the test split.

Variants: base, merged, gptq and awq (:func:`run`, the DVC stage, cached by content), and the
current production model (:func:`production`). Production is scored outside DVC, like the gate:
it is registry state (a GTO tag), not a content-hashed input, so inside the cached stage its
row would go stale after a rollback, or a promotion would re-run evaluation with nothing
changed. Its files are checked against the registry's sha256 before anything loads them.

Evaluate what you serve: each variant is loaded as the service loads it
(:func:`phiops.serve.loader.load_checkpoint`, so in the served dtype: ``serve.dtype: auto`` is
bf16 on CUDA and on AMX CPUs, fp32 elsewhere; the row's ``dtype`` says which) and its answers
come from the bento's continuous-batching engine (:class:`phiops.serve.engine.Engine`: the same
prefill/decode passes, greedy sampling and stop handling), with at most ``evaluate.batch_size``
rows decoding together. Each row leaves the batch at its own stop token (every id of
:func:`phiops.serve.checkpoint.eos_ids`, as the service) or after ``evaluate.max_new_tokens``, and a waiting prompt takes
its place at the next step; no batch waits for its longest answer.

For each variant: perplexity on the assistant tokens of the test split (in the served dtype);
the task metric (`evaluate.metric`) and JSON validity of greedy answers; optionally embedding
similarity of answer and reference (:mod:`phiops.embeddings`); size on disk; the weights' bytes
in memory and how they are held (``weights``: ``int4 packed 210/210 linears`` where the W4A16
layers run on the int4 kernel, as the service runs them, ``dequantized ...`` where they were
unpacked); peak memory (process RSS, and the CUDA allocator's peak on GPU) of that variant
alone; and speed, as the
engine serves the sample with all of it submitted at once:

- ``tokens_per_s``: every generated token (stop tokens counted) over the wall time of the whole
  sample, first submit to last answer, ``evaluate.batch_size`` rows in flight;
- ``latency_s_per_request``: the median time from a request's admission to a batch row to its
  final event (queueing for a row not counted): what one served request takes when it shares
  the model with ``evaluate.batch_size - 1`` others.

Outputs: a metrics JSON (DVC metrics), the per-example scores (the gate's bootstrap pairs them
by row id), a CSV table and PNG plots (DVC plots) and a markdown report that shows both
(rendered by :mod:`phiops.eval_report`).
"""

from __future__ import annotations

import gc
import io
import logging
import math
import queue
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from phiops import models, templates
from phiops.config import QUANT_METHODS, Params
from phiops.eval_report import render_markdown, table_csv, write_plots
from phiops.io import dir_manifest, read_jsonl, write_json, write_jsonl, write_text
from phiops.lineage import read_json, variant_dir
from phiops.memory import measure_peak
from phiops.metrics import METRICS
from phiops.paths import Layout

log = logging.getLogger(__name__)
T = TypeVar("T")

CANDIDATES = ("merged", *QUANT_METHODS)


@dataclass(frozen=True)
class EvaluateOutputs:
    report: Path
    markdown: Path
    table: Path
    samples: Path
    plots: tuple[Path, ...] = ()


@dataclass
class VariantResult:
    """One variant's row of the table and its per-example results (generation order)."""

    row: dict[str, Any]
    ids: list[str]
    scores: list[float]
    answers: list[str]
    similarities: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------


class _LogLines(io.TextIOBase):
    """A file for tqdm that turns each refresh into one log line (DVC/Prefect logs are not TTYs)."""

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            log.info(text)
        return len(s)


def progress(items: Iterable[T], total: int, desc: str, unit: str = "batch") -> Iterator[T]:
    """tqdm on a terminal; under DVC or Prefect a log line every 15 s instead of a redrawn bar."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    yield from tqdm(
        items, total=total, desc=desc, unit=unit, leave=tty, file=None if tty else _LogLines(),
        mininterval=0.5 if tty else 15.0, dynamic_ncols=tty, ascii=not tty,
    )


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


def variants(cfg: Params, layout: Layout) -> dict[str, Path]:
    """Name -> checkpoint directory of every DVC-tracked variant to score, base first."""
    out = {"base": Path(models.resolve(cfg.model.base))}
    out.update({v: variant_dir(layout, v) for v in CANDIDATES})
    return out


def perplexity(model: Any, rows: list[dict[str, Any]], pad_id: int, batch_size: int, desc: str = "perplexity") -> float:
    """exp(mean NLL) over the label (assistant) tokens of `rows`."""
    import torch

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    starts = range(0, len(rows), batch_size)
    for i in progress(starts, len(starts), desc):
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


@dataclass
class Generation:
    """What generating the sample through the engine gave (:func:`generate`)."""

    answers: list[str]  # in prompt order
    tokens: list[int]  # generated tokens per answer, its stop token counted (the engine's completion_tokens)
    latencies: list[float]  # seconds from a request's admission to a batch row to its final event
    seconds: float  # wall time of the whole sample, first submit to last final event


def generate(engine: Any, tok: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int,
             desc: str = "generate") -> Generation:
    """Greedy answers for chat prompts through the serving engine, all submitted at once.

    The prompts are encoded as the service encodes a chat request (the chat template's text,
    tokenized without adding special tokens); the engine decodes at most its
    ``max_batch_size`` rows together, a row leaves at its own stop token or length, and a
    waiting prompt takes the freed row at the next step.

    Args:
        engine: a running :class:`phiops.serve.engine.Engine` over the variant.
        tok: its tokenizer, with the chat template to apply.
        prompts: chat messages per prompt, without the answer.
        max_new_tokens: the most tokens per answer.
        desc: the progress line's label.

    Returns:
        The answers, token counts and timings.

    Raises:
        RuntimeError: a request failed in the engine, or the engine stopped; a missing answer
            is never scored as an empty one.
    """
    from phiops.serve.engine import Event, Request
    from phiops.serve.sampling import SamplingParams

    n = len(prompts)
    texts: list[list[str]] = [[] for _ in prompts]
    finals: queue.Queue[tuple[int, Event, float]] = queue.Queue()

    def emit(i: int, ev: Event) -> None:  # on the engine thread
        texts[i].append(ev.text)
        if ev.finish_reason or ev.error:
            finals.put((i, ev, time.perf_counter()))

    ids = [tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
           for p in prompts]
    requests = [Request(prompt=list(p), max_new_tokens=max_new_tokens, sampling=SamplingParams(),
                        emit=lambda ev, i=i: emit(i, ev)) for i, p in enumerate(ids)]
    t0 = time.perf_counter()
    for r in requests:
        engine.submit(r)
    tokens, latencies = [0] * n, [0.0] * n
    for _ in progress(range(n), n, desc, unit="answer"):
        while True:
            try:
                i, ev, ended = finals.get(timeout=1.0)
                break
            except queue.Empty:
                if not engine.alive():
                    raise RuntimeError(f"{desc}: the generation engine stopped before every answer came") from None
        if ev.error or ev.finish_reason == "cancelled":
            for r in requests:
                r.cancel()
            raise RuntimeError(f"{desc}: generating answer {i} failed in the engine: {ev.error or 'cancelled'}")
        tokens[i], latencies[i] = ev.completion_tokens, ended - requests[i].admitted
    seconds = time.perf_counter() - t0
    return Generation(["".join(t) for t in texts], tokens, latencies, seconds)


def weights_size(path: Path) -> int:
    """Bytes of weights on disk (*.safetensors): what serving loads, without tokenizer files."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def memory_bytes(model: Any) -> int:
    """Bytes the loaded model's parameters and buffers hold in memory (as loaded for serving)."""
    return int(model.get_memory_footprint())


@dataclass
class Served:
    """A variant loaded as the service loads it, with its running engine (:func:`serve`)."""

    model: Any
    tok: Any
    engine: Any
    device: str
    dtype: str
    steps: list[int]  # rows of each forward pass the engine ran (prefill and decode)

    def close(self) -> None:
        """Stop the engine's thread and drop every reference this object holds to the model."""
        if not self.engine.close():  # a pass still running after 30 s would keep the model alive
            raise RuntimeError("the generation engine did not stop within 30 s")
        self.model = self.engine = self.tok = None


def serve(name: str, path: Path, cfg: Params, device: str) -> Served:
    """Load a variant exactly as the service does and start the serving engine over it.

    :func:`phiops.serve.loader.load_checkpoint` picks the weights' dtype from ``serve.dtype``
    (``auto``: bf16 on CUDA and on AMX CPUs, else fp32); on CUDA the service's fast path
    (int4 kernels for W4A16 layers, the solo-request decoder) is applied as well. The engine is
    the bento's, with at most ``evaluate.batch_size`` rows decoding together.

    Args:
        name: the variant (``base`` gets the configured chat template, as before serving it).
        path: its checkpoint directory.
        cfg: the validated params (``serve.dtype``, ``serve.max_batch_wait_ms``,
            ``evaluate.batch_size``, ``model.chat_template``).
        device: ``cuda`` or ``cpu``.

    Returns:
        The model, tokenizer and running engine; :meth:`Served.close` it when done.
    """
    from phiops.serve.engine import Engine
    from phiops.serve.loader import cuda_fastpath, load_checkpoint

    model, tok, eos, device, dtype = load_checkpoint(str(path), cfg.serve.dtype, device, label=name,
                                                     require_chat_template=False)
    if name == "base":
        templates.apply(tok, cfg.model.chat_template)
    # The service's end-of-turn ids (serve.checkpoint.eos_ids) plus any the checkpoint's
    # generation_config.json names beyond the loaded model's (both files are the same checkpoint,
    # so normally none).
    extra = sorted(set(models.stop_ids(tok, path)) - set(eos))
    solo = cuda_fastpath(model, cfg.serve, device) if device == "cuda" else None
    steps: list[int] = []
    engine = Engine(model, tok, [*eos, *extra], device, max_batch_size=cfg.evaluate.batch_size,
                    max_wait_ms=cfg.serve.max_batch_wait_ms, on_step=lambda phase, rows, new: steps.append(rows),
                    solo=solo, prefill_chunk=cfg.serve.prefill_chunk_tokens)
    return Served(model, tok, engine, device, dtype, steps)


def score_variant(
    name: str, path: Path, cfg: Params, test: list[dict[str, Any]], embedder: Any = None
) -> VariantResult:
    """Load one variant as the service does and compute its row of the table.

    Args:
        name: the variant's name (``base`` gets the configured chat template applied).
        path: its safetensors checkpoint directory.
        cfg: the validated params.
        test: the test split rows (perplexity on all, generation on the first
            ``evaluate.max_samples``).
        embedder: an :class:`phiops.embeddings.Embedder`, or None to skip similarity.

    Returns:
        The row, the per-example scores, answers and similarities, and in ``extra["engine"]``
        what the engine counted (requests finished, forward passes, most rows in one pass).

    Raises:
        ModelError: the checkpoint holds no safetensors weights.
        RuntimeError: a generation failed in the engine.
    """
    import torch

    from phiops.serve.decode import weights_held  # torch: imported where a model is loaded

    models.check_safetensors(path)  # before the tokenizer too: a pickle-only directory fails here, clearly
    device = models.pick_device(cfg.train.device)
    t0 = time.perf_counter()
    with measure_peak(device) as mem:
        torch.manual_seed(cfg.evaluate.seed)
        served = serve(name, path, cfg, device)
        dtype = served.dtype
        try:
            tok = served.tok
            pad = tok.pad_token_id if tok.pad_token_id is not None else served.engine.pad_id
            ppl = perplexity(served.model, test, pad, cfg.evaluate.batch_size, desc=f"{name} perplexity")
            sample = test[: cfg.evaluate.max_samples]
            gen = generate(served.engine, tok, [r["messages"][:-1] for r in sample], cfg.evaluate.max_new_tokens,
                           desc=f"{name} generate")
            # Bytes of parameters and buffers as held: packed int4 buffers for W4A16 layers on the
            # int4 kernel, full precision for layers that fell back; `weights` says which.
            footprint = memory_bytes(served.model)
            held = weights_held(served.model)
            s = served.engine.stats
            engine = {"finished": s.finished, "failed": s.failed, "prefill_passes": s.prefill_passes,
                      "forward_passes": s.forward_passes, "generated_tokens": s.generated_tokens,
                      "max_rows": max(served.steps, default=0)}
        finally:
            served.close()  # the engine's thread ends and lets go of the model before the next variant loads
            del served
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    answers = gen.answers
    refs = [r["messages"][-1]["content"] for r in sample]
    metric = METRICS[cfg.evaluate.metric]
    scores = [metric(a, ref) for a, ref in zip(answers, refs)]
    sims = embedder.similarity(answers, refs) if embedder is not None else None
    n = len(sample)
    row = {
        "perplexity": round(ppl, 4),
        "task_metric": round(sum(scores) / n, 4),
        "json_validity": round(sum(METRICS["json_validity"](a, "") for a in answers) / n, 4),
        "embedding_similarity": round(sum(sims) / n, 4) if sims is not None else None,
        # Median seconds from a request's admission to a batch row to its last token, with up
        # to `evaluate.batch_size` rows decoding together (a served request's time in the engine).
        "latency_s_per_request": round(statistics.median(gen.latencies), 4),
        # Every generated token of the sample over the wall time of the whole sample.
        "tokens_per_s": round(sum(gen.tokens) / gen.seconds, 1) if gen.seconds else None,
        "size_bytes": weights_size(path),
        "memory_bytes": footprint,
        "weights": held,
        "peak_rss_bytes": mem["peak_rss_bytes"],
        "peak_cuda_bytes": mem["peak_cuda_bytes"],
        "n_samples": n,
        "seconds": round(time.perf_counter() - t0, 1),
        "device": device,
        "dtype": dtype,  # the served dtype (serve.dtype): perplexity and answers both use it
    }
    return VariantResult(row, [r["id"] for r in sample], scores, answers, sims, extra={"engine": engine})


def _embedder(cfg: Params) -> Any:
    if not cfg.evaluate.embedding_similarity:
        return None
    from phiops.embeddings import Embedder

    return Embedder(device=models.pick_device(cfg.train.device))


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def run(cfg: Params, layout: Layout) -> EvaluateOutputs:
    """Evaluate base, merged and the quantized variants on the test split.

    Returns:
        Paths of the metrics JSON, the markdown report, the CSV table, the per-example scores
        and the PNG plots.
    """
    test = list(read_jsonl(layout.test_split))
    embedder = _embedder(cfg)
    table: dict[str, dict[str, Any]] = {}
    samples: list[dict[str, Any]] = []
    for name, path in variants(cfg, layout).items():
        res = score_variant(name, path, cfg, test, embedder)
        table[name] = res.row
        log.info("evaluate %s: %s", name, res.row)
        samples += _sample_rows(name, res)

    report = {
        "metric": cfg.evaluate.metric,
        "test_rows": len(test),
        "seed": cfg.evaluate.seed,
        "variants": table,
        # Relative to merged: what the gate's quantized-variant rule reads, and what the issue asks to report.
        "vs_merged": _vs_merged(table),
    }
    write_json(layout.eval_report, report)
    write_jsonl(layout.eval_samples, samples)
    write_text(layout.eval_table, table_csv(table))
    plots = write_plots(layout, table)
    write_text(layout.eval_markdown, render_markdown(report, plot_dir=layout.eval_plots.relative_to(layout.eval_markdown.parent)))
    return EvaluateOutputs(layout.eval_report, layout.eval_markdown, layout.eval_table, layout.eval_samples, plots)


def _sample_rows(name: str, res: VariantResult) -> list[dict[str, Any]]:
    sims = res.similarities or [None] * len(res.ids)
    return [
        {"variant": name, "id": i, "score": s, "similarity": sim, "answer": a}
        for i, s, sim, a in zip(res.ids, res.scores, sims, res.answers)
    ]


def _vs_merged(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    merged = table.get("merged")
    if not merged:
        return {}
    out = {}
    for name in QUANT_METHODS:
        row = table.get(name)
        if row:
            out[name] = {
                "perplexity_increase": round(row["perplexity"] / merged["perplexity"] - 1, 4),
                "task_metric_change": round(row["task_metric"] / merged["task_metric"] - 1, 4) if merged["task_metric"] else None,
                "size_ratio": round(row["size_bytes"] / merged["size_bytes"], 4) if merged["size_bytes"] else None,
                # What serving holds, not the file: a dequantized W4A16 model holds as much as merged.
                "memory_ratio": (round(row["memory_bytes"] / merged["memory_bytes"], 4)
                                 if row.get("memory_bytes") and merged.get("memory_bytes") else None),
            }
    return out


def load_scores(layout: Layout) -> dict[str, dict[str, float]]:
    """Per-example task scores by variant then test-row id, from `reports/eval_samples.jsonl`."""
    out: dict[str, dict[str, float]] = {}
    if layout.eval_samples.exists():
        for r in read_jsonl(layout.eval_samples):
            out.setdefault(r["variant"], {})[r["id"]] = r["score"]
    return out


# --------------------------------------------------------------------------------------
# The production model (outside DVC)
# --------------------------------------------------------------------------------------


def production(cfg: Params, layout: Layout, record: dict[str, Any]) -> dict[str, Any]:
    """Score the production model on the current test split and write `reports/eval_production.json`.

    Which files: the working tree's ``record["model_path"]`` when its sha256 manifest equals
    the record's (the candidate variant is byte for byte production: its row and scores from
    this evaluation are reused, nothing is loaded twice); otherwise the registered commit's
    files, restored from DVC's cache into a temporary directory and checked against the
    record's sha256 before anything loads them.

    Args:
        cfg: the validated params.
        layout: artifact paths (the test split and this run's evaluation are read).
        record: the production registry record (:meth:`phiops.registry.Registry.production`).

    Returns:
        ``{"version", "variant", "source", "files_verified", "metrics", "scores"}``; scores
        map test-row id to the task score, for the gate's paired bootstrap.

    Raises:
        RegistryError: production's files cannot be found or differ from the record.
    """
    from phiops import artifacts

    version, path = record["version"], layout.root / record["model_path"]
    out: dict[str, Any] = {"version": version, "variant": record.get("variant"), "files_verified": True}
    same = path.is_dir() and dir_manifest(path) == record["files"]
    name = record.get("variant")
    current = read_json(layout.eval_report).get("variants", {}) if layout.eval_report.exists() else {}
    if same and name in current:
        out["source"] = f"working tree {record['model_path']} (same files as this run's {name}: row reused)"
        out["metrics"] = current[name]
        out["scores"] = load_scores(layout).get(name, {})
    else:
        # Files first: a tampered or missing production model is refused before anything
        # else is read or loaded.
        with artifacts.verified_files(layout.root, record) as (src, out["source"]):
            test = list(read_jsonl(layout.test_split))
            res = score_variant("production", src, cfg, test, _embedder(cfg))
        out["metrics"] = res.row
        out["scores"] = dict(zip(res.ids, res.scores))
    log.info("evaluate production %s (%s): %s", version, out["source"], out["metrics"])
    write_json(layout.eval_production, out)
    return out
