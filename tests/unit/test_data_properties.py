"""Property-based tests of validate (hypothesis): what must hold for every input, not just examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phiops import config
from phiops import data as D
from phiops.paths import Layout
from phiops.stages import validate as v

# The tokenizer's special tokens these tests give validate: text holding one is invalid (rule special_tokens).
SPECIALS = ["<|im_end|>"]
# Text a user could write: any assigned character but controls, not blank, and no special token written out
# (validate rejects both). Hypothesis also draws the string constants of the code it tests, so it does write
# "<|im_end|>" (a shrunk failure: the completion "<|im_end|>").
TEXT = (st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co")), min_size=1, max_size=30)
        .filter(lambda t: t.strip() and not any(s in t for s in SPECIALS)))


def _alpaca(t: tuple[str, str, str]) -> dict[str, Any]:
    return {"instruction": t[0], "input": t[1], "output": t[2]}


FLAT = st.one_of(
    st.tuples(TEXT, st.just("") | TEXT, TEXT).map(_alpaca),
    st.tuples(TEXT, TEXT).map(lambda t: {"prompt": t[0], "completion": t[1]}),
)
ROW = st.one_of(
    FLAT,
    st.tuples(st.none() | TEXT, st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3)).map(
        lambda t: {"messages": ([{"role": "system", "content": t[0]}] if t[0] else [])
                   + [{"role": r, "content": c} for u, a in t[1] for r, c in (("user", u), ("assistant", a))]}),
)


def _fmt(obj: dict[str, Any]) -> D.Format:
    return "chat" if "messages" in obj else "prompt_completion" if "prompt" in obj else "alpaca"


def _key(obj: dict[str, Any]) -> bytes:
    return D.normalized_key(D.to_messages(obj, _fmt(obj)))


def words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def _validate(root: Path, files: dict[str, list[dict[str, Any]]], **data: Any) -> list[dict[str, Any]]:
    for name, rows in files.items():
        if not rows:
            continue  # an empty file is an error of its own (tested in test_validate)
        p = root / "data/raw" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = config.parse({"data": {"raw": "data/raw", **data}, "validate": {"min_tokens": 1}})
    out = v.run(cfg, Layout(root), count_tokens=words, special_tokens=SPECIALS, data_docs=False)
    # Split on "\n" only: str.splitlines also splits on U+2028/U+2029, which JSON strings may hold raw.
    return [json.loads(x) for x in out.validated.read_text(encoding="utf-8").split("\n") if x]


# Each example runs the stage (a GX context: ~1 s), so few examples; hypothesis still varies formats,
# Unicode and sizes, and shrinks a failure to its smallest case.
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(rows=st.lists(ROW, min_size=1, max_size=12, unique_by=_key))
def test_valid_rows_are_never_rejected(tmp_path_factory: Any, rows: list[dict[str, Any]]) -> None:
    by_format: dict[str, list[dict[str, Any]]] = {}
    for r in rows:  # one format per file, as the formats are defined
        by_format.setdefault(_fmt(r), []).append(r)
    files = {f"{fmt}.jsonl": rs for fmt, rs in by_format.items()}
    accepted = _validate(tmp_path_factory.mktemp("p"), files)
    assert len(accepted) == len(rows)
    expected = {json.dumps(D.to_messages(r, _fmt(r))) for r in rows}
    assert {json.dumps(a["messages"]) for a in accepted} == expected


@SETTINGS
@given(rows=st.lists(FLAT, min_size=2, max_size=30, unique_by=_key),
       cut=st.integers(min_value=1, max_value=29))
def test_split_is_stable_under_appends(tmp_path_factory: Any, rows: list[dict[str, Any]], cut: int) -> None:
    cut = min(cut, len(rows) - 1)

    def files(rs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:  # appending grows each file
        return {"a.jsonl": [r for r in rs if "prompt" not in r], "p.jsonl": [r for r in rs if "prompt" in r]}

    first = _validate(tmp_path_factory.mktemp("a"), files(rows[:cut]), test_fraction=0.4)
    both = _validate(tmp_path_factory.mktemp("b"), files(rows), test_fraction=0.4)
    before = {r["id"]: r["split"] for r in first}
    after = {r["id"]: r["split"] for r in both}
    assert set(before) <= set(after)
    assert all(after[i] == s for i, s in before.items())


@given(convs=st.lists(ROW, min_size=1, max_size=20))
def test_same_prompt_same_split(convs: list[dict[str, Any]]) -> None:
    for obj in convs:
        m = D.to_messages(obj, _fmt(obj))
        other = [*m[:-1], {"role": "assistant", "content": m[-1]["content"] + " (another answer)"}]
        assert D.is_test(m, 0.5) == D.is_test(other, 0.5)
