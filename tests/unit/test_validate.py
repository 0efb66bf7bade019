"""The validate stage, model-free: a whitespace token counter stands in for the tokenizer."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from phiops import config, datagen
from phiops.io import sha256_file
from phiops.paths import Layout
from phiops.stages import validate as v

REPO = Path(__file__).resolve().parents[2]
BROKEN = "data/examples/broken.jsonl"
INSTR = datagen.INSTRUCTION


def words(texts: Sequence[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def row(i: int = 0, **kw: Any) -> dict[str, Any]:
    return {"instruction": INSTR, "input": f"ticket number {i} about my Orbit watch", "output": '{"a": 1}', **kw}


def write_lines(path: Path, lines: Sequence[str | dict], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = newline.join(x if isinstance(x, str) else json.dumps(x) for x in lines) + newline
    path.write_bytes(text.encode("utf-8"))
    return path


def _json_msg(text: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc.msg
    raise AssertionError(text)


def cfg_for(raw: str | Path, **validate: Any) -> config.Params:
    return config.parse({"data": {"raw": str(raw)}, "validate": validate})


def run(tmp_path: Path, raw: str | Path, *, docs: bool = False, **validate: Any) -> v.ValidateOutputs:
    return v.run(cfg_for(raw, **validate), Layout(tmp_path), count_tokens=words, tokenizer_name="words",
                 data_docs=docs)


def report(tmp_path: Path) -> dict[str, Any]:
    return json.loads(Layout(tmp_path).validate_report.read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    dst = tmp_path / BROKEN
    dst.parent.mkdir(parents=True)
    dst.write_bytes((REPO / BROKEN).read_bytes())
    return dst


# Each defect of data/examples/broken.jsonl: line -> (rule, start of the message after "file:line").
BROKEN_DEFECTS = {
    3: ("jsonl_parse", ":{col}: invalid JSON: Unterminated string"),
    4: ("expect_column_values_to_not_be_null", ": output: missing; must be a non-empty string"),
    5: ("expect_column_values_to_match_regex", ': instruction: must be a non-empty string, got ""'),
    6: ("expect_column_values_to_be_of_type", ": output: must be a string, got int 42"),
    7: ("expect_column_values_to_be_unique", ": row: duplicate of line 1"),
    8: ("expect_column_values_to_be_between", ": row: {tokens} tokens, outside [2, 1024]"),
    9: ("expect_column_values_to_not_match_regex", ": input: control character U+0007 at character"),
    11: ("jsonl_parse", ":1: expected a JSON object, got an array"),
}
BROKEN_VALID = [1, 2, 12, 13]


def test_accepts_committed_dataset(tmp_path: Path) -> None:
    raw = REPO / "data/raw/tickets.jsonl"
    before = sha256_file(raw)
    out = run(tmp_path, raw)
    assert sha256_file(raw) == before
    rep = report(tmp_path)
    assert rep["passed"] and rep["failure"] is None
    assert (rep["rows_in"], rep["accepted"], rep["rejected"], rep["parse_errors"]) == (1200, 1200, 0, 0)
    assert rep["rejected_by_rule"] == {} and rep["problems"] == []
    assert rep["source_sha256"] == before and rep["gx"]["success"] is True
    accepted = read_jsonl(out.validated)
    originals = read_jsonl(raw)
    assert [r.pop("source_line") for r in accepted] == list(range(1, 1201))
    assert accepted == originals
    assert read_jsonl(out.quarantine) == [] and out.data_docs is None


def test_broken_example_each_defect_has_its_line_and_rule(tmp_path: Path, broken: Path) -> None:
    with pytest.raises(v.DataValidationError) as info:
        run(tmp_path, BROKEN)
    problems = info.value.problems
    lines = broken.read_text(encoding="utf-8").splitlines()
    with pytest.raises(json.JSONDecodeError) as jerr:
        json.loads(lines[2])
    overlong = len(v.example_text(json.loads(lines[7])).split())
    assert overlong > 1024
    seen: dict[int, str] = {}
    for p in problems:
        m = re.match(rf"^{re.escape(BROKEN)}:(\d+)(.*)$", p)
        assert m, p
        assert int(m.group(1)) not in seen, f"more than one problem on a line: {p}"
        seen[int(m.group(1))] = m.group(2)
    assert sorted(seen) == sorted(BROKEN_DEFECTS)
    for line, (rule, start) in BROKEN_DEFECTS.items():
        msg = seen[line]
        assert msg.startswith(start.format(col=jerr.value.colno, tokens=overlong)), (line, msg)
        assert msg.endswith(f"(rule {rule})"), (line, msg)


def test_fail_policy_raises_after_writing_report(tmp_path: Path, broken: Path) -> None:
    layout = Layout(tmp_path)
    layout.validated.parent.mkdir(parents=True)
    layout.validated.write_text('{"stale": true}\n')  # from an earlier, passing run
    before = sha256_file(broken)
    with pytest.raises(v.DataValidationError) as info:
        run(tmp_path, BROKEN)
    err = info.value
    assert isinstance(err, ValueError)
    text = str(err)
    assert text.startswith(f"{BROKEN}: 8 of 12 rows invalid (validate.on_invalid=fail)")
    for p in err.problems:
        assert f"  - {p}" in text
    assert "rows_in=12 accepted=4 rejected=8 (parse errors 2)" in text
    assert err.report_path == layout.validate_report
    rep = report(tmp_path)
    assert rep["passed"] is False and rep["problems"] == err.problems
    assert (rep["rows_in"], rep["accepted"], rep["rejected"], rep["parse_errors"]) == (12, 4, 8, 2)
    assert rep["blank_lines_skipped"] == 1
    assert rep["rejected_by_rule"] == {
        "expect_column_values_to_be_between": 1,
        "expect_column_values_to_be_of_type": 1,
        "expect_column_values_to_be_unique": 1,
        "expect_column_values_to_match_regex": 1,
        "expect_column_values_to_not_be_null": 1,
        "expect_column_values_to_not_match_regex": 1,
        "jsonl_parse": 2,
    }
    assert not layout.validated.exists(), "a failed run must not leave an accepted set behind"
    # Written under `fail` too: dvc.yaml declares it, and it shows what failed the run.
    assert [r["line"] for r in read_jsonl(layout.quarantine / "broken.rejected.jsonl")] == sorted(BROKEN_DEFECTS)
    assert rep["quarantined"] == 0
    assert sha256_file(broken) == before


def test_quarantine_keeps_counts(tmp_path: Path, broken: Path) -> None:
    before = sha256_file(broken)
    out = run(tmp_path, BROKEN, on_invalid="quarantine", max_invalid_fraction=1.0)
    assert sha256_file(broken) == before
    rep = report(tmp_path)
    assert rep["passed"] is True
    assert rep["rows_in"] == rep["accepted"] + rep["quarantined"] == 12
    assert rep["counts"] == "rows_in 12 = accepted 4 + rejected 8 (quarantined)"
    assert out.quarantine == tmp_path / "data/quarantine/broken.rejected.jsonl"
    rejected = read_jsonl(out.quarantine)
    assert [r["line"] for r in rejected] == sorted(BROKEN_DEFECTS)
    raw_lines = broken.read_text(encoding="utf-8").splitlines()
    for r in rejected:
        assert set(r) == {"line", "raw", "reasons"}
        assert r["raw"] == raw_lines[r["line"] - 1]
        assert r["reasons"][0].endswith(f"(rule {BROKEN_DEFECTS[r['line']][0]})")
    assert rejected[0]["reasons"][0].startswith("column ")  # parse errors keep their column
    accepted = read_jsonl(out.validated)
    assert [r["source_line"] for r in accepted] == BROKEN_VALID
    assert {r["source_line"]: json.loads(raw_lines[r["source_line"] - 1]) for r in accepted} == {
        r.pop("source_line"): r for r in accepted
    }


def test_quarantine_still_fails_above_max_fraction(tmp_path: Path, broken: Path) -> None:
    with pytest.raises(v.DataValidationError, match=r"8 of 12 rows invalid \(66.7%\), above validate.max_invalid_fraction=5.0%"):
        run(tmp_path, BROKEN, on_invalid="quarantine")
    layout = Layout(tmp_path)
    assert len(read_jsonl(layout.quarantine / "broken.rejected.jsonl")) == 8  # kept for inspection
    assert report(tmp_path)["rows_in"] == 12
    assert not layout.validated.exists()


def test_fail_message_is_capped(tmp_path: Path) -> None:
    raw = write_lines(tmp_path / "data/raw/x.jsonl", [row(i, output="") for i in range(30)])
    with pytest.raises(v.DataValidationError) as info:
        run(tmp_path, raw)
    assert len(info.value.problems) == 30
    assert str(info.value).count("\n  - ") == v.MESSAGE_PROBLEMS
    assert "... and 10 more (all in" in str(info.value)


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    raw = tmp_path / "data/raw/x.jsonl"
    write_lines(raw, [row(1), "", "   ", row(2), row(3)], newline="\r\n")
    raw.write_bytes(b"\xef\xbb\xbf" + raw.read_bytes())
    out = run(tmp_path, raw)
    rep = report(tmp_path)
    assert rep["passed"] and rep["bom_stripped"] and rep["crlf_lines"] == 5 and rep["blank_lines_skipped"] == 2
    assert [r["source_line"] for r in read_jsonl(out.validated)] == [1, 4, 5]
    assert read_jsonl(out.validated)[0]["instruction"] == INSTR  # BOM not glued to the first key


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"instruction": "a", "input": "\xff", "output": "b"}', ":2:32: invalid UTF-8 (byte 0xff) (rule jsonl_parse)"),
        (b'{"instruction": "a\x00", "input": "", "output": "b"}', ":2:19: NUL byte (rule jsonl_parse)"),
        (b'{"instruction": "a", "input": "", "output": "b",}', ":2:49: invalid JSON: " + _json_msg('{"a": 1,}') + " (rule jsonl_parse)"),
        (b'{"instruction": "a", "input": "", "output": "b", "output": "c"}', ":2:50: duplicate key 'output' in one object (rule jsonl_parse)"),
        (b'{"instruction": "a", "input": "", "output": NaN}', ":2:45: NaN is not valid JSON (rule jsonl_parse)"),
        (b'"just a string"', ":2:1: expected a JSON object, got a string (rule jsonl_parse)"),
        (b'\xef\xbb\xbf{"instruction": "a", "input": "", "output": "b"}', ":2:1: UTF-8 BOM in the middle of the file (rule jsonl_parse)"),
    ],
    ids=["utf8", "nul", "trailing-comma", "dup-key", "nan", "not-object", "bom-mid-file"],
)
def test_parse_errors_have_line_and_column(tmp_path: Path, line: bytes, expected: str) -> None:
    raw = tmp_path / "data/raw/x.jsonl"
    raw.parent.mkdir(parents=True)
    good = json.dumps(row()).encode()
    raw.write_bytes(good + b"\n" + line + b"\n" + good.replace(b"0", b"1") + b"\n")
    with pytest.raises(v.DataValidationError) as info:
        run(tmp_path, "data/raw/x.jsonl")
    assert info.value.problems == ["data/raw/x.jsonl" + expected]


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "file is empty"), (b"\n  \n\r\n", "file is empty"),
     ('{"a": 1}\n'.encode("utf-16"), "file is UTF-16 encoded")],
    ids=["empty", "blank-only", "utf16"],
)
def test_file_level_errors(tmp_path: Path, content: bytes, reason: str) -> None:
    raw = tmp_path / "data/raw/x.jsonl"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(content)
    with pytest.raises(v.DataValidationError, match=reason):
        run(tmp_path, raw, on_invalid="quarantine", max_invalid_fraction=1.0)
    assert report(tmp_path)["passed"] is False


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(v.DataValidationError, match="cannot read"):
        run(tmp_path, "data/raw/nope.jsonl")
    assert report(tmp_path)["failure"].startswith("cannot read")


def test_field_rules(tmp_path: Path) -> None:
    rows = [
        row(1),
        row(2, input=""),  # empty input is fine
        row(3, instruction="   \n"),  # blank instruction is not
        row(4, output=None),
        row(5, input=None),
        row(6, output=["a"]),
        row(7, input="bad \u0000 nul"),  # escaped NUL parses, then fails the control rule
        row(8, output="tab\tand\nnewline are fine"),
        {"instruction": "x", "output": "y"},  # a row without input
        row(10, extra="kept"),
    ]
    raw = write_lines(tmp_path / "data/raw/x.jsonl", rows)
    out = run(tmp_path, raw, on_invalid="quarantine", max_invalid_fraction=1.0)
    reasons = {r["line"]: r["reasons"] for r in read_jsonl(out.quarantine)}
    assert reasons == {
        3: ['instruction: must be a non-empty string, got "   \\n" (rule expect_column_values_to_match_regex)'],
        4: ["output: null; must be a non-empty string (rule expect_column_values_to_not_be_null)"],
        5: ["input: null; must be a string (may be empty) (rule expect_column_values_to_not_be_null)"],
        6: ['output: must be a string, got list ["a"] (rule expect_column_values_to_be_of_type)'],
        7: ["input: control character U+0000 at character 5 (rule expect_column_values_to_not_match_regex)"],
        9: ["input: missing; must be a string (may be empty) (rule expect_column_values_to_not_be_null)"],
    }
    accepted = read_jsonl(out.validated)
    assert [r["source_line"] for r in accepted] == [1, 2, 8, 10]
    assert accepted[-1]["extra"] == "kept"
    assert report(tmp_path)["extra_keys"] == {"extra": 1}


def test_column_missing_everywhere(tmp_path: Path) -> None:
    write_lines(tmp_path / "data/raw/x.jsonl", [{"instruction": INSTR, "output": f"o{i}"} for i in range(3)])
    with pytest.raises(v.DataValidationError) as info:
        run(tmp_path, "data/raw/x.jsonl")
    assert info.value.problems == [
        f"data/raw/x.jsonl:{i}: input: missing in every row (required column) (rule expect_column_to_exist)"
        for i in (1, 2, 3)
    ]


def test_all_rows_null_output(tmp_path: Path) -> None:
    raw = write_lines(tmp_path / "data/raw/x.jsonl", [row(i, output=None) for i in range(3)])
    with pytest.raises(v.DataValidationError) as info:
        run(tmp_path, raw)
    assert [p.split(": ", 1)[1] for p in info.value.problems] == [
        "output: null; must be a non-empty string (rule expect_column_values_to_not_be_null)"
    ] * 3


def test_token_bounds(tmp_path: Path) -> None:
    rows = [row(1), row(2, instruction="a", input="", output="b"), row(3, input="word " * 50)]
    raw = write_lines(tmp_path / "data/raw/x.jsonl", rows)
    out = run(tmp_path, raw, min_tokens=3, max_tokens=40, on_invalid="quarantine", max_invalid_fraction=1.0)
    reasons = {r["line"]: r["reasons"] for r in read_jsonl(out.quarantine)}
    assert reasons == {
        2: ["row: 2 tokens, outside [3, 40] (rule expect_column_values_to_be_between)"],
        3: ["row: 62 tokens, outside [3, 40] (rule expect_column_values_to_be_between)"],
    }
    rep = report(tmp_path)
    assert rep["token_bounds"] == [3, 40]
    n = len(v.example_text(row(1)).split())
    assert rep["n_tokens"] == {"min": n, "max": n, "mean": float(n), "p99": n}  # accepted rows only


def test_duplicates_keep_the_first_copy(tmp_path: Path) -> None:
    rows = [row(1), row(2), row(1), row(3), row(2), row(1)]
    raw = write_lines(tmp_path / "data/raw/x.jsonl", rows)
    out = run(tmp_path, raw, on_invalid="quarantine", max_invalid_fraction=1.0)
    reasons = {r["line"]: r["reasons"] for r in read_jsonl(out.quarantine)}
    dup = " (rule expect_column_values_to_be_unique)"
    assert reasons == {3: ["row: duplicate of line 1" + dup], 5: ["row: duplicate of line 2" + dup],
                       6: ["row: duplicate of line 1" + dup]}
    assert [r["source_line"] for r in read_jsonl(out.validated)] == [1, 2, 4]


def test_default_token_counter_uses_the_base_models_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    class FakeTokenizer:
        def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
            calls.append((list(texts), add_special_tokens))
            return {"input_ids": [[0] * len(t) for t in texts]}  # one token per character

    import phiops.models

    monkeypatch.setattr(phiops.models, "resolve", lambda base: f"/resolved/{base}")
    monkeypatch.setattr(phiops.models, "load_tokenizer", lambda path: FakeTokenizer() if path == "/resolved/m" else None)
    raw = write_lines(tmp_path / "data/raw/x.jsonl", [row(1, input="")])
    cfg = config.parse({"model": {"base": "m"}, "data": {"raw": str(raw)}})
    v.run(cfg, Layout(tmp_path), data_docs=False)
    assert calls == [([f"{INSTR}\n\n{{\"a\": 1}}"], False)]
    rep = report(tmp_path)
    assert rep["tokenizer"] == "m" and rep["n_tokens"]["max"] == len(INSTR) + 2 + 8


def test_data_docs_are_built_in_the_layout(tmp_path: Path) -> None:
    raw = write_lines(tmp_path / "data/raw/x.jsonl", [row(1), row(2, output="")])
    out = run(tmp_path, raw, docs=True, on_invalid="quarantine", max_invalid_fraction=1.0)
    assert out.data_docs == tmp_path / "reports/data_docs"
    assert (out.data_docs / "index.html").is_file()
    pages = list((out.data_docs / "validations").rglob("*.html"))
    assert len(pages) == 1
    assert "phiops_validate" in pages[0].read_text(encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["data_docs", "validate.json"]
    assert report(tmp_path)["outputs"]["data_docs"] == str(out.data_docs)


def test_stage_import_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, phiops.stages.validate; print('great_expectations' in sys.modules, 'transformers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_overlong_line_is_refused_without_reading_it_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v, "MAX_LINE_BYTES", 200)
    big = json.dumps(row(2, input="x" * 1000))
    raw = write_lines(tmp_path / "data/raw/x.jsonl", [row(1), big, row(3)])
    out = run(tmp_path, raw, on_invalid="quarantine", max_invalid_fraction=1.0)
    (rej,) = read_jsonl(out.quarantine)
    assert rej["line"] == 2 and rej["reasons"] == ["column 201: line longer than 200 bytes (rule jsonl_parse)"]
    assert [r["source_line"] for r in read_jsonl(out.validated)] == [1, 3]


def test_failure_before_gx_removes_stale_outputs(tmp_path: Path) -> None:
    raw = write_lines(tmp_path / "data/raw/x.jsonl", [row(1)])
    run(tmp_path, "data/raw/x.jsonl", docs=True)
    layout = Layout(tmp_path)
    assert layout.validated.exists() and (layout.data_docs / "index.html").exists()
    raw.write_text("{not json\n")
    with pytest.raises(v.DataValidationError, match="1 of 1 rows invalid"):
        run(tmp_path, "data/raw/x.jsonl", docs=True)
    assert not layout.validated.exists() and not layout.data_docs.exists()
    assert report(tmp_path)["problems"] == ["data/raw/x.jsonl:1:2: invalid JSON: "
                                            "Expecting property name enclosed in double quotes (rule jsonl_parse)"]
