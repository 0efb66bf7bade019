"""Stage `format`: validated rows -> chat-formatted, tokenized train/test splits.

Each example is rendered with the model's own chat template, exactly as serving renders a
request, and tokenized once here so training, calibration and evaluation read the same ids.
Loss is taken on the assistant turn only, including its end-of-turn token: a model that never
learns its stop token never stops.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiops import models, templates
from phiops.config import Params
from phiops.io import read_jsonl, write_json, write_jsonl
from phiops.paths import Layout

IGNORE = -100  # the label value transformers' loss skips


@dataclass(frozen=True)
class FormatOutputs:
    train: Path
    test: Path
    report: Path


def to_messages(row: dict[str, Any], system_prompt: str | None) -> list[dict[str, str]]:
    """An alpaca row {instruction, input, output} as a chat conversation."""
    user = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def row_id(messages: list[dict[str, str]]) -> str:
    """Content hash of a conversation: the row's identity, stable across files and appends."""
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_test(rid: str, test_fraction: float) -> bool:
    """Split by content hash, so adding rows never moves an existing row between splits."""
    return int(rid[:8], 16) / 0x1_0000_0000 < test_fraction


def _ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


def encode(tok, messages: list[dict[str, str]], max_length: int) -> dict[str, Any]:
    """Tokenize a conversation; labels are the assistant tokens, everything else IGNORE.

    Raises:
        ValueError: the rendered prompt is not a prefix of the rendered conversation (a
            template that rewrites earlier turns cannot be trained with a prompt mask).
    """
    prompt = _ids(tok, messages[:-1], add_generation_prompt=True)
    full = _ids(tok, messages)
    if full[: len(prompt)] != prompt:
        raise ValueError("chat template: the prompt does not render as a prefix of the conversation")
    labels = [IGNORE] * len(prompt) + full[len(prompt) :]
    truncated = len(full) > max_length
    return {
        "input_ids": full[:max_length],
        "labels": labels[:max_length],
        "prompt_len": len(prompt),
        "truncated": truncated,
    }


def run(cfg: Params, layout: Layout, tokenizer: Any = None) -> FormatOutputs:
    """Render, tokenize and split the validated rows.

    Args:
        cfg: the validated params.
        layout: artifact paths.
        tokenizer: injected in tests; by default the base model's.

    Returns:
        Paths of the train split, the test split and the report (DVC metrics).
    """
    tok = tokenizer or models.load_tokenizer(models.resolve(cfg.model.base))
    templates.apply(tok, cfg.model.chat_template)
    eos_ids = set(models.stop_ids(tok))

    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    lengths: list[int] = []
    for row in read_jsonl(layout.validated):
        msgs = to_messages(row, cfg.data.system_prompt)
        enc = encode(tok, msgs, cfg.format.max_length)
        rid = row_id(msgs)
        rec = {
            "id": rid,
            "source_line": row.get("source_line"),
            "messages": msgs,
            "text": tok.decode(enc["input_ids"]),
            **enc,
        }
        splits["test" if is_test(rid, cfg.data.test_fraction) else "train"].append(rec)
        lengths.append(len(enc["input_ids"]))  # already cut to format.max_length

    if not splits["train"] or not splits["test"]:
        raise ValueError(
            f"split produced {len(splits['train'])} train / {len(splits['test'])} test rows; "
            "need both non-empty (more rows or another data.test_fraction)"
        )
    # The stop token must be inside the loss mask of every untruncated example.
    untrained_stop = sum(
        1 for r in splits["train"] if not r["truncated"] and not eos_ids & {t for t in r["labels"] if t != IGNORE}
    )
    if untrained_stop:
        raise ValueError(f"{untrained_stop} train examples have no end-of-turn token in their labels")

    write_jsonl(layout.train_split, splits["train"])
    write_jsonl(layout.test_split, splits["test"])
    hist = Counter(min(n // 32 * 32, cfg.format.max_length) for n in lengths)
    report = {
        "rows": len(lengths),
        "train_rows": len(splits["train"]),
        "test_rows": len(splits["test"]),
        "truncated": sum(r["truncated"] for s in splits.values() for r in s),
        "tokens": {"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)},
        "length_histogram": {str(k): v for k, v in sorted(hist.items())},
        "chat_template": cfg.model.chat_template,
    }
    write_json(layout.format_report, report)
    return FormatOutputs(layout.train_split, layout.test_split, layout.format_report)

