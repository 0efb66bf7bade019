"""The validate stage: raw JSONL -> accepted conversations, rejected rows, a report and Data Docs.

Input is ``data.raw`` (a file, or a directory of ``*.jsonl`` files) and optionally ``data.test``
(a held-out file or directory). Each file is ``alpaca``, ``chat`` or ``prompt_completion``
(:mod:`phiops.data`), declared by ``data.format`` or detected per file.

Files are streamed: parsed line by line, validated in chunks of ``validate.chunk_rows`` rows, and
written out as they go, so memory is bounded by a chunk, not the file. Two layers of checks:

1. **Parsing** (:mod:`phiops.jsonl`), line by line in binary: invalid UTF-8, NUL bytes, invalid
   JSON, duplicate keys, NaN/Infinity and values that are not JSON objects are reported as
   ``file:line:column: reason``. A UTF-8 BOM at the start is stripped, CRLF endings are
   accepted, blank lines are skipped (not rows). An empty file, a UTF-16 one, a line over 1 MiB,
   or a file whose format cannot be detected is an error.
2. **Great Expectations** (:mod:`phiops.expectations`; 1.x, ephemeral context), one suite per
   format, on a DataFrame per chunk: required fields present, of the right type, not blank; chat
   messages well formed and in a valid role order; no control characters; token length within
   ``[min_tokens, max_tokens]`` by the base model's tokenizer; no exact or normalized duplicates;
   no train/test leakage (a test prompt that is also a train prompt); optional PII patterns.
   Unexpected rows are mapped back to ``file:line`` through the ``row`` column
   (``unexpected_index_column_names``).

Every rejected row gets reasons like
``data/raw/x.jsonl:17: output: missing; must be a non-empty string (rule required:output)``.

Policy: ``validate.on_invalid=fail`` fails on any invalid row; ``quarantine`` keeps the valid rows
and fails only above ``validate.max_invalid_fraction``. ``over_length: truncate`` keeps rows above
``max_tokens`` (``format`` truncates them; counted as warnings). ``pii: warn`` counts matches,
``reject`` rejects the rows, ``off`` skips the patterns. Rejected rows with their reasons always go
to ``data/quarantine/``; ``rows_in == accepted + rejected`` and the report says so; the report is
written before anything is raised; raw files are only ever opened for reading.

Accepted rows are written in the canonical form (``messages``, ``split``, ``source``,
``source_line``, ``format``, ``meta`` for extra keys), so ``format`` reads one shape.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import resource
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiops import data as D
from phiops.config import Params
from phiops.expectations import CONTROL_RE, Check, Suites
from phiops.io import JsonlWriter, atomic_dir, sha256_file, write_json, write_text
from phiops.jsonl import FileFacts, Line, iter_jsonl
from phiops.paths import Layout

log = logging.getLogger(__name__)

# Problems listed in the exception message and in the report; the quarantine files have all.
MESSAGE_PROBLEMS = 20
REPORT_PROBLEMS = 200
PARSE_RULE = "jsonl_parse"
FILE_RULE = "jsonl_file"
DETECT_ROWS = 1000  # rows read ahead to detect a file's format

TokenCounter = Callable[[Sequence[str]], Sequence[int]]
"""Counts tokens of a batch of texts; injectable so unit tests need no model."""


class DataValidationError(D.DataError):
    """The data failed validation under the configured policy.

    Attributes:
        problems: every problem kept (the first ``REPORT_PROBLEMS``), as
            ``file:line[:column]: field: what (rule r)``.
        report_path: where the full JSON report was written (before raising).
    """

    def __init__(self, message: str, problems: Sequence[str] = (), report_path: Path | None = None):
        super().__init__(message)
        self.problems = list(problems)
        self.report_path = report_path


@dataclass(frozen=True)
class ValidateOutputs:
    """Paths the stage wrote.

    Attributes:
        validated: accepted rows (JSONL, canonical form).
        report: the JSON report (DVC metrics).
        quarantine: the directory of ``<file>.rejected.jsonl``, one per input file with rejects,
            written under either policy (under ``fail`` it shows what failed the run).
        data_docs: the Great Expectations Data Docs site (``index.html`` inside); ``None``
            when no rows parsed or docs were turned off.
    """

    validated: Path
    report: Path
    quarantine: Path
    data_docs: Path | None


# ----------------------------------------------------------------------------- tokens


def hf_token_counter(tokenizer: Any, batch_size: int = 4096) -> TokenCounter:
    """Wrap a Hugging Face tokenizer as a :data:`TokenCounter` (batched, special tokens excluded)."""

    def count(texts: Sequence[str]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i : i + batch_size]), add_special_tokens=False)["input_ids"]
            out.extend(len(ids) for ids in enc)
        return out

    return count


def _default_counter(cfg: Params) -> tuple[TokenCounter, str, list[str]]:
    """The base model's tokenizer: (token counter, name, its special tokens).

    Straight from ``tokenizer.json`` when there is one: the ``tokenizers`` library encodes
    exactly as the fast ``transformers`` tokenizer built from the same file, without importing
    torch and transformers (seconds per stage run).
    """
    from phiops.models import load_tokenizer, resolve

    path = Path(resolve(cfg.model.base))
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]

        def count(texts: Sequence[str]) -> list[int]:
            return [len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False)]

        return count, cfg.model.base, specials
    hf = load_tokenizer(path)
    return hf_token_counter(hf), cfg.model.base, list(getattr(hf, "all_special_tokens", []))


def token_text(messages: list[dict[str, str]]) -> str:
    """The text whose tokens ``min_tokens``/``max_tokens`` bound: every message's content.

    The chat template adds a few dozen tokens on top; ``format.max_length`` bounds that.
    """
    return "\n\n".join(m["content"] for m in messages)


# ----------------------------------------------------------------------------- sources


@dataclass
class _Source:
    path: Path
    shown: str  # as the user wrote it (relative to the project when data.raw was)
    split: str | None  # "test" for data.test files; None: by prompt hash
    quarantine_name: str
    format: D.Format | None = None
    facts: FileFacts = field(default_factory=FileFacts)
    counts: Counter[str] = field(default_factory=Counter)


def _sources(cfg: Params, layout: Layout) -> tuple[list[_Source], list[str]]:
    """Input files in order (train files first, then test ones), and file-level problems."""
    out: list[_Source] = []
    problems: list[str] = []

    def resolve(given: Path) -> Path:
        return given if given.is_absolute() else layout.root / given

    # data.test may sit inside the data.raw directory: its files are test rows, never train rows too.
    held_out: set[Path] = set()
    if cfg.data.test is not None:
        t = resolve(cfg.data.test)
        held_out = {p.resolve() for p in t.rglob("*.jsonl")} if t.is_dir() else {t.resolve()}
    for given, split in ((cfg.data.raw, None), (cfg.data.test, "test")):
        if given is None:
            continue
        path = resolve(given)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.jsonl")
                           if p.is_file() and (split == "test" or p.resolve() not in held_out))
            if not files:
                problems.append(f"{given}: no *.jsonl files in this directory (rule {FILE_RULE})")
            for p in files:
                rel = p.relative_to(path)
                name = "__".join((given.name, *rel.with_suffix("").parts))
                out.append(_Source(p, str(given / rel), split, f"{'test.' if split else ''}{name}.rejected.jsonl"))
        else:
            stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
            out.append(_Source(path, str(given), split, f"{'test.' if split else ''}{stem}.rejected.jsonl"))
    return out, problems


# ----------------------------------------------------------------------------- the run


def _mask(text: str) -> str:
    """A PII match as evidence without repeating it: first and last character only."""
    return text[0] + "*" * max(len(text) - 2, 1) + text[-1] if len(text) > 2 else "**"


@dataclass
class _Keys:
    """Per row of a chunk: what it duplicates or leaks into (``file:line``), its split, its prompt key."""

    dup: list[str | None]  # exact duplicate of an earlier row
    near: list[str | None]  # duplicate after normalization
    leak: list[str | None]  # its prompt is already in the other split
    split: list[str]
    prompt: list[bytes | None]


def _frame(fmt: D.Format, lines: list[Line], base: int, errors: list[str | None], roles: list[str | None],
           n_tokens: list[float], keys: _Keys) -> Any:
    """A chunk as the DataFrame the suites run on: a column per rule's input, ``row`` to map results back.

    Args:
        fmt: the chunk's format (decides the field columns).
        lines: the chunk's parsed lines.
        base: the ``row`` number of the first line (row numbers are unique over the run).
        errors: per line, the chat structure problem (chat only).
        roles: per line, the role sequence (chat only).
        n_tokens: per line, the token count (NaN: not countable).
        keys: per line, the duplicate and leakage findings.

    Returns:
        A pandas DataFrame, one row per line.
    """
    import pandas as pd

    n = len(lines)
    cols: dict[str, Any] = {"row": pd.Series(range(base, base + n), dtype="int64")}
    if fmt == "chat":
        cols["messages"] = pd.Series([ln.obj.get("messages") for ln in lines], dtype=object)  # type: ignore[union-attr]
        cols["messages_error"] = pd.Series(errors, dtype=object)
        cols["roles"] = pd.Series(roles, dtype=object)
    else:
        for col in D.FIELDS[fmt]:
            # object dtype keeps values as parsed (42 stays an int for the type rule).
            cols[col] = pd.Series([ln.obj.get(col) for ln in lines], dtype=object)  # type: ignore[union-attr]
        for col in D.OPTIONAL[fmt]:
            cols[col] = pd.Series([ln.obj.get(col, "") for ln in lines], dtype=object)  # type: ignore[union-attr]
    cols["text"] = pd.Series(
        ["\n".join(t for _, t in D.fields_text(ln.obj, fmt)) for ln in lines], dtype=object)  # type: ignore[arg-type]
    cols["n_tokens"] = pd.Series(n_tokens, dtype="float64")
    cols["duplicate_of"] = pd.Series(keys.dup, dtype=object)
    cols["near_duplicate_of"] = pd.Series(keys.near, dtype=object)
    cols["leak_of"] = pd.Series(keys.leak, dtype=object)
    return pd.DataFrame(cols)


class _Validation:
    """State of one stage run across files and chunks (dedup and leakage keys are global)."""

    def __init__(self, cfg: Params, count_tokens: TokenCounter, specials: Sequence[str], validated: JsonlWriter,
                 quarantine_dir: Path):
        self.cfg, self.vcfg = cfg, cfg.validate_
        self.count_tokens, self.specials = count_tokens, specials
        self.validated = validated
        self.quarantine_dir = quarantine_dir
        self.quarantine: dict[int, JsonlWriter] = {}
        self.suites: Suites | None = None
        self.sources: list[_Source] = []
        self.exact: dict[bytes, int] = {}  # key -> packed (source, line) of the first copy
        self.normalized: dict[bytes, int] = {}
        self.prompts: dict[bytes, tuple[str, int]] = {}  # prompt key -> (split, where) of accepted rows
        self.problems: list[tuple[int, int, str]] = []  # (source, line, text), the first REPORT_PROBLEMS
        self.problems_total = 0
        self.warnings: list[str] = []
        self.rejected_by_rule: Counter[str] = Counter()
        self.warnings_by_rule: Counter[str] = Counter()
        self.expectations: dict[str, dict[str, Any]] = {}
        self.accepted_tokens = array("l")
        self.splits: Counter[str] = Counter()
        self.extra_keys: Counter[str] = Counter()
        self.rows_in = self.accepted = self.rejected = self.parse_errors = self.chunks = 0
        self.next_row = 0
        self.timings: Counter[str] = Counter()  # seconds in tokenizing, hashing, GX, over all chunks

    # -- references -------------------------------------------------------------
    def where(self, ref: int) -> str:
        return f"{self.sources[ref >> 40].shown}:{ref & ((1 << 40) - 1)}"

    # -- output -----------------------------------------------------------------
    def _problem(self, si: int, line: int, text: str, warning: bool = False) -> None:
        if warning:
            if len(self.warnings) < REPORT_PROBLEMS:
                self.warnings.append(text)
            return
        self.problems_total += 1
        if len(self.problems) < REPORT_PROBLEMS:
            self.problems.append((si, line, text))

    def sorted_problems(self) -> list[str]:
        """Problems in file and line order (parse errors are found before a chunk's GX run)."""
        return [text for *_, text in sorted(self.problems, key=lambda p: (p[0], p[1]))]

    def reject(self, si: int, line: int, raw: str, reasons: list[tuple[str, str, int]]) -> None:
        """Quarantine a row; reasons are (what, rule, column or 0)."""
        src = self.sources[si]
        if si not in self.quarantine:
            self.quarantine[si] = JsonlWriter(self.quarantine_dir / src.quarantine_name)
        texts = []
        for what, rule, col in reasons:
            texts.append(f"column {col}: {what} (rule {rule})" if col else f"{what} (rule {rule})")
            where = f"{src.shown}:{line}:{col}" if col else f"{src.shown}:{line}"
            self._problem(si, line, f"{where}: {what} (rule {rule})")
        self.quarantine[si].write({"line": line, "raw": raw, "reasons": texts})
        self.rejected_by_rule.update(dict.fromkeys((rule for _, rule, _ in reasons), 1))
        self.rejected += 1
        src.counts["rejected"] += 1

    # -- a file ------------------------------------------------------------------
    def run_source(self, si: int, chunk_rows: int) -> None:
        src = self.sources[si]
        stream = iter_jsonl(src.path, src.facts)
        head = list(itertools.islice(stream, DETECT_ROWS))
        if src.facts.file_error:
            return
        fmt = self.cfg.data.format
        if fmt == "auto" and not any(ln.obj is not None for ln in head):
            fmt = "alpaca"  # nothing parsed to detect from; every line is a parse error
        elif fmt == "auto":
            detected = D.detect(ln.obj for ln in head if ln.obj is not None)
            if detected is None:
                keys = sorted({k for ln in head if ln.obj is not None for k in ln.obj})[:8]
                src.facts.file_error = (
                    f"cannot detect the format: rows have keys {keys}; expected alpaca (instruction, output), "
                    "chat (messages) or prompt_completion (prompt, completion); set data.format")
                return
            fmt = detected
        src.format = fmt
        chunk: list[Line] = []
        parsed = 0
        for ln in itertools.chain(head, stream):
            chunk.append(ln)  # parse errors too: the quarantine stays in line order
            parsed += ln.obj is not None
            if parsed >= chunk_rows:
                self.run_chunk(si, fmt, chunk)
                chunk, parsed = [], 0
        if chunk:
            self.run_chunk(si, fmt, chunk)

    # -- a chunk -----------------------------------------------------------------
    def _messages(self, fmt: D.Format, obj: dict[str, Any]) -> tuple[list[dict[str, str]] | None, str | None, str | None]:
        """(messages or None when malformed, structure problem, role sequence) of one row."""
        if fmt == "chat":
            msgs = obj.get("messages")
            if not isinstance(msgs, list):
                return None, None, None
            problem = D.chat_problem(msgs)
            if problem is not None:
                return None, problem, None
            roles = ",".join(m["role"] for m in msgs)
            if not re.match(D.ROLE_ORDER_RE, roles):
                return None, None, roles
            return D.to_messages(obj, fmt), None, roles
        if not all(isinstance(obj.get(k), str) and obj[k].strip() for k in D.FIELDS[fmt]):
            return None, None, None
        if not all(isinstance(obj.get(k, ""), str) for k in D.OPTIONAL[fmt]):
            return None, None, None
        return D.to_messages(obj, fmt), None, None

    def run_chunk(self, si: int, fmt: D.Format, all_lines: list[Line]) -> None:
        """Validate one chunk: parse errors as they are, parsed rows through GX; write in line order."""
        src = self.sources[si]
        self.rows_in += len(all_lines)
        src.counts["rows_in"] += len(all_lines)
        lines = [ln for ln in all_lines if ln.obj is not None]
        if not lines:
            self._write(si, fmt, all_lines, {}, {}, [], [], [])
            return
        base = self.next_row
        self.next_row += len(lines)
        self.chunks += 1

        convs = [self._messages(fmt, ln.obj) for ln in lines]  # type: ignore[arg-type]
        msgs = [m for m, _, _ in convs]
        t = time.perf_counter()
        n_tokens = self._count_tokens(msgs)
        self.timings["tokens_s"] += time.perf_counter() - t
        t = time.perf_counter()
        keys = self._keys(si, lines, msgs)
        df = _frame(fmt, lines, base, [e for _, e, _ in convs], [r for _, _, r in convs], n_tokens, keys)
        self.timings["keys_and_frame_s"] += time.perf_counter() - t
        t = time.perf_counter()
        if self.suites is None:
            self.suites = Suites(self.cfg, self.specials)
        result, checks = self.suites.run(fmt, df)
        self.timings["gx_s"] += time.perf_counter() - t

        reasons = self._reasons(si, fmt, lines, base, result, checks, n_tokens, keys)
        self._write(si, fmt, all_lines, {id(ln): i for i, ln in enumerate(lines)}, reasons, msgs, keys.split,
                    list(zip(keys.prompt, n_tokens)))

    def _count_tokens(self, msgs: list[list[dict[str, str]] | None]) -> list[float]:
        """Tokens of each well-formed row's content; NaN for the rest (the structure rules say why)."""
        ok = [i for i, m in enumerate(msgs) if m is not None]
        counts = self.count_tokens([token_text(msgs[i]) for i in ok])  # type: ignore[arg-type]
        n_tokens = [math.nan] * len(msgs)
        for i, c in zip(ok, counts):
            n_tokens[i] = float(c)
        return n_tokens

    def _keys(self, si: int, lines: list[Line], msgs: list[list[dict[str, str]] | None]) -> _Keys:
        """Split, duplicate and leakage facts of a chunk's well-formed rows, against every row before.

        The first copy of a conversation is remembered here (dedup is global across files);
        prompts are remembered only when a row is accepted (:meth:`_write`).
        """
        src = self.sources[si]
        explicit_test = self.cfg.data.test is not None
        n = len(lines)
        keys = _Keys(dup=[None] * n, near=[None] * n, leak=[None] * n, split=["train"] * n, prompt=[None] * n)
        for i, m in enumerate(msgs):
            if m is None:
                continue
            ref = (si << 40) | lines[i].line
            first = self.exact.setdefault(D.exact_key(m), ref)
            if first != ref:
                keys.dup[i] = self.where(first)
            else:
                first = self.normalized.setdefault(D.normalized_key(m), ref)
                if first != ref:
                    keys.near[i] = self.where(first)
            if src.split == "test" or (not explicit_test and D.is_test(m, self.cfg.data.test_fraction)):
                keys.split[i] = "test"
            keys.prompt[i] = D.prompt_key(m)
            seen = self.prompts.get(keys.prompt[i])  # type: ignore[arg-type]
            if seen is not None and seen[0] != keys.split[i]:
                keys.leak[i] = f"{seen[0]} split at {self.where(seen[1])}"
        return keys

    def _reasons(self, si: int, fmt: D.Format, lines: list[Line], base: int, result: Any, checks: dict[str, Check],
                 n_tokens: list[float], keys: _Keys) -> dict[int, list[tuple[str, str, int]]]:
        """Fold a chunk's GX result into the run's totals; the reasons to reject, by row of the chunk.

        A warning check records its rows here and keeps them, so they get no reason.

        Raises:
            RuntimeError: an expectation itself errored (a bug here, not bad data).
        """
        src = self.sources[si]
        reasons: dict[int, list[tuple[str, str, int]]] = {}
        for res in result.results:
            check = checks[res.expectation_config.meta["phiops_check"]]
            info = res.exception_info or {}
            if info.get("raised_exception"):
                raise RuntimeError(f"expectation {check.gx_type} ({check.key}) errored: {info.get('exception_message')}")
            agg = self.expectations.setdefault(check.key, {"rule": check.gx_type, "warning": check.warning,
                                                           "success": True, "unexpected_count": 0})
            agg["success"] &= bool(res.success)
            agg["unexpected_count"] += int(res.result.get("unexpected_count") or 0)
            if res.success:
                continue
            for d in res.result.get("unexpected_index_list") or []:
                i = int(d["row"]) - base
                what = self._describe(check, lines[i], fmt, n_tokens[i], keys.dup[i], keys.near[i], keys.leak[i])
                if check.warning:
                    self.warnings_by_rule[check.key] += 1
                    self._problem(si, lines[i].line, f"{src.shown}:{lines[i].line}: {what} (rule {check.key})", warning=True)
                else:
                    reasons.setdefault(i, []).append((what, check.key, 0))
        return reasons

    def _write(self, si: int, fmt: D.Format, all_lines: list[Line], index: dict[int, int],
               reasons: dict[int, list[tuple[str, str, int]]], msgs: list[Any], split: list[str],
               keys: list[tuple[bytes | None, float]]) -> None:
        """Accept or quarantine each line of a chunk, in line order."""
        src = self.sources[si]
        for ln in all_lines:
            if ln.obj is None:
                self.parse_errors += 1
                self.reject(si, ln.line, ln.raw, [(ln.reason, PARSE_RULE, ln.col)])
                continue
            i = index[id(ln)]
            if i in reasons:
                self.reject(si, ln.line, ln.raw, reasons[i])
                continue
            m = msgs[i]
            assert m is not None, f"{src.shown}:{ln.line}: passed every rule without a conversation"
            meta = {k: val for k, val in ln.obj.items() if k not in D.FIELDS[fmt] + D.OPTIONAL[fmt]}
            self.extra_keys.update(meta.keys())
            self.validated.write({"id": D.row_id(m), "messages": m, "split": split[i], "format": fmt,
                                  "source": src.shown, "source_line": ln.line, "meta": meta})
            pkey, n_tok = keys[i]
            self.prompts.setdefault(pkey, (split[i], (si << 40) | ln.line))  # type: ignore[arg-type]
            self.accepted_tokens.append(int(n_tok))
            self.splits[split[i]] += 1
            self.accepted += 1
            src.counts["accepted"] += 1

    def _describe(self, check: Check, ln: Line, fmt: D.Format, n_tok: float, dup: str | None, near: str | None,
                  leak: str | None) -> str:
        obj = ln.obj or {}
        kind, _, col = check.key.partition(":")
        vcfg = self.vcfg
        if kind == "required":
            state = "missing" if col not in obj else "null"
            want = {"messages": "a list of messages"}.get(col, "a non-empty string" if col in D.FIELDS[fmt]
                                                          else "a string (may be empty)")
            return f"{col}: {state}; must be {want}"
        if kind == "type":
            want = "a list" if col == "messages" else "a string"
            return f"{col}: must be {want}, got {type(obj.get(col)).__name__} {D.short(obj.get(col))}"
        if kind == "blank":
            return f"{col}: must be a non-empty string, got {D.short(obj.get(col))}"
        if kind == "structure":
            return D.chat_problem(obj["messages"]) or "messages: malformed"
        if kind == "role_order":
            got = ",".join(str(m.get("role")) for m in obj["messages"])
            return (f"messages: roles {got}; expected an optional system message, then user/assistant "
                    "alternating, ending with assistant")
        if kind in ("control", "pii", "special_tokens"):
            pattern = {"control": CONTROL_RE, "special_tokens": D.special_token_pattern(self.specials)}.get(
                kind) or vcfg.pii_patterns[col]
            for name, text in D.fields_text(obj, fmt):
                m = re.search(pattern, text)
                if m:
                    if kind == "control":
                        return f"{name}: control character U+{ord(m.group()):04X} at character {m.start() + 1}"
                    if kind == "special_tokens":
                        return (f"{name}: the special token {m.group()!r} at character {m.start() + 1}; the model "
                                "would read it as the real token")
                    return f"{name}: looks like {col} at character {m.start() + 1} ({_mask(m.group())})"
            return f"row: matches the {check.key} pattern"
        if kind == "tokens":
            hi = vcfg.max_tokens if vcfg.over_length == "reject" else "inf"
            return f"row: {int(n_tok)} tokens, outside [{vcfg.min_tokens}, {hi}]"
        if kind == "over_length":
            return f"row: {int(n_tok)} tokens, above {vcfg.max_tokens}; kept, format truncates it"
        if kind == "duplicate":
            return f"row: duplicate of {dup}"
        if kind == "near_duplicate":
            return f"row: same as {near} after folding case, Unicode form and whitespace"
        if kind == "leakage":
            return f"row: its prompt is also in the {leak} (train/test leakage)"
        raise AssertionError(check.key)

    def commit_quarantine(self) -> None:
        for w in self.quarantine.values():
            w.commit()

    def discard(self) -> None:
        for w in self.quarantine.values():
            w.discard()


def _error_message(shown: str, failure: str, problems: list[str], total: int, report: dict[str, Any],
                   report_path: Path) -> str:
    listed = "\n".join(f"  - {p}" for p in problems[:MESSAGE_PROBLEMS])
    more = total - MESSAGE_PROBLEMS
    where = f"the first {REPORT_PROBLEMS}" if total > REPORT_PROBLEMS else "all"
    tail = f"\n  ... and {more} more ({where} in {report_path}; every row in data/quarantine/)" if more > 0 else ""
    counts = ""
    if "rows_in" in report:
        counts = (f"\nrows_in={report['rows_in']} accepted={report['accepted']} rejected={report['rejected']} "
                  f"(parse errors {report['parse_errors']}); rejected_by_rule={report['rejected_by_rule']}")
    return f"{shown}: {failure}\n{listed}{tail}{counts}"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as markdown (the Prefect artifact of a failed validation)."""
    status = "passed" if report.get("passed") else f"**failed**: {report.get('failure')}"
    out = [f"# Data validation {status}", "", f"Source: `{report.get('source')}`", ""]
    if "rows_in" in report:
        out += [f"`{report['counts']}`", "", "| rule | rows rejected |", "|---|---:|"]
        out += [f"| {k} | {v} |" for k, v in report["rejected_by_rule"].items()] or ["| (none) | 0 |"]
        if report.get("warnings_by_rule"):
            out += ["", "| warning | rows |", "|---|---:|"]
            out += [f"| {k} | {v} |" for k, v in report["warnings_by_rule"].items()]
    probs = report.get("problems") or []
    if probs:
        out += ["", f"## Problems ({report.get('problems_total', len(probs))}; first {min(len(probs), 50)})", ""]
        out += [f"- `{p}`" for p in probs[:50]]
    out += ["", f"Every rejected row with its reasons: `{report.get('outputs', {}).get('quarantine')}`."]
    return "\n".join(out) + "\n"


def run(
    cfg: Params,
    layout: Layout,
    *,
    count_tokens: TokenCounter | None = None,
    tokenizer_name: str | None = None,
    special_tokens: Sequence[str] = (),
    data_docs: bool = True,
) -> ValidateOutputs:
    """Validate ``data.raw`` (and ``data.test``) and write accepted rows, a report, a quarantine, Data Docs.

    Args:
        cfg: the config (``data.*``, ``validate.*``, ``model.base`` for the tokenizer).
        layout: where outputs go; relative data paths are resolved against ``layout.root`` and
            shown as written in messages.
        count_tokens: token counter; default: the tokenizer of ``model.base`` (and then its
            special tokens are checked for, too).
        tokenizer_name: recorded in the report when `count_tokens` is given.
        special_tokens: with `count_tokens`, the strings the ``special_tokens`` rule refuses.
        data_docs: build the Great Expectations Data Docs site under ``layout.data_docs``.

    Returns:
        The written paths.

    Raises:
        DataValidationError: under ``fail``, any invalid row; under ``quarantine``, a rejected
            fraction above ``validate.max_invalid_fraction``; under either, an unreadable, empty,
            UTF-16 or undetectable file, or no accepted row. The report and the quarantine are
            written first; the last accepted set is left untouched (the last good output) and
            stale Data Docs from an earlier run are removed.
        RuntimeError: an expectation itself errored (a bug here, not bad data).
    """
    t0 = time.perf_counter()
    vcfg = cfg.validate_
    sources, file_problems = _sources(cfg, layout)
    shown = str(cfg.data.raw)
    report: dict[str, Any] = {
        "source": shown,
        "test_source": None if cfg.data.test is None else str(cfg.data.test),
        "policy": {"on_invalid": vcfg.on_invalid, "max_invalid_fraction": vcfg.max_invalid_fraction,
                   "over_length": vcfg.over_length, "pii": vcfg.pii},
        "token_bounds": [vcfg.min_tokens, vcfg.max_tokens],
        "tokenizer": None,
        "outputs": {"validated": None, "quarantine": str(layout.quarantine), "data_docs": None},
    }
    if count_tokens is None:
        count_tokens, tokenizer_name, special_tokens = _default_counter(cfg)
    report["tokenizer"] = tokenizer_name or getattr(count_tokens, "__name__", "custom")

    validated = JsonlWriter(layout.validated)
    docs_built = False
    with atomic_dir(layout.quarantine) as qdir:
        state = _Validation(cfg, count_tokens, special_tokens, validated, qdir)
        state.sources = sources
        try:
            for si, src in enumerate(sources):
                try:
                    state.run_source(si, vcfg.chunk_rows)
                except OSError as exc:
                    src.facts.file_error = f"cannot read: {exc.strerror}"
                if src.facts.file_error:
                    file_problems.append(f"{src.shown}: {src.facts.file_error} (rule {FILE_RULE})")
            state.commit_quarantine()
        except BaseException:
            state.discard()
            validated.discard()
            raise
    if data_docs and state.suites is not None:
        t = time.perf_counter()
        with atomic_dir(layout.data_docs) as tmp:
            state.suites.build_docs(tmp)
        state.timings["data_docs_s"] += time.perf_counter() - t
        docs_built = True
        report["outputs"]["data_docs"] = str(layout.data_docs)

    rows_in, accepted, rejected = state.rows_in, state.accepted, state.rejected
    assert rows_in == accepted + rejected, (rows_in, accepted, rejected)
    fraction = rejected / rows_in if rows_in else 0.0
    quarantining = vcfg.on_invalid == "quarantine"
    tok = sorted(state.accepted_tokens)
    elapsed = time.perf_counter() - t0
    report.update(
        files=[{"path": s.shown, "format": s.format, "sha256": sha256_file(s.path) if s.path.is_file() else None,
                "rows_in": s.counts["rows_in"], "accepted": s.counts["accepted"], "rejected": s.counts["rejected"],
                "bom_stripped": s.facts.bom, "crlf_lines": s.facts.crlf_lines, "blank_lines_skipped": s.facts.blank_lines,
                "error": s.facts.file_error} for s in sources],
        rows_in=rows_in, accepted=accepted, rejected=rejected,
        quarantined=rejected if quarantining else 0,
        parse_errors=state.parse_errors,
        rejected_fraction=round(fraction, 6),
        # A row can break several rules, so these may sum to more than `rejected`.
        rejected_by_rule=dict(sorted(state.rejected_by_rule.items())),
        warnings_by_rule=dict(sorted(state.warnings_by_rule.items())),
        warnings=state.warnings,
        splits={"train": state.splits["train"], "test": state.splits["test"]},
        counts=f"rows_in {rows_in} = accepted {accepted} + rejected {rejected}" + (" (quarantined)" if quarantining else ""),
        gx={"chunks": state.chunks, "chunk_rows": vcfg.chunk_rows,
            "success": all(e["success"] for e in state.expectations.values() if not e["warning"]),
            # A list, not a dict: DVC shows numbers of dicts as metrics, and these are details.
            "expectations": [{"check": k, **e} for k, e in state.expectations.items()]},
        extra_keys=dict(sorted(state.extra_keys.items())),
        elapsed_s=round(elapsed, 3),
        timings={k: round(v, 3) for k, v in sorted(state.timings.items())},
        rows_per_s=round(rows_in / elapsed, 1) if elapsed else None,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    if tok:
        report["n_tokens"] = {"min": tok[0], "max": tok[-1], "mean": round(sum(tok) / len(tok), 1),
                              "p99": tok[min(len(tok) - 1, math.ceil(0.99 * len(tok)) - 1)]}

    failure = None
    problems = file_problems + state.sorted_problems()
    total = len(file_problems) + state.problems_total
    if file_problems:
        failure = file_problems[0].split(": ", 1)[1].rsplit(" (rule", 1)[0]
    elif rejected and vcfg.on_invalid == "fail":
        failure = f"{rejected} of {rows_in} rows invalid (validate.on_invalid=fail)"
    elif fraction > vcfg.max_invalid_fraction:
        failure = (f"{rejected} of {rows_in} rows invalid ({fraction:.1%}), above validate.max_invalid_fraction="
                   f"{vcfg.max_invalid_fraction:.1%}; rejected rows are in {layout.quarantine}")
    elif not accepted:
        failure = "no rows accepted"
    report.update(passed=failure is None, failure=failure, problems_total=total, problems=problems[:REPORT_PROBLEMS])
    if failure is None:
        validated.commit()
        report["outputs"]["validated"] = str(layout.validated)
    else:
        validated.discard()
        # The last accepted set stays as it was: it is the last good output, still the one
        # dvc.lock pins (DVC records nothing for a failed stage, and dvc.yaml marks it
        # `persist` so DVC does not delete it first). Nothing downstream runs after a refusal.
        if data_docs and not docs_built:
            shutil.rmtree(layout.data_docs, ignore_errors=True)
    write_json(layout.validate_report, report)
    write_text(layout.validate_markdown, report_markdown(report))
    if failure is not None:
        raise DataValidationError(_error_message(shown, failure, problems, total, report, layout.validate_report),
                                  problems[:REPORT_PROBLEMS], layout.validate_report)
    log.info("validate %s: %s", shown, report["counts"])
    return ValidateOutputs(layout.validated, layout.validate_report, layout.quarantine,
                           layout.data_docs if docs_built else None)
