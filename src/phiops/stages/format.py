"""Stage `format`: validated conversations -> chat-formatted, tokenized train/test splits.

Each conversation is rendered with the model's own chat template (or a named one,
:mod:`phiops.templates`), exactly as serving renders a request, and tokenized once here so
training, calibration and evaluation read the same ids.

- **Loss mask.** The rendering is cut at each assistant turn: the text up to the generation
  prompt is context (label ``-100``), the assistant turn with its end-of-turn token is trained.
  Pieces are tokenized separately and concatenated, so the prompt's ids are exactly the ids
  serving feeds the model before it generates. The stop token must be in every untruncated
  row's labels (a model that never learns its stop token never stops), or the stage fails.
- **Round trip.** Every rendered text is parsed back into its messages (the template rendered
  once per role sequence with placeholders gives the frame), and each must equal the original
  content (up to surrounding whitespace, which some templates trim); the trained tokens must
  decode to text containing the answer. A row that fails means the model would train on
  something else than the data says: the stage fails and names the row.
- **Split.** ``validate`` assigned each row its split (by prompt hash, or ``data.test``).
- **Streaming.** Rows are read, rendered and tokenized in batches and written as they go.

Outputs: ``data/processed/{train,test}.jsonl``, ``reports/format.json`` (metrics: rows,
truncation counts, token length stats) and ``reports/format_lengths.csv`` (histogram, a DVC plot).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiops import data as D
from phiops import models, templates
from phiops.config import Params
from phiops.io import JsonlWriter, read_jsonl, write_json, write_text
from phiops.paths import Layout

IGNORE = -100  # the label value transformers' loss skips
BATCH_ROWS = 2048  # rows rendered and tokenized per batch
HIST_BIN = 16  # tokens per histogram bin
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters frame placeholders in a skeleton


class FormatError(D.DataError):
    """The template cannot be trained with a prompt mask, or a row does not round-trip."""


@dataclass(frozen=True)
class FormatOutputs:
    train: Path
    test: Path
    report: Path
    lengths: Path


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend ``data.system_prompt`` unless the conversation has its own system message."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _render(tok: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def pieces(tok: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, trained)`` pieces; their concatenation is the rendering.

    Raises:
        FormatError: a rendering of the first turns is not a prefix of the next one (a template
            that rewrites earlier turns cannot be trained with a prompt mask).
    """
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tok, messages[:i], True)
        full = _render(tok, messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise FormatError("chat template: the prompt does not render as a prefix of the conversation "
                              f"(at message {i}); it cannot be trained with a prompt mask")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return out


class RoundTrip:
    """Parse rendered text back into message contents, through a skeleton per role sequence."""

    def __init__(self, tok: Any):
        self.tok = tok
        self._frames: dict[tuple[str, ...], re.Pattern[str] | None] = {}
        specials = [str(t) for t in getattr(tok, "all_special_tokens", [])]
        specials += [str(t) for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
        pattern = D.special_token_pattern(specials)
        self._special = re.compile(pattern) if pattern else None

    def _frame(self, roles: tuple[str, ...]) -> re.Pattern[str] | None:
        if roles not in self._frames:
            marks = [f"{_OPEN}{i}{_CLOSE}" for i in range(len(roles))]
            skeleton = _render(self.tok, [{"role": r, "content": s} for r, s in zip(roles, marks)], False)
            parts = re.split(f"({_OPEN}\\d+{_CLOSE})", skeleton)
            found = parts[1::2]
            self._frames[roles] = None if found != marks else re.compile(
                "".join("(.*?)" if k % 2 else re.escape(p) for k, p in enumerate(parts)), re.DOTALL)
        return self._frames[roles]

    def parse(self, text: str, roles: tuple[str, ...]) -> list[str] | None:
        """The contents `text` renders, in order; None when it is not a rendering of `roles`."""
        frame = self._frame(roles)
        m = frame.fullmatch(text) if frame is not None else None
        return list(m.groups()) if m else None

    def problem(self, text: str, messages: list[dict[str, str]]) -> str | None:
        """Why `text` does not round-trip to `messages`, or None."""
        if self._special is not None:
            for i, m in enumerate(messages):
                hit = self._special.search(m["content"])
                if hit:
                    return f"messages[{i}].content contains the special token {hit.group()!r} (validate rejects these)"
        got = self.parse(text, tuple(m["role"] for m in messages))
        if got is None:
            return "the rendered text does not parse back into its messages (content contains template markers?)"
        for i, (g, m) in enumerate(zip(got, messages)):
            if g != m["content"] and g != m["content"].strip():
                return f"messages[{i}].content renders as {g[:60]!r}, not {m['content'][:60]!r}"
        return None


def _batches(path: Path, n: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in read_jsonl(path):
        batch.append(row)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenize(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` without special tokens added (the template wrote them as text)."""
    if not texts:
        return []
    backend = getattr(tok, "_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is not None:
        # Same encoding as tok(texts), minus transformers' per-row BatchEncoding conversion
        # (measured: a third of this stage's time on 100k rows).
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False)["input_ids"]


def encode_batch(tok: Any, convs: list[list[dict[str, str]]], max_length: int) -> list[dict[str, Any]]:
    """Render and tokenize conversations; labels are the assistant turns, the rest IGNORE.

    Returns:
        Per conversation: ``text`` (the rendering), ``input_ids``, ``labels`` (both cut to
        `max_length`), ``prompt_len`` (tokens before the last assistant turn), ``truncated``.
    """
    cut = [pieces(tok, msgs) for msgs in convs]
    flat = [text for ps in cut for text, _ in ps]
    ids = _tokenize(tok, flat)
    out = []
    k = 0
    for ps in cut:
        input_ids: list[int] = []
        labels: list[int] = []
        prompt_len = 0
        for _, trained in ps:
            piece = list(ids[k])
            k += 1
            if not trained:
                prompt_len = len(input_ids) + len(piece)
            input_ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        out.append({"text": "".join(t for t, _ in ps), "input_ids": input_ids[:max_length],
                    "labels": labels[:max_length], "prompt_len": prompt_len, "truncated": len(input_ids) > max_length})
    return out


def run(cfg: Params, layout: Layout, tokenizer: Any = None) -> FormatOutputs:
    """Render, tokenize, check and write the splits ``validate`` assigned.

    Args:
        cfg: the validated params.
        layout: artifact paths.
        tokenizer: injected in tests; by default the base model's.

    Returns:
        Paths of the train split, the test split, the report (DVC metrics) and the histogram.

    Raises:
        FormatError: a row does not round-trip, an untruncated train row has no stop token in
            its labels, the template cannot be masked, or a split is empty. Nothing is written
            at the output paths then.
    """
    t0 = time.perf_counter()
    tok = tokenizer or models.load_tokenizer(models.resolve(cfg.model.base))
    templates.apply(tok, cfg.model.chat_template)
    eos_ids = set(models.stop_ids(tok))
    trip = RoundTrip(tok)
    max_length = cfg.format.max_length

    writers = {"train": JsonlWriter(layout.train_split), "test": JsonlWriter(layout.test_split)}
    hist: Counter[int] = Counter()
    lengths_sum = truncated = 0
    no_labels: list[str] = []
    lo, hi = 1 << 30, 0
    bad: list[str] = []
    try:
        for batch in _batches(layout.validated, BATCH_ROWS):
            convs = [with_system(r["messages"], cfg.data.system_prompt) for r in batch]
            encs = encode_batch(tok, convs, max_length)
            trained_text = tok.batch_decode([[t for t in e["labels"] if t != IGNORE] for e in encs],
                                            skip_special_tokens=False)
            for row, msgs, enc, answer in zip(batch, convs, encs, trained_text):
                where = f"{row.get('source')}:{row.get('source_line')}"
                problem = trip.problem(enc["text"], msgs)
                if problem is None and not enc["truncated"] and msgs[-1]["content"].strip() not in answer:
                    problem = f"the trained tokens decode to {answer[:60]!r}, which lacks the answer"
                trained = {t for t in enc["labels"] if t != IGNORE}
                if problem is None and not enc["truncated"] and row["split"] == "train" and not eos_ids & trained:
                    problem = "no end-of-turn token in the labels: the model would never learn to stop"
                if problem is not None:
                    bad.append(f"{where}: {problem}")
                    continue
                n = len(enc["input_ids"])
                truncated += enc["truncated"]
                if not trained and row["split"] == "train":
                    # The prompt alone fills format.max_length: nothing to learn, and a batch of such
                    # rows has no label token at all (a NaN loss). Counted and named, not written.
                    no_labels.append(where)
                    continue
                hist[min(n // HIST_BIN * HIST_BIN, max_length)] += 1
                lengths_sum += n
                lo, hi = min(lo, n), max(hi, n)
                writers[row["split"]].write({"id": row["id"], "source": row.get("source"),
                                             "source_line": row.get("source_line"), "messages": msgs, **enc})
        rows = writers["train"].rows + writers["test"].rows
        if bad:
            listed = "\n".join(f"  - {b}" for b in bad[:20])
            raise FormatError(f"{len(bad)} of {rows + len(bad)} rows cannot be trained as written:\n{listed}")
        if not writers["train"].rows or not writers["test"].rows:
            raise FormatError(
                f"split produced {writers['train'].rows} train / {writers['test'].rows} test rows; need both "
                "non-empty (more rows, another data.test_fraction, or data.test)")
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    for w in writers.values():
        w.commit()

    total = sum(hist.values())
    cum, pct = 0, {}
    for b in sorted(hist):
        cum += hist[b]
        for q in (50, 95, 99):
            if f"p{q}" not in pct and cum >= q / 100 * total:
                pct[f"p{q}"] = b + HIST_BIN - 1 if b < max_length else max_length
    report = {
        "rows": total,
        "train_rows": writers["train"].rows,
        "test_rows": writers["test"].rows,
        "truncated": truncated,
        "train_rows_skipped_without_labels": len(no_labels),
        "skipped_without_labels": no_labels[:20],
        "max_length": max_length,
        "tokens": {"min": lo, "max": hi, "mean": round(lengths_sum / total, 1), **pct},
        "round_trip_checked": total,
        "chat_template": cfg.model.chat_template,
        "system_prompt": cfg.data.system_prompt,
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    write_json(layout.format_report, report)
    write_text(layout.format_lengths, "tokens,rows\n" + "".join(f"{b},{hist[b]}\n" for b in sorted(hist)))
    return FormatOutputs(layout.train_split, layout.test_split, layout.format_report, layout.format_lengths)
