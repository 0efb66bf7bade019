"""Task metrics: pure functions from (prediction, reference) to a score in [0, 1]."""

from __future__ import annotations

import json
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


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "json_validity": json_validity,
    "json_fields": json_fields,
}
