"""Input formats and the canonical conversation form every stage after `validate` reads.

Three input formats are accepted, one per file (declared in ``data.format`` or detected):

- ``alpaca``: ``{"instruction", "input", "output"}``; ``input`` may be empty or absent;
- ``prompt_completion``: ``{"prompt", "completion"}``;
- ``chat``: ``{"messages": [{"role", "content"}, ...]}``: an optional system message, then
  user/assistant turns alternating, ending with an assistant turn.

Each is turned into a list of ``{"role", "content"}`` messages. Identity keys are content
hashes: exact (the messages as written), normalized (case, Unicode form and whitespace folded),
and the prompt (every message before the last assistant turn, normalized), which decides the
train/test split. Keying the split on the prompt keeps every row with the same question in
one split, so a test prompt is never also trained on, and adding rows never moves old ones.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from typing import Any, Literal

Format = Literal["alpaca", "chat", "prompt_completion"]
FORMATS: tuple[Format, ...] = ("alpaca", "chat", "prompt_completion")

# Required top-level fields of each format, in the order errors name them.
FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
}
# Optional string fields (may be empty or absent).
OPTIONAL: dict[str, tuple[str, ...]] = {"alpaca": ("input",), "prompt_completion": (), "chat": ()}
ROLES = ("system", "user", "assistant")
# Roles of a conversation joined by ",": optional system, then (user, assistant) pairs.
ROLE_ORDER_RE = r"^(?:system,)?(?:user,assistant,)*user,assistant$"


class DataError(ValueError):
    """The data cannot be trained on as it is; the message names the rows (file:line) and rules."""


def detect(objs: Iterable[dict[str, Any]]) -> Format | None:
    """The format most of `objs` have the fields of; None when none matches or it is a tie.

    Args:
        objs: parsed rows (the first thousand of a file is plenty).
    """
    votes: Counter[str] = Counter()
    for obj in objs:
        for fmt in FORMATS:
            if any(k in obj for k in FIELDS[fmt]):
                votes[fmt] += 1
    ranked = votes.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]  # type: ignore[return-value]


def chat_problem(messages: Any) -> str | None:
    """The first structural problem of a ``messages`` value, or None.

    Only called on lists (the type expectation reports other values). Role *order* is a
    separate rule; this checks each message on its own.
    """
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            return f"{where}: must be an object with role and content, got {short(m)}"
        if "role" not in m:
            return f"{where}.role: missing"
        if m["role"] not in ROLES:
            return f"{where}.role: {short(m['role'])} is not one of {', '.join(ROLES)}"
        if "content" not in m:
            return f"{where}.content: missing"
        if not isinstance(m["content"], str):
            return f"{where}.content: must be a string, got {type(m['content']).__name__} {short(m['content'])}"
        if not m["content"].strip():
            return f"{where}.content: must be a non-empty string, got {short(m['content'])}"
    if not messages:
        return "messages: empty list"
    return None


def short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_messages(obj: dict[str, Any], fmt: Format) -> list[dict[str, str]]:
    """A valid row of `fmt` as a conversation (role and content only; other keys dropped)."""
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
    if fmt == "alpaca":
        extra = obj.get("input") or ""
        user = f"{obj['instruction']}\n\n{extra}" if extra else obj["instruction"]
        return [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]


def fields_text(obj: dict[str, Any], fmt: Format) -> list[tuple[str, str]]:
    """(field path, text) of every string field of a row, for rules that name the field."""
    if fmt == "chat":
        msgs = obj.get("messages")
        if not isinstance(msgs, list):
            return []
        return [(f"messages[{i}].content", m["content"]) for i, m in enumerate(msgs)
                if isinstance(m, dict) and isinstance(m.get("content"), str)]
    names = FIELDS[fmt] + OPTIONAL[fmt]
    return [(k, obj[k]) for k in names if isinstance(obj.get(k), str)]


def special_token_pattern(tokens: Iterable[str]) -> str | None:
    """A regex matching any of a tokenizer's special tokens written as text, or None if none.

    Content that contains ``<|im_end|>`` is tokenized to the real end-of-turn token: the row
    would teach the model to end its turn mid-answer (or fake a user turn).
    """
    toks = sorted({t for t in tokens if t}, key=len, reverse=True)
    return "|".join(re.escape(t) for t in toks) or None


_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Fold what does not change meaning for a duplicate check: Unicode form, case, whitespace."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _digest(parts: Iterable[str]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.digest()


def exact_key(messages: list[dict[str, str]]) -> bytes:
    return _digest(x for m in messages for x in (m["role"], m["content"]))


def normalized_key(messages: list[dict[str, str]]) -> bytes:
    return _digest(x for m in messages for x in (m["role"], normalize(m["content"])))


def prompt_key(messages: list[dict[str, str]]) -> bytes:
    """Key of everything before the last assistant turn, normalized: what a test row asks."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return normalized_key(messages[:last])


def is_test(messages: list[dict[str, str]], test_fraction: float) -> bool:
    """Deterministic split on the prompt's hash: the same question always lands in one split."""
    return int.from_bytes(prompt_key(messages)[:4], "big") / 0x1_0000_0000 < test_fraction


def row_id(messages: list[dict[str, str]]) -> str:
    """A short, stable identity of a conversation (content hash)."""
    return exact_key(messages).hex()[:16]
