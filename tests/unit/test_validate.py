"""The validate stage, model-free: a whitespace token counter stands in for the tokenizer."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from phiops import config, datagen, expectations, jsonl
from phiops import data as D
from phiops.io import sha256_file
from phiops.paths import Layout
from phiops.stages import validate as v

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ["<|im_start|>", "<|im_end|>"]  # as the embedded tokenizer's
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


def _json_error(text: str) -> json.JSONDecodeError:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc
    raise AssertionError(text)


def _json_col(text: str) -> int:
    return _json_error(text).colno


def _json_msg(text: str) -> str:
    return _json_error(text).msg


def cfg_for(raw: str | Path, data: dict[str, Any] | None = None, **validate: Any) -> config.Params:
    return config.parse({"data": {"raw": str(raw), **(data or {})}, "validate": validate})


def run(tmp_path: Path, raw: str | Path, *, docs: bool = False, data: dict[str, Any] | None = None,
        **validate: Any) -> v.ValidateOutputs:
    return v.run(cfg_for(raw, data, **validate), Layout(tmp_path), count_tokens=words, tokenizer_name="words",
                 special_tokens=SPECIALS, data_docs=docs)


def quarantined(out: v.ValidateOutputs, name: str = "x.rejected.jsonl") -> dict[int, list[str]]:
    path = out.quarantine / name
    return {r["line"]: r["reasons"] for r in read_jsonl(path)} if path.exists() else {}


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
    4: ("required:output", ": output: missing; must be a non-empty string"),
    5: ("blank:instruction", ': instruction: must be a non-empty string, got ""'),
    6: ("type:output", ": output: must be a string, got int 42"),
    7: ("duplicate", f": row: duplicate of {BROKEN}:1"),
    8: ("tokens", ": row: {tokens} tokens, outside [2, 1024]"),
    9: ("control", ": input: control character U+0007 at character"),
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
    assert rep["files"][0]["sha256"] == before and rep["files"][0]["format"] == "alpaca"
    assert rep["gx"]["success"] is True
    accepted = read_jsonl(out.validated)
    originals = read_jsonl(raw)
    assert [r["source_line"] for r in accepted] == list(range(1, 1201))
    assert [r["messages"] for r in accepted] == [D.to_messages(o, "alpaca") for o in originals]
    assert rep["splits"] == {"train": sum(r["split"] == "train" for r in accepted),
                             "test": sum(r["split"] == "test" for r in accepted)}
    assert 0.05 < rep["splits"]["test"] / 1200 < 0.15  # data.test_fraction 0.1, by prompt hash
    assert list(out.quarantine.iterdir()) == [] and out.data_docs is None


def test_broken_example_each_defect_has_its_line_and_rule(tmp_path: Path, broken: Path) -> None:
    with pytest.raises(v.DataValidationError) as info:
        run(tmp_path, BROKEN)
    problems = info.value.problems
    lines = broken.read_text(encoding="utf-8").splitlines()
    with pytest.raises(json.JSONDecodeError) as jerr:
        json.loads(lines[2])
    overlong = len(v.token_text(D.to_messages(json.loads(lines[7]), "alpaca")).split())
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
    assert rep["files"][0]["blank_lines_skipped"] == 1
    assert rep["rejected_by_rule"] == {
        "tokens": 1, "type:output": 1, "duplicate": 1, "blank:instruction": 1, "required:output": 1, "control": 1,
        "jsonl_parse": 2,
    }
    # The accepted set of the earlier, passing run is the last good output: kept as it was.
    assert layout.validated.read_text() == '{"stale": true}\n'
    assert [p.name for p in layout.validated.parent.iterdir()] == [layout.validated.name]  # no temp file left
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
    assert out.quarantine == tmp_path / "data/quarantine"
    rejected = read_jsonl(out.quarantine / "broken.rejected.jsonl")
    assert [r["line"] for r in rejected] == sorted(BROKEN_DEFECTS)
    raw_lines = broken.read_text(encoding="utf-8").splitlines()
    for r in rejected:
        assert set(r) == {"line", "raw", "reasons"}
        assert r["raw"] == raw_lines[r["line"] - 1]
        assert r["reasons"][0].endswith(f"(rule {BROKEN_DEFECTS[r['line']][0]})")
    assert rejected[0]["reasons"][0].startswith("column ")  # parse errors keep their column
    accepted = read_jsonl(out.validated)
    assert [r["source_line"] for r in accepted] == BROKEN_VALID
    for r in accepted:
        assert r["messages"] == D.to_messages(json.loads(raw_lines[r["source_line"] - 1]), "alpaca")
        assert (r["source"], r["format"]) == (BROKEN, "alpaca")


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
    assert "every row in data/quarantine/" in str(info.value)


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    raw = tmp_path / "data/raw/x.jsonl"
    write_lines(raw, [row(1), "", "   ", row(2), row(3)], newline="\r\n")
    raw.write_bytes(b"\xef\xbb\xbf" + raw.read_bytes())
    out = run(tmp_path, raw)
    rep = report(tmp_path)
    f = rep["files"][0]
    assert rep["passed"] and f["bom_stripped"] and f["crlf_lines"] == 5 and f["blank_lines_skipped"] == 2
    assert [r["source_line"] for r in read_jsonl(out.validated)] == [1, 4, 5]
    # BOM not glued to the first key, CR not glued to the last value
    assert read_jsonl(out.validated)[0]["messages"] == D.to_messages(row(1), "alpaca")


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
        {"instruction": "x y", "output": "z"},  # input is optional
        row(10, extra="kept"),
    ]
    raw = write_lines(tmp_path / "data/raw/x.jsonl", rows)
    out = run(tmp_path, raw, on_invalid="quarantine", max_invalid_fraction=1.0)
    assert quarantined(out) == {
        3: ['instruction: must be a non-empty string, got "   \\n" (rule blank:instruction)'],
        4: ["output: null; must be a non-empty string (rule required:output)"],
        5: ["input: null; must be a string (may be empty) (rule required:input)"],
        6: ['output: must be a string, got list ["a"] (rule type:output)'],
        7: ["input: control character U+0000 at character 5 (rule control)"],
    }
    accepted = read_jsonl(out.validated)
    assert [r["source_line"] for r in accepted] == [1, 2, 8, 9, 10]
    assert accepted[-1]["meta"] == {"extra": "kept"}
    assert report(tmp_path)["extra_keys"] == {"extra": 1}


def test_field_missing_everywhere(tmp_path: Path) -> None:
    write_lines(tmp_path / "data/raw/x.jsonl", [{"instruction": f"{INSTR} {i}", "input": "a b"} for i in range(3)])
    with pytest.raises(v.DataValidationError) as info:
        run(tmp_path, "data/raw/x.jsonl")
    assert info.value.problems == [
        f"data/raw/x.jsonl:{i}: output: missing; must be a non-empty string (rule required:output)" for i in (1, 2, 3)
    ]


def test_all_rows_null_output(tmp_path: Path) -> None:
    raw = write_lines(tmp_path / "data/raw/x.jsonl", [row(i, output=None) for i in range(3)])
    with pytest.raises(v.DataValidationError) as info:
        run(tmp_path, raw)
    assert [p.split(": ", 1)[1] for p in info.value.problems] == [
        "output: null; must be a non-empty string (rule required:output)"
    ] * 3


def test_token_bounds(tmp_path: Path) -> None:
    rows = [row(1), row(2, instruction="a", input="", output="b"), row(3, input="word " * 50)]
    raw = write_lines(tmp_path / "data/raw/x.jsonl", rows)
    out = run(tmp_path, raw, min_tokens=3, max_tokens=40, on_invalid="quarantine", max_invalid_fraction=1.0)
    assert quarantined(out) == {
        2: ["row: 2 tokens, outside [3, 40] (rule tokens)"],
        3: ["row: 62 tokens, outside [3, 40] (rule tokens)"],
    }
    rep = report(tmp_path)
    assert rep["token_bounds"] == [3, 40]
    n = len(v.token_text(D.to_messages(row(1), "alpaca")).split())
    assert rep["n_tokens"] == {"min": n, "max": n, "mean": float(n), "p99": n}  # accepted rows only


def test_over_length_truncate_keeps_long_rows_with_a_warning(tmp_path: Path) -> None:
    rows = [row(1), row(2, instruction="a", input="", output="b"), row(3, input="word " * 50)]
    write_lines(tmp_path / "data/raw/x.jsonl", rows)
    out = run(tmp_path, "data/raw/x.jsonl", min_tokens=3, max_tokens=40, over_length="truncate", on_invalid="quarantine",
              max_invalid_fraction=1.0)
    assert quarantined(out) == {2: ["row: 2 tokens, outside [3, inf] (rule tokens)"]}
    assert [r["source_line"] for r in read_jsonl(out.validated)] == [1, 3]
    rep = report(tmp_path)
    assert rep["warnings_by_rule"] == {"over_length": 1}
    assert rep["warnings"] == ["data/raw/x.jsonl:3: row: 62 tokens, above 40; kept, format truncates it (rule over_length)"]


def test_duplicates_keep_the_first_copy_across_chunks(tmp_path: Path) -> None:
    rows = [row(1), row(2), row(1), row(3), row(2), row(1)]
    write_lines(tmp_path / "data/raw/x.jsonl", rows)
    out = run(tmp_path, "data/raw/x.jsonl", on_invalid="quarantine", max_invalid_fraction=1.0, chunk_rows=2)
    first = "data/raw/x.jsonl"
    assert quarantined(out) == {3: [f"row: duplicate of {first}:1 (rule duplicate)"],
                                5: [f"row: duplicate of {first}:2 (rule duplicate)"],
                                6: [f"row: duplicate of {first}:1 (rule duplicate)"]}
    assert [r["source_line"] for r in read_jsonl(out.validated)] == [1, 2, 4]
    assert report(tmp_path)["gx"]["chunks"] == 3


def test_near_duplicates_fold_case_unicode_and_whitespace(tmp_path: Path) -> None:
    rows = [row(1), row(1, input="TICKET  number 1 about my Orbit watch "), row(1, input="ticket number 1 about my Ｏrbit watch"),
            row(1, input="ticket number 1 about my Orbit watch!")]
    write_lines(tmp_path / "data/raw/x.jsonl", rows)
    out = run(tmp_path, "data/raw/x.jsonl", on_invalid="quarantine", max_invalid_fraction=1.0)
    near = "row: same as data/raw/x.jsonl:1 after folding case, Unicode form and whitespace (rule near_duplicate)"
    assert quarantined(out) == {2: [near], 3: [near]}  # punctuation is content: line 4 stays


def test_streaming_bounds_rows_per_gx_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = expectations.Suites.run

    def spy(self: Any, fmt: str, df: Any) -> Any:
        sizes.append(len(df))
        return real(self, fmt, df)

    monkeypatch.setattr(expectations.Suites, "run", spy)
    raw = write_lines(tmp_path / "data/raw/x.jsonl", [row(i) for i in range(25)])
    out = run(tmp_path, raw, chunk_rows=10)
    assert sizes == [10, 10, 5]
    assert len(read_jsonl(out.validated)) == 25


# ----------------------------------------------------------------------------- formats


def chat(*turns: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


def test_chat_and_prompt_completion_files_are_detected_and_canonical(tmp_path: Path) -> None:
    d = tmp_path / "data/raw/mixed"
    write_lines(d / "a_alpaca.jsonl", [row(1)])
    write_lines(d / "b_chat.jsonl", [chat(("system", "be terse"), ("user", "hi there"), ("assistant", "hello you"),
                                          ("user", "and now"), ("assistant", "bye now"), id=7)])
    write_lines(d / "c_pc.jsonl", [{"prompt": "two plus two", "completion": "four, of course"}])
    out = run(tmp_path, "data/raw/mixed")
    rep = report(tmp_path)
    assert [(f["path"], f["format"], f["accepted"]) for f in rep["files"]] == [
        ("data/raw/mixed/a_alpaca.jsonl", "alpaca", 1), ("data/raw/mixed/b_chat.jsonl", "chat", 1),
        ("data/raw/mixed/c_pc.jsonl", "prompt_completion", 1)]
    rows = read_jsonl(out.validated)
    assert [r["format"] for r in rows] == ["alpaca", "chat", "prompt_completion"]
    assert rows[1]["messages"][0] == {"role": "system", "content": "be terse"} and rows[1]["meta"] == {"id": 7}
    assert rows[2]["messages"] == [{"role": "user", "content": "two plus two"},
                                   {"role": "assistant", "content": "four, of course"}]


def test_declared_format_is_enforced(tmp_path: Path) -> None:
    raw = write_lines(tmp_path / "data/raw/x.jsonl", [row(1)])
    with pytest.raises(v.DataValidationError) as info:
        run(tmp_path, raw, data={"format": "chat"})
    assert info.value.problems == [f"{raw}:1: messages: missing; must be a list of messages (rule required:messages)"]


def test_undetectable_format_is_a_file_error(tmp_path: Path) -> None:
    write_lines(tmp_path / "data/raw/x.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(v.DataValidationError, match=r"cannot detect the format: rows have keys \['answer', 'question'\]"):
        run(tmp_path, "data/raw/x.jsonl", on_invalid="quarantine", max_invalid_fraction=1.0)


def test_empty_directory_is_a_file_error(tmp_path: Path) -> None:
    (tmp_path / "data/raw/empty").mkdir(parents=True)
    with pytest.raises(v.DataValidationError, match=r"no \*.jsonl files in this directory"):
        run(tmp_path, "data/raw/empty")


# ----------------------------------------------------------------------------- leakage and PII


def test_leakage_between_train_and_an_explicit_test_file(tmp_path: Path) -> None:
    write_lines(tmp_path / "data/raw/train.jsonl", [row(1), row(2), row(3)])
    # Same prompt as train row 2 (case and spacing differ), another answer: the model would be tested on
    # a question it was trained on.
    write_lines(tmp_path / "data/raw/test.jsonl", [row(4), row(2, input="Ticket number 2  about my Orbit watch",
                                                                 output='{"b": 2}')])
    out = run(tmp_path, "data/raw/train.jsonl", data={"test": "data/raw/test.jsonl"}, on_invalid="quarantine",
              max_invalid_fraction=1.0)
    assert quarantined(out, "test.test.rejected.jsonl") == {
        2: ["row: its prompt is also in the train split at data/raw/train.jsonl:2 (train/test leakage) (rule leakage)"]}
    rows = read_jsonl(out.validated)
    assert [(r["source"], r["split"]) for r in rows] == [("data/raw/train.jsonl", "train")] * 3 + [
        ("data/raw/test.jsonl", "test")]
    assert report(tmp_path)["splits"] == {"train": 3, "test": 1}


def test_a_test_file_inside_the_raw_directory_only_tests(tmp_path: Path) -> None:
    write_lines(tmp_path / "data/raw/a.jsonl", [row(1), row(2)])
    write_lines(tmp_path / "data/raw/held_out.jsonl", [row(3)])
    out = run(tmp_path, "data/raw", data={"test": "data/raw/held_out.jsonl"})
    assert [(r["source"], r["split"]) for r in read_jsonl(out.validated)] == [
        ("data/raw/a.jsonl", "train"), ("data/raw/a.jsonl", "train"), ("data/raw/held_out.jsonl", "test")]


def test_hash_split_keeps_one_prompt_in_one_split(tmp_path: Path) -> None:
    rows = [row(i, output=f'{{"a": {k}}}') for i in range(200) for k in range(2)]  # each prompt twice
    out = run(tmp_path, write_lines(tmp_path / "data/raw/x.jsonl", rows), data={"test_fraction": 0.3})
    by_prompt: dict[str, set[str]] = {}
    for r in read_jsonl(out.validated):
        by_prompt.setdefault(r["messages"][0]["content"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_prompt.values()) and len(by_prompt) == 200
    (leakage,) = [e for e in report(tmp_path)["gx"]["expectations"] if e["check"] == "leakage"]
    assert leakage["unexpected_count"] == 0 and leakage["success"]


@pytest.mark.parametrize("policy", ["warn", "reject", "off"])
def test_pii_policy(tmp_path: Path, policy: str) -> None:
    rows = [row(1), row(2, input="mail me at jane.doe@example.com please"), row(3, output="use key sk-abcdefghijklmnopqrstuvwxyz123")]
    write_lines(tmp_path / "data/raw/x.jsonl", rows)
    out = run(tmp_path, "data/raw/x.jsonl", pii=policy, on_invalid="quarantine", max_invalid_fraction=1.0)
    email = f"input: looks like email at character 12 (j{'*' * 18}m) (rule pii:email)"
    key = f"output: looks like api_key at character 9 (s{'*' * 30}3) (rule pii:api_key)"
    rep = report(tmp_path)
    if policy == "reject":
        assert quarantined(out) == {2: [email], 3: [key]}
    elif policy == "warn":
        assert quarantined(out) == {} and len(read_jsonl(out.validated)) == 3
        assert rep["warnings"] == [f"data/raw/x.jsonl:2: {email}", f"data/raw/x.jsonl:3: {key}"]
    else:
        assert quarantined(out) == {} and rep["warnings"] == [] and "pii:email" not in {e["check"] for e in rep["gx"]["expectations"]}
    assert "jane.doe@example.com" not in json.dumps(rep)  # evidence is masked, never repeated


# ----------------------------------------------------------------------------- the malformed corpus

G = json.dumps(row(0))  # a valid first line, so each case's defect is on line 2
C = lambda *turns: json.dumps(chat(*turns))  # noqa: E731
# (id, line 2, the problem after "data/raw/x.jsonl:2"): file, line, field and rule in every message.
CORPUS = [
    ("truncated-json", G[:40], f":{_json_col(G[:40])}: invalid JSON: {_json_msg(G[:40])} (rule jsonl_parse)"),
    ("trailing-comma", G[:-1] + ",}", f":{len(G) + 1}: invalid JSON: {_json_msg(G[:-1] + ',}')} (rule jsonl_parse)"),
    ("trailing-garbage", G + " x", f":{len(G) + 2}: invalid JSON: Extra data (rule jsonl_parse)"),
    ("nul-byte", G.replace("ticket", "tic\x00ket", 1), f":{G.index('ticket') + 4}: NUL byte (rule jsonl_parse)"),
    ("invalid-utf8", b"\xff", None),
    ("bom-mid-file", "\ufeff" + G, ":1: UTF-8 BOM in the middle of the file (rule jsonl_parse)"),
    ("not-an-object", "[1, 2]", ":1: expected a JSON object, got an array (rule jsonl_parse)"),
    ("bare-string", '"text"', ":1: expected a JSON object, got a string (rule jsonl_parse)"),
    ("null", "null", ":1: expected a JSON object, got null (rule jsonl_parse)"),
    ("duplicate-key", G[:-1] + ', "output": "x"}', f":{len(G) + 2}: duplicate key 'output' in one object (rule jsonl_parse)"),
    ("nan", G[:-1] + ', "score": NaN}', f":{len(G) + 11}: NaN is not valid JSON (rule jsonl_parse)"),
    ("missing-field", json.dumps({"instruction": "a b c", "input": ""}), ": output: missing; must be a non-empty string (rule required:output)"),
    ("null-field", json.dumps(row(1, instruction=None)), ": instruction: null; must be a non-empty string (rule required:instruction)"),
    ("wrong-type", json.dumps(row(1, input=7)), ": input: must be a string, got int 7 (rule type:input)"),
    ("empty-string", json.dumps(row(1, output="")), ': output: must be a non-empty string, got "" (rule blank:output)'),
    ("whitespace-only", json.dumps(row(1, output=" \t")), ': output: must be a non-empty string, got " \\t" (rule blank:output)'),
    ("control-char", json.dumps(row(1, output="a\u001bb")), ": output: control character U+001B at character 2 (rule control)"),
    ("c1-control", json.dumps(row(1, input="x\u0085y")), ": input: control character U+0085 at character 2 (rule control)"),
    ("too-few-tokens", json.dumps(row(1, instruction="a", input="", output="b")), ": row: 2 tokens, outside [3, 60] (rule tokens)"),
    ("too-many-tokens", json.dumps(row(1, input="w " * 80)), ": row: 92 tokens, outside [3, 60] (rule tokens)"),
    ("exact-duplicate", G, ": row: duplicate of data/raw/x.jsonl:1 (rule duplicate)"),
    ("normalized-duplicate", G.upper().replace("INSTRUCTION", "instruction").replace("INPUT", "input").replace("OUTPUT", "output"),
     ": row: same as data/raw/x.jsonl:1 after folding case, Unicode form and whitespace (rule near_duplicate)"),
    ("special-token", json.dumps(row(1, output='{"a": 1}<|im_end|>')),
     ": output: the special token '<|im_end|>' at character 9; the model would read it as the real token (rule special_tokens)"),
    ("pii-email", json.dumps(row(1, input="reach me: ann@corp.io")), ": input: looks like email at character 11 (a*********o) (rule pii:email)"),
    ("pii-phone", json.dumps(row(1, input="call +44 20 7946 0958 now")), f": input: looks like phone at character 6 (+{'*' * 14}8) (rule pii:phone)"),
]
CHAT_CORPUS = [
    ("chat-not-a-list", json.dumps({"messages": "hi"}), ': messages: must be a list, got str "hi" (rule type:messages)'),
    ("chat-empty-list", json.dumps({"messages": []}), ": messages: empty list (rule structure)"),
    ("chat-message-not-object", json.dumps({"messages": ["hi"]}), ': messages[0]: must be an object with role and content, got "hi" (rule structure)'),
    ("chat-missing-role", json.dumps({"messages": [{"content": "hi"}]}), ": messages[0].role: missing (rule structure)"),
    ("chat-unknown-role", C(("user", "a b"), ("bot", "c d")), ': messages[1].role: "bot" is not one of system, user, assistant (rule structure)'),
    ("chat-missing-content", json.dumps({"messages": [{"role": "user"}]}), ": messages[0].content: missing (rule structure)"),
    ("chat-content-type", C(("user", "a b"), ("assistant", 3)), ": messages[1].content: must be a string, got int 3 (rule structure)"),
    ("chat-empty-content", C(("user", "a b"), ("assistant", " ")), ': messages[1].content: must be a non-empty string, got " " (rule structure)'),
    ("chat-ends-with-user", C(("user", "a b"), ("assistant", "c d"), ("user", "e f")), ": messages: roles user,assistant,user; expected an optional system message, then user/assistant alternating, ending with assistant (rule role_order)"),
    ("chat-assistant-first", C(("assistant", "a b"), ("user", "c d"), ("assistant", "e f")), ": messages: roles assistant,user,assistant; expected an optional system message, then user/assistant alternating, ending with assistant (rule role_order)"),
    ("chat-two-users", C(("user", "a b"), ("user", "c d"), ("assistant", "e f")), ": messages: roles user,user,assistant; expected an optional system message, then user/assistant alternating, ending with assistant (rule role_order)"),
    ("chat-system-late", C(("user", "a b"), ("system", "c d"), ("assistant", "e f")), ": messages: roles user,system,assistant; expected an optional system message, then user/assistant alternating, ending with assistant (rule role_order)"),
    ("chat-control", C(("user", "a\u0007 b"), ("assistant", "c d")), ": messages[0].content: control character U+0007 at character 2 (rule control)"),
]


@pytest.mark.parametrize(("line", "expected"), [c[1:] for c in CORPUS + CHAT_CORPUS],
                         ids=[c[0] for c in CORPUS + CHAT_CORPUS])
def test_malformed_corpus(tmp_path: Path, line: str | bytes, expected: str | None) -> None:
    raw = tmp_path / "data/raw/x.jsonl"
    raw.parent.mkdir(parents=True)
    body = line if isinstance(line, bytes) else line.encode("utf-8")
    first = C(("user", "a b c"), ("assistant", "d e f")) if body.startswith(b'{"messages"') else G
    raw.write_bytes(first.encode() + b"\n" + body + b"\n")
    if expected is None:  # invalid UTF-8: the column is the byte's character position
        expected = ":1: invalid UTF-8 (byte 0xff) (rule jsonl_parse)"
    with pytest.raises(v.DataValidationError) as info:
        run(tmp_path, "data/raw/x.jsonl", min_tokens=3, max_tokens=60, pii="reject")
    assert info.value.problems == ["data/raw/x.jsonl:2" + expected]
    assert len(CORPUS) + len(CHAT_CORPUS) >= 20


def test_quarantine_holds_every_rejected_row_verbatim(tmp_path: Path) -> None:
    lines = [G] + [c[1] for c in CORPUS if isinstance(c[1], str) and c[0] != "bom-mid-file"]
    raw = tmp_path / "data/raw/x.jsonl"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    out = run(tmp_path, "data/raw/x.jsonl", min_tokens=3, max_tokens=60, pii="reject", on_invalid="quarantine",
              max_invalid_fraction=1.0)
    rejected = read_jsonl(out.quarantine / "x.rejected.jsonl")
    rep = report(tmp_path)
    assert rep["rows_in"] == len(lines) == rep["accepted"] + len(rejected) and rep["accepted"] == 1
    for r in rejected:
        assert r["raw"] == lines[r["line"] - 1]


def test_default_token_counter_uses_the_base_models_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    class FakeTokenizer:
        def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
            calls.append((list(texts), add_special_tokens))
            return {"input_ids": [[0] * len(t) for t in texts]}  # one token per character

    import phiops.models

    # A checkpoint without tokenizer.json: the transformers tokenizer is loaded and called.
    monkeypatch.setattr(phiops.models, "resolve", lambda base: f"/resolved/{base}")
    monkeypatch.setattr(phiops.models, "load_tokenizer",
                        lambda path: FakeTokenizer() if str(path) == "/resolved/m" else None)
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
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["data_docs", "validate.json", "validate.md"]
    assert report(tmp_path)["outputs"]["data_docs"] == str(out.data_docs)


def test_stage_import_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, phiops.stages.validate; print('great_expectations' in sys.modules, 'transformers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_overlong_line_is_refused_without_reading_it_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 200)
    big = json.dumps(row(2, input="x" * 1000))
    raw = write_lines(tmp_path / "data/raw/x.jsonl", [row(1), big, row(3)])
    out = run(tmp_path, raw, on_invalid="quarantine", max_invalid_fraction=1.0)
    (rej,) = read_jsonl(out.quarantine / "x.rejected.jsonl")
    assert rej["line"] == 2 and rej["reasons"] == ["column 201: line longer than 200 bytes (rule jsonl_parse)"]
    assert [r["source_line"] for r in read_jsonl(out.validated)] == [1, 3]


def test_failure_keeps_the_last_good_accepted_set_and_drops_stale_docs(tmp_path: Path) -> None:
    raw = write_lines(tmp_path / "data/raw/x.jsonl", [row(1)])
    run(tmp_path, "data/raw/x.jsonl", docs=True)
    layout = Layout(tmp_path)
    assert layout.validated.exists() and (layout.data_docs / "index.html").exists()
    good = layout.validated.read_bytes()
    raw.write_text("{not json\n")
    with pytest.raises(v.DataValidationError, match="1 of 1 rows invalid"):
        run(tmp_path, "data/raw/x.jsonl", docs=True)
    # The accepted set is the last good output (dvc.lock still pins it): untouched, and no
    # temporary file beside it. The Data Docs describe a run, and this run built none.
    assert layout.validated.read_bytes() == good
    assert [p.name for p in layout.validated.parent.iterdir()] == [layout.validated.name]
    assert not layout.data_docs.exists()
    assert report(tmp_path)["problems"] == ["data/raw/x.jsonl:1:2: invalid JSON: "
                                            "Expecting property name enclosed in double quotes (rule jsonl_parse)"]
