"""A strict JSON lines reader: every bad line comes back as a located problem, never an exception.

:mod:`phiops.io` reads JSONL this project wrote itself (``read_jsonl`` trusts it). This module
reads JSONL someone handed us: line by line in binary, so that invalid UTF-8, NUL bytes, invalid
JSON, duplicate keys, NaN/Infinity and values that are not JSON objects are each reported with
their line and character column. A UTF-8 BOM at the start is stripped, CRLF endings are
accepted, blank lines are skipped (not rows). An empty file, a UTF-16 one or a line over
``MAX_LINE_BYTES`` is reported too, without reading it into memory whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A row of max_tokens (<= a few thousand) tokens is tens of KB; a multi-MB "line" is a broken
# file (a missing newline, a binary blob), refused before it is read into memory whole.
MAX_LINE_BYTES = 1 << 20


@dataclass
class FileFacts:
    """File-level facts gathered while a file streams through :func:`iter_jsonl`."""

    bom: bool = False
    crlf_lines: int = 0
    blank_lines: int = 0
    file_error: str | None = None


@dataclass(frozen=True)
class Line:
    """One non-blank line: a parsed object, or (``obj is None``) a parse error at ``col``."""

    line: int
    raw: str
    obj: dict[str, Any] | None = None
    col: int = 0
    reason: str = ""


def _column(data: bytes, byte_offset: int) -> int:
    """1-based character column of `byte_offset` within a line (editors count characters)."""
    return len(data[:byte_offset].decode("utf-8", errors="replace")) + 1


def _iter_lines(f: Any) -> Iterator[tuple[bytes, bool]]:
    """Yield (line, too_long); an over-long line is skipped to its newline without keeping it."""
    while True:
        chunk = f.readline(MAX_LINE_BYTES + 1)
        if not chunk:
            return
        if len(chunk) > MAX_LINE_BYTES and not chunk.endswith(b"\n"):
            head = chunk
            while chunk and not chunk.endswith(b"\n"):
                chunk = f.readline(MAX_LINE_BYTES)
            yield head, True
        else:
            yield chunk, False


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class _BadConstant(ValueError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of repeated keys; a row edited by concatenation
    # would then validate with half of its content gone.
    obj: dict[str, Any] = {}
    for k, val in pairs:
        if k in obj:
            raise _DuplicateKey(k)
        obj[k] = val
    return obj


def _reject_constant(name: str) -> Any:
    raise _BadConstant(name)


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
          type(None): "null"}


def _parse_line(lineno: int, data: bytes) -> Line:
    """One line's bytes (newline removed) as a :class:`Line`: the object, or its first problem."""
    raw = data.decode("utf-8", errors="backslashreplace")
    nul = data.find(b"\x00")
    if nul >= 0:
        return Line(lineno, raw, col=_column(data, nul), reason="NUL byte")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Line(lineno, raw, col=_column(data, exc.start), reason=f"invalid UTF-8 (byte 0x{data[exc.start]:02x})")
    if text.startswith("\ufeff"):  # two files concatenated: the second one's BOM lands mid-file
        return Line(lineno, raw, col=1, reason="UTF-8 BOM in the middle of the file")
    try:
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return Line(lineno, raw, col=exc.colno, reason=f"invalid JSON: {exc.msg}")
    except _DuplicateKey as exc:
        return Line(lineno, raw, col=text.rfind(json.dumps(exc.key)) + 1 or 1,
                    reason=f"duplicate key {exc.key!r} in one object")
    except _BadConstant as exc:
        return Line(lineno, raw, col=text.find(exc.name) + 1 or 1, reason=f"{exc.name} is not valid JSON")
    if not isinstance(obj, dict):
        kind = _KINDS.get(type(obj), type(obj).__name__)
        return Line(lineno, raw, col=1, reason=f"expected a JSON object, got {kind}")
    return Line(lineno, raw, obj=obj)


def iter_jsonl(path: Path, facts: FileFacts) -> Iterator[Line]:
    """Stream a JSONL file: one :class:`Line` per non-blank line; never raises for bad content.

    Args:
        path: the file (opened read-only, binary; read one line at a time).
        facts: filled in as the file is read (BOM, CRLF and blank line counts, a file-level
            error such as UTF-16 or an empty file, set when the stream ends).

    Raises:
        OSError: the file cannot be opened or read.
    """
    seen = False
    with open(path, "rb") as f:
        for lineno, (data, too_long) in enumerate(_iter_lines(f), start=1):
            if lineno == 1:
                if data.startswith((b"\xff\xfe", b"\xfe\xff")):
                    facts.file_error = "file is UTF-16 encoded; expected UTF-8 JSON lines"
                    return
                if data.startswith(b"\xef\xbb\xbf"):
                    facts.bom = True
                    data = data[3:]
            if too_long:
                raw = data[:4096].decode("utf-8", errors="backslashreplace") + "..."
                seen = True
                yield Line(lineno, raw, col=MAX_LINE_BYTES + 1, reason=f"line longer than {MAX_LINE_BYTES} bytes")
                continue
            if data.endswith(b"\r\n"):
                facts.crlf_lines += 1
                data = data[:-2]
            elif data.endswith(b"\n"):
                data = data[:-1]
            if not data.strip():
                facts.blank_lines += 1
                continue
            seen = True
            yield _parse_line(lineno, data)
    if not seen:
        facts.file_error = "file is empty (no JSON lines)"
