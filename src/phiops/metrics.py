"""Task metrics: pure functions from (prediction, reference) to a score in [0, 1]."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any


def _as_object(text: str) -> dict[str, Any] | None:
    text = text.strip()
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        # Models sometimes add prose after a valid object; score the first object only.
        start, end = text.find("{"), text.find("}")
        if start < 0 or end < start:
            return None
        try:
            value = json.loads(text[start : end + 1])
        except (json.JSONDecodeError, ValueError):
            return None
    return value if isinstance(value, dict) else None


def exact_match(pred: str, ref: str) -> float:
    return float(pred.strip() == ref.strip())


def json_validity(pred: str, ref: str) -> float:
    return float(_as_object(pred) is not None)


def json_fields(pred: str, ref: str) -> float:
    """Fraction of the reference object's fields the prediction gets exactly right."""
    want = _as_object(ref)
    got = _as_object(pred)
    if not want:
        return exact_match(pred, ref)
    if got is None:
        return 0.0
    return sum(got.get(k) == v for k, v in want.items()) / len(want)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (Lin 2004) on lower-cased word tokens: order-aware overlap for free text."""
    p, r = re.findall(r"\w+", pred.lower()), re.findall(r"\w+", ref.lower())
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "json_validity": json_validity,
    "json_fields": json_fields,
    "rouge_l": rouge_l,
}
