"""The validate stage: raw JSONL -> accepted rows, rejected rows, a report and Data Docs.

Two layers of checks:

1. **Parsing**, line by line in binary: invalid UTF-8, NUL bytes, invalid JSON and values that
   are not JSON objects are reported as ``file:line:column: reason``. A UTF-8 BOM at the start is
   accepted and stripped, CRLF endings are accepted, blank lines are skipped (not rows). An empty
   file, or a UTF-16 one, is a file-level error.
2. **Great Expectations** (1.x, ephemeral context) on a DataFrame of the parsed rows: required
   columns exist; ``instruction``/``output`` non-null, str, non-blank; ``input`` non-null, str
   (may be empty); token count of the example within ``[validate.min_tokens,
   validate.max_tokens]``; no duplicate examples (content hash unique); no control characters.
   Unexpected rows are mapped back to their line through the ``line`` column
   (``unexpected_index_column_names``).

Every rejected row gets reasons like
``data/raw/x.jsonl:17: output: missing; must be a non-empty string (rule expect_column_values_to_not_be_null)``.

Policy (``validate.on_invalid``): ``fail`` raises :class:`DataValidationError` on any invalid
row; ``quarantine`` keeps the valid rows and fails only above ``validate.max_invalid_fraction``.
Either way rejected rows with their reasons go to ``data/quarantine/<raw stem>.rejected.jsonl``,
``rows_in == accepted + rejected``, the report is written before anything is raised, and the
raw file is only ever opened for reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiops.config import Params
from phiops.io import atomic_dir, sha256_file, write_json, write_jsonl
from phiops.paths import Layout

log = logging.getLogger(__name__)

REQUIRED = ("instruction", "input", "output")
# `input` may legitimately be empty (alpaca rows with no context); the other two may not.
NON_BLANK = ("instruction", "output")
# C0 controls except tab/LF/CR, DEL, and C1 controls: invisible, and they poison tokenizers.
CONTROL_RE = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
# A row of max_tokens (<= a few thousand) tokens is tens of KB; a multi-MB "line" is a broken
# file (a missing newline, a binary blob), refused before it is read into memory whole.
MAX_LINE_BYTES = 1 << 20
# Problems listed in the exception message and in the report; the quarantine file has all.
MESSAGE_PROBLEMS = 20
REPORT_PROBLEMS = 200
PARSE_RULE = "jsonl_parse"
FILE_RULE = "jsonl_file"

TokenCounter = Callable[[Sequence[str]], Sequence[int]]
"""Counts tokens of a batch of texts; injectable so unit tests need no model."""


class DataValidationError(ValueError):
    """The data failed validation under the configured policy.

    Attributes:
        problems: every problem found, as ``file:line[:column]: field: what (rule r)``.
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
        validated: accepted rows (JSONL), each with a ``source_line`` key.
        report: the JSON report.
        quarantine: rejected rows with reasons, written under either policy (dvc.yaml declares
            ``data/quarantine`` an output, and under ``fail`` it shows what failed the run).
        data_docs: the Great Expectations Data Docs site (``index.html`` inside); ``None``
            when no rows parsed (nothing to validate) or docs were turned off.
    """

    validated: Path
    report: Path
    quarantine: Path
    data_docs: Path | None


@dataclass
class _Reject:
    line: int
    raw: str
    reasons: list[str] = field(default_factory=list)  # for the quarantine: "field: what (rule r)"
    problems: list[str] = field(default_factory=list)  # the same, prefixed "file:line[:col]: "
    rules: list[str] = field(default_factory=list)


@dataclass
class ParsedJsonl:
    """What :func:`parse_jsonl` found; ``rows`` and ``errors`` are in line order."""

    rows: list[tuple[int, dict[str, Any], str]]  # (line, object, raw text)
    errors: list[tuple[int, int, str, str]]  # (line, column, reason, raw text)
    file_error: str | None = None
    blank_lines: int = 0
    crlf_lines: int = 0
    bom: bool = False


# ----------------------------------------------------------------------------- parsing


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


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of repeated keys; a row edited by concatenation
    # would then validate with half of its content gone.
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise _DuplicateKey(k)
        obj[k] = v
    return obj


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _reject_constant(name: str) -> Any:
    raise _BadConstant(name)


class _BadConstant(ValueError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)


def parse_jsonl(path: Path) -> ParsedJsonl:
    """Stream-parse a JSONL file; never raises for bad content, only collects it.

    Args:
        path: the file (opened read-only, binary).

    Returns:
        Parsed rows (1-based line, object, raw text), parse errors (line, column, reason, raw),
        and file-level facts (BOM, CRLF and blank line counts, a file-level error).

    Raises:
        OSError: the file cannot be opened.
    """
    out = ParsedJsonl(rows=[], errors=[])
    with open(path, "rb") as f:
        for lineno, (data, too_long) in enumerate(_iter_lines(f), start=1):
            if lineno == 1:
                if data.startswith((b"\xff\xfe", b"\xfe\xff")):
                    out.file_error = "file is UTF-16 encoded; expected UTF-8 JSON lines"
                    return out
                if data.startswith(b"\xef\xbb\xbf"):
                    out.bom = True
                    data = data[3:]
            if too_long:
                raw = data[:4096].decode("utf-8", errors="backslashreplace") + "..."
                out.errors.append((lineno, MAX_LINE_BYTES + 1, f"line longer than {MAX_LINE_BYTES} bytes", raw))
                continue
            if data.endswith(b"\r\n"):
                out.crlf_lines += 1
                data = data[:-2]
            elif data.endswith(b"\n"):
                data = data[:-1]
            raw = data.decode("utf-8", errors="backslashreplace")
            if not data.strip():
                out.blank_lines += 1
                continue
            nul = data.find(b"\x00")
            if nul >= 0:
                out.errors.append((lineno, _column(data, nul), "NUL byte", raw))
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = data[exc.start]
                out.errors.append((lineno, _column(data, exc.start), f"invalid UTF-8 (byte 0x{bad:02x})", raw))
                continue
            if text.startswith("\ufeff"):
                # Two files concatenated: the second one's BOM lands mid-file.
                out.errors.append((lineno, 1, "UTF-8 BOM in the middle of the file", raw))
                continue
            try:
                obj = _DECODER.decode(text)
            except json.JSONDecodeError as exc:
                out.errors.append((lineno, exc.colno, f"invalid JSON: {exc.msg}", raw))
                continue
            except _DuplicateKey as exc:
                col = text.rfind(json.dumps(exc.key)) + 1 or 1
                out.errors.append((lineno, col, f"duplicate key {exc.key!r} in one object", raw))
                continue
            except _BadConstant as exc:
                col = text.find(exc.name) + 1 or 1
                out.errors.append((lineno, col, f"{exc.name} is not valid JSON", raw))
                continue
            if not isinstance(obj, dict):
                kind = {list: "an array", str: "a string", int: "a number", float: "a number",
                        bool: "a boolean", type(None): "null"}.get(type(obj), type(obj).__name__)
                out.errors.append((lineno, 1, f"expected a JSON object, got {kind}", raw))
                continue
            out.rows.append((lineno, obj, raw))
    if not out.rows and not out.errors:
        out.file_error = "file is empty (no JSON lines)"
    return out


# ----------------------------------------------------------------------------- tokens


def example_text(row: dict[str, Any]) -> str:
    """The text whose tokens are counted: instruction, input (if any) and output.

    The chat template adds a few dozen tokens on top; ``format.max_length`` bounds the
    templated length, this bounds the content.

    Args:
        row: a row whose three fields are strings.

    Returns:
        The fields joined by blank lines.
    """
    return "\n\n".join(p for p in (row["instruction"], row["input"], row["output"]) if p)


def hf_token_counter(tokenizer: Any, batch_size: int = 4096) -> TokenCounter:
    """Wrap a Hugging Face tokenizer as a :data:`TokenCounter` (fast batched encoding).

    Args:
        tokenizer: a ``transformers`` tokenizer.
        batch_size: texts per encoding call (bounds memory on big files).

    Returns:
        A function from texts to token counts, special tokens excluded.
    """

    def count(texts: Sequence[str]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i : i + batch_size]), add_special_tokens=False)["input_ids"]
            out.extend(len(ids) for ids in enc)
        return out

    return count


def _default_counter(cfg: Params) -> tuple[TokenCounter, str]:
    from phiops.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve(cfg.model.base))
    return hf_token_counter(tok), cfg.model.base


# ----------------------------------------------------------------------------- GX


@dataclass(frozen=True)
class _Check:
    key: str
    field: str  # the row field named in the reason ("row" for whole-row checks)
    rule: str
    expectation: Any


def _checks(columns: set[str], min_tokens: int, max_tokens: int) -> list[_Check]:
    import great_expectations as gx

    E = gx.expectations
    checks: list[_Check] = []

    def add(key: str, fld: str, exp: Any) -> None:
        checks.append(_Check(key, fld, exp.expectation_type, exp))

    for col in REQUIRED:
        add(f"exists:{col}", col, E.ExpectColumnToExist(
            column=col, meta={"phiops_check": f"exists:{col}"},
            description=f"`{col}` is a required alpaca field"))
    for col in REQUIRED:
        if col not in columns:
            continue  # row-level checks on an absent column would only raise
        add(f"not_null:{col}", col, E.ExpectColumnValuesToNotBeNull(
            column=col, meta={"phiops_check": f"not_null:{col}"},
            description=f"`{col}` is present and not null in every row"))
        add(f"type:{col}", col, E.ExpectColumnValuesToBeOfType(
            column=col, type_="str", meta={"phiops_check": f"type:{col}"},
            description=f"`{col}` is a string"))
        if col in NON_BLANK:
            add(f"blank:{col}", col, E.ExpectColumnValuesToMatchRegex(
                column=col, regex=r"\S", meta={"phiops_check": f"blank:{col}"},
                description=f"`{col}` is not empty or only whitespace"))
        add(f"control:{col}", col, E.ExpectColumnValuesToNotMatchRegex(
            column=col, regex=CONTROL_RE, meta={"phiops_check": f"control:{col}"},
            description=f"`{col}` has no control characters (tab and newlines allowed)"))
    add("tokens", "row", E.ExpectColumnValuesToBeBetween(
        column="n_tokens", min_value=min_tokens, max_value=max_tokens, meta={"phiops_check": "tokens"},
        description=f"instruction+input+output is {min_tokens}..{max_tokens} tokens"))
    add("unique", "row", E.ExpectColumnValuesToBeUnique(
        column="content_sha256", meta={"phiops_check": "unique"},
        description="no duplicate examples (sha256 of instruction, input, output)"))
    return checks


def _frame(rows: list[tuple[int, dict[str, Any], str]], counter: TokenCounter) -> Any:
    import pandas as pd

    present = {k for _, obj, _ in rows for k in obj}
    df = pd.DataFrame({"line": pd.Series([ln for ln, _, _ in rows], dtype="int64")})
    for col in REQUIRED:
        if col in present:
            # object dtype keeps values as parsed (42 stays an int for the type check); pandas'
            # string inference would otherwise coerce or reject mixed columns.
            df[col] = pd.Series([obj.get(col) for _, obj, _ in rows], dtype=object)
    ok = [i for i, (_, obj, _) in enumerate(rows) if all(isinstance(obj.get(c), str) for c in REQUIRED)]
    counts = counter([example_text(rows[i][1]) for i in ok])
    n_tokens = [math.nan] * len(rows)  # NaN = not countable; the type checks report why
    for i, c in zip(ok, counts):
        n_tokens[i] = float(c)
    df["n_tokens"] = pd.Series(n_tokens, dtype="float64")
    df["content_sha256"] = pd.Series(
        [hashlib.sha256(json.dumps([obj.get(c) for c in REQUIRED], ensure_ascii=False, default=str)
                        .encode()).hexdigest() for _, obj, _ in rows],
        dtype=object,
    )
    return df


def _run_gx(df: Any, checks: list[_Check]) -> tuple[Any, Any]:
    """Validate `df` against `checks` in an ephemeral context; returns (context, result)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("phiops")
    batch_def = source.add_dataframe_asset("rows").add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name="phiops_validate"))
    for c in checks:
        suite.add_expectation(c.expectation)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="validate", data=batch_def, suite=suite))
    result = vd.run(
        batch_parameters={"dataframe": df},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]},
    )
    return ctx, result


def _build_docs(ctx: Any, docs_dir: Path) -> None:
    """Render the context's suite and validation result as a Data Docs site in `docs_dir`."""
    # The ephemeral context ships a default site under a fresh temp dir; point one site at
    # ours instead so nothing is left behind in /tmp.
    for name in list(ctx.get_site_names()):
        ctx.delete_data_docs_site(name)
    ctx.add_data_docs_site("phiops", {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    ctx.build_data_docs(site_names=["phiops"])


def _unexpected_lines(res: Any) -> list[int]:
    return [int(d["line"]) for d in res.result.get("unexpected_index_list") or []]


def _describe(check: _Check, value: Any, obj: dict[str, Any]) -> str:
    kind, _, col = check.key.partition(":")
    if kind == "not_null":
        state = "missing" if col not in obj else "null"
        want = "a string (may be empty)" if col not in NON_BLANK else "a non-empty string"
        return f"{col}: {state}; must be {want}"
    if kind == "type":
        return f"{col}: must be a string, got {type(value).__name__} {json.dumps(value, default=str)[:40]}"
    if kind == "blank":
        return f"{col}: must be a non-empty string, got {json.dumps(value)[:40]}"
    if kind == "control":
        m = re.search(CONTROL_RE, str(value))
        where = f" U+{ord(m.group()):04X} at character {m.start() + 1}" if m else ""
        return f"{col}: control character{where}"
    if kind == "exists":
        return f"{col}: missing in every row (required column)"
    raise AssertionError(check.key)  # tokens/unique are described by the caller


# ----------------------------------------------------------------------------- the stage


def _quarantine_path(layout: Layout, raw: Path) -> Path:
    stem = raw.name[: -len(".jsonl")] if raw.name.endswith(".jsonl") else raw.name
    return layout.quarantine / f"{stem}.rejected.jsonl"


class _Rejects:
    """Rejected rows by line, each with its reasons (quarantine form) and problems (message form)."""

    def __init__(self, shown: str):
        self.shown = shown
        self.by_line: dict[int, _Reject] = {}

    def add(self, line: int, raw_text: str, reason: str, rule: str, col: int | None = None) -> None:
        r = self.by_line.setdefault(line, _Reject(line, raw_text))
        r.reasons.append(f"column {col}: {reason} (rule {rule})" if col else f"{reason} (rule {rule})")
        where = f"{self.shown}:{line}:{col}" if col else f"{self.shown}:{line}"
        r.problems.append(f"{where}: {reason} (rule {rule})")
        if rule not in r.rules:
            r.rules.append(rule)

    def ordered(self) -> list[_Reject]:
        return sorted(self.by_line.values(), key=lambda r: r.line)


def _map_results(result: Any, checks: list[_Check], df: Any, rows: list[tuple[int, dict[str, Any], str]],
                 bounds: tuple[int, int], rejects: _Rejects) -> dict[str, Any]:
    """Turn GX's unexpected rows (by their ``line`` column) into per-line reasons; returns a summary.

    Raises:
        RuntimeError: an expectation raised instead of evaluating (a bug here, not bad data).
    """
    by_line = {ln: (obj, raw_text) for ln, obj, raw_text in rows}
    pos = {ln: i for i, (ln, _, _) in enumerate(rows)}  # df has a RangeIndex in row order
    by_key = {c.key: c for c in checks}
    summary: dict[str, Any] = {"success": bool(result.success), "expectations": []}
    for res in result.results:
        check = by_key[res.expectation_config.meta["phiops_check"]]
        info = res.exception_info or {}
        if info.get("raised_exception"):
            raise RuntimeError(f"expectation {check.rule} ({check.key}) errored: {info.get('exception_message')}")
        summary["expectations"].append({
            "check": check.key, "rule": check.rule, "success": bool(res.success),
            "unexpected_count": res.result.get("unexpected_count", 0 if res.success else None),
        })
        if res.success:
            continue
        lines = _unexpected_lines(res)
        if check.key.startswith("exists:"):  # table-level: every row lacks the field
            for ln, (obj, raw_text) in by_line.items():
                rejects.add(ln, raw_text, _describe(check, None, obj), check.rule)
        elif check.key == "tokens":
            for ln in lines:
                n = int(df.at[pos[ln], "n_tokens"])
                rejects.add(ln, by_line[ln][1], f"row: {n} tokens, outside [{bounds[0]}, {bounds[1]}]", check.rule)
        elif check.key == "unique":
            # GX flags every copy; the first copy is a fine row, only later ones are duplicates.
            groups: dict[str, list[int]] = defaultdict(list)
            for ln in lines:
                groups[df.at[pos[ln], "content_sha256"]].append(ln)
            for group in groups.values():
                first, *later = sorted(group)
                for ln in later:
                    rejects.add(ln, by_line[ln][1], f"row: duplicate of line {first}", check.rule)
        else:
            for ln in lines:
                obj = by_line[ln][0]
                rejects.add(ln, by_line[ln][1], _describe(check, obj.get(check.field), obj), check.rule)
    return summary


def _error_message(shown: str, failure: str, problems: list[str], report: dict[str, Any], report_path: Path) -> str:
    listed = "\n".join(f"  - {p}" for p in problems[:MESSAGE_PROBLEMS])
    more = len(problems) - MESSAGE_PROBLEMS
    where = f"the first {REPORT_PROBLEMS}" if len(problems) > REPORT_PROBLEMS else "all"
    tail = f"\n  ... and {more} more ({where} in {report_path})" if more > 0 else ""
    counts = ""
    if "rows_in" in report:
        counts = (f"\nrows_in={report['rows_in']} accepted={report['accepted']} rejected={report['rejected']} "
                  f"(parse errors {report['parse_errors']}); rejected_by_rule={report['rejected_by_rule']}")
    return f"{shown}: {failure}\n{listed}{tail}{counts}"


def run(
    cfg: Params,
    layout: Layout,
    *,
    count_tokens: TokenCounter | None = None,
    tokenizer_name: str | None = None,
    data_docs: bool = True,
) -> ValidateOutputs:
    """Validate ``cfg.data.raw`` and write accepted rows, a report, a quarantine and Data Docs.

    Args:
        cfg: the config (``data.raw``, ``validate.*``, ``model.base`` for the tokenizer).
        layout: where outputs go; a relative ``data.raw`` is resolved against ``layout.root``
            and shown as written in messages.
        count_tokens: token counter; default: the tokenizer of ``model.base``, loaded with
            ``phiops.models.load_tokenizer(phiops.models.resolve(...))``.
        tokenizer_name: recorded in the report when `count_tokens` is given.
        data_docs: build the Great Expectations Data Docs site under ``layout.data_docs``.

    Returns:
        The written paths. Accepted rows are the parsed objects (extra keys kept) plus
        ``source_line`` (1-based line in the raw file; overwrites a key of that name).

    Raises:
        DataValidationError: under ``fail``, any invalid row; under ``quarantine``, a rejected
            fraction above ``validate.max_invalid_fraction``; under either, an unreadable,
            empty or UTF-16 file, or no accepted row. The report is written first, and a stale
            ``layout.validated`` / Data Docs from an earlier run are removed.
        RuntimeError: an expectation itself errored (a bug here, not bad data).
    """
    t0 = mark = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name], mark = round(now - mark, 3), now

    vcfg = cfg.validate_
    raw = cfg.data.raw if cfg.data.raw.is_absolute() else layout.root / cfg.data.raw
    shown = str(cfg.data.raw) if not cfg.data.raw.is_absolute() else str(raw)
    quarantine_file = _quarantine_path(layout, raw)
    quarantining = vcfg.on_invalid == "quarantine"
    docs_out: Path | None = None
    report: dict[str, Any] = {
        "source": shown,
        "source_sha256": None,
        "policy": vcfg.on_invalid,
        "max_invalid_fraction": vcfg.max_invalid_fraction,
        "token_bounds": [vcfg.min_tokens, vcfg.max_tokens],
        "tokenizer": None,
        "gx": None,
        "outputs": {"validated": None, "quarantine": None, "data_docs": None},
    }

    def finish(problems: list[str], failure: str | None) -> None:
        report.update(passed=failure is None, failure=failure, problems_total=len(problems),
                      problems=problems[:REPORT_PROBLEMS], elapsed_s=round(time.perf_counter() - t0, 3),
                      timings=timings)
        write_json(layout.validate_report, report)
        if failure is None:
            return
        # Outputs of an earlier run must not pass for this run's.
        layout.validated.unlink(missing_ok=True)
        if data_docs and docs_out is None:
            shutil.rmtree(layout.data_docs, ignore_errors=True)
        raise DataValidationError(_error_message(shown, failure, problems, report, layout.validate_report),
                                  problems, layout.validate_report)

    try:
        report["source_sha256"] = sha256_file(raw)
        parsed = parse_jsonl(raw)
    except OSError as exc:
        finish([f"{shown}: cannot read: {exc.strerror} (rule {FILE_RULE})"], f"cannot read: {exc.strerror}")
        raise  # not reached: finish raises on failure
    lap("parse_s")
    report.update(bom_stripped=parsed.bom, crlf_lines=parsed.crlf_lines, blank_lines_skipped=parsed.blank_lines)
    if parsed.file_error:
        finish([f"{shown}: {parsed.file_error} (rule {FILE_RULE})"], parsed.file_error)

    rejects = _Rejects(shown)
    for line, col, reason, raw_text in parsed.errors:
        rejects.add(line, raw_text, reason, PARSE_RULE, col)

    if parsed.rows:
        if count_tokens is None:
            count_tokens, tokenizer_name = _default_counter(cfg)
            lap("tokenizer_load_s")
        report["tokenizer"] = tokenizer_name or getattr(count_tokens, "__name__", "custom")
        import great_expectations  # noqa: F401  (timed apart: importing GX alone takes seconds)

        lap("gx_import_s")
        df = _frame(parsed.rows, count_tokens)
        lap("frame_and_tokens_s")
        checks = _checks(set(df.columns), vcfg.min_tokens, vcfg.max_tokens)
        ctx, result = _run_gx(df, checks)
        lap("gx_s")
        if data_docs:
            with atomic_dir(layout.data_docs) as tmp:
                _build_docs(ctx, tmp)
            docs_out = layout.data_docs
            report["outputs"]["data_docs"] = str(docs_out)
            lap("data_docs_s")
        report["gx"] = _map_results(result, checks, df, parsed.rows, (vcfg.min_tokens, vcfg.max_tokens), rejects)
        # Of accepted rows only: this is what format.max_length has to fit.
        tok = df.loc[~df["line"].isin(list(rejects.by_line)), "n_tokens"].dropna()
        if len(tok):
            report["n_tokens"] = {"min": int(tok.min()), "max": int(tok.max()),
                                  "mean": round(float(tok.mean()), 1), "p99": int(tok.quantile(0.99))}
        extra = Counter(k for _, obj, _ in parsed.rows for k in obj if k not in REQUIRED)
        report["extra_keys"] = dict(sorted(extra.items()))

    rows_in = len(parsed.rows) + len(parsed.errors)
    ordered = rejects.ordered()
    accepted = [{**obj, "source_line": ln} for ln, obj, _ in parsed.rows if ln not in rejects.by_line]
    assert rows_in == len(accepted) + len(ordered)
    fraction = len(ordered) / rows_in
    report.update(
        rows_in=rows_in,
        accepted=len(accepted),
        rejected=len(ordered),
        quarantined=len(ordered) if quarantining else 0,
        parse_errors=len(parsed.errors),
        rejected_fraction=round(fraction, 6),
        # A row can break several rules, so these may sum to more than `rejected`.
        rejected_by_rule=dict(sorted(Counter(rule for r in ordered for rule in r.rules).items())),
        counts=f"rows_in {rows_in} = accepted {len(accepted)} + rejected {len(ordered)}"
        + (" (quarantined)" if quarantining else ""),
    )
    write_jsonl(quarantine_file, ({"line": r.line, "raw": r.raw, "reasons": r.reasons} for r in ordered))
    report["outputs"]["quarantine"] = str(quarantine_file)

    failure = None
    if ordered and vcfg.on_invalid == "fail":
        failure = f"{len(ordered)} of {rows_in} rows invalid (validate.on_invalid=fail)"
    elif fraction > vcfg.max_invalid_fraction:
        failure = (f"{len(ordered)} of {rows_in} rows invalid ({fraction:.1%}), above validate.max_invalid_fraction="
                   f"{vcfg.max_invalid_fraction:.1%}; rejected rows are in {quarantine_file}")
    elif not accepted:
        failure = "no rows accepted"
    if failure is None:
        write_jsonl(layout.validated, accepted)
        report["outputs"]["validated"] = str(layout.validated)
    lap("write_s")
    finish([p for r in ordered for p in r.problems], failure)
    log.info("validate %s: %s", shown, report["counts"])
    return ValidateOutputs(layout.validated, layout.validate_report, quarantine_file, docs_out)
