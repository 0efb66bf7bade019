"""The sample dataset generator: deterministic, committed output up to date, labels learnable."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from phiops import datagen

REPO = Path(__file__).resolve().parents[2]

# An oracle written independently of the generator's templates: the words that state each
# category. Every ticket must contain words of its own category and of no other one.
CATEGORY_WORDS = {
    "billing": r"\b(charged|charge|invoice|refund\w*|payment|billed|price|paid)\b",
    "bug": r"\b(crash\w*|freez\w*|error code|bug|flicker\w*|drops the connection)\b",
    "account": r"\b(account\w*|sign in|password|two-factor|profile|email address|username)\b",
    "shipping": r"\b(deliver\w*|tracking|courier|shipped|shipping|package|parcel|arriv\w*|depot)\b",
    "feature_request": r"\b(would be great|add an option|would love|adding a way|feature|wish|ability to|future version|competitors)\b",
}


def _jsonl_bytes(rows: list[dict]) -> bytes:
    # The same serialization as phiops.io.write_jsonl.
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return datagen.generate(1200, 0)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert datagen.write(a, 300, 5) == 300
    datagen.write(b, 300, 5)
    assert a.read_bytes() == b.read_bytes()
    assert datagen.generate(300, 6) != datagen.generate(300, 5)


def test_generator_has_no_global_state() -> None:
    import random

    random.seed(1)
    first = datagen.generate(50, 3)
    random.seed(2)
    assert datagen.generate(50, 3) == first
    # A prefix is stable: asking for more rows does not change the earlier ones.
    assert datagen.generate(80, 3)[:50] == first


def test_committed_dataset_is_generate_1200_seed_0(rows: list[dict]) -> None:
    committed = (REPO / "data/raw/tickets.jsonl").read_bytes()
    assert committed == _jsonl_bytes(rows), "regenerate with: python -m phiops.datagen"


def test_committed_broken_example_is_current() -> None:
    expected = "\n".join(datagen.broken_lines()) + "\n"
    assert (REPO / "data/examples/broken.jsonl").read_text(encoding="utf-8") == expected


def test_row_shape(rows: list[dict]) -> None:
    assert len(rows) == 1200
    assert len({r["input"] for r in rows}) == 1200, "inputs must be unique (validate rejects duplicates)"
    for r in rows:
        assert list(r) == ["instruction", "input", "output"]
        assert r["instruction"] == datagen.INSTRUCTION
        assert datagen.MIN_WORDS <= len(r["input"].split()) <= datagen.MAX_WORDS
        assert 1 <= len(re.findall(r"[.?!](\s|$)", r["input"])) <= 5  # 1-3 sentences + greeting/sign-off
        label = json.loads(r["output"])
        assert list(label) == ["category", "priority", "product"]
        assert r["output"] == datagen.label_json(**label)
        assert r["output"] == json.dumps(label, separators=(", ", ": "))
        assert label["category"] in datagen.CATEGORIES
        assert label["priority"] in datagen.PRIORITIES
        assert label["product"] in datagen.PRODUCTS


def test_every_label_value_occurs(rows: list[dict]) -> None:
    labels = [json.loads(r["output"]) for r in rows]
    for key, values in (("category", datagen.CATEGORIES), ("priority", datagen.PRIORITIES),
                        ("product", tuple(datagen.PRODUCTS))):
        counts = Counter(lab[key] for lab in labels)
        assert set(counts) == set(values)
        assert min(counts.values()) >= 0.08 * len(rows), counts


def test_product_is_the_one_brand_named(rows: list[dict]) -> None:
    for r in rows:
        named = {pid for pid, brand in datagen.BRANDS.items() if re.search(rf"\b{brand}\b", r["input"])}
        assert named == {json.loads(r["output"])["product"]}, r["input"]


def test_priority_is_the_one_urgency_phrase(rows: list[dict]) -> None:
    for r in rows:
        text = r["input"].lower()
        levels = {lvl for lvl, phrases in datagen.PRIORITY_CUES.items() for p in phrases if p.lower() in text}
        assert levels == {json.loads(r["output"])["priority"]}, r["input"]


def test_priority_phrases_are_unambiguous() -> None:
    for lvl, phrases in datagen.PRIORITY_CUES.items():
        for other, others in datagen.PRIORITY_CUES.items():
            if other == lvl:
                continue
            for p in phrases:
                for q in others:
                    assert p.lower() not in q.lower(), (lvl, p, other, q)


def test_category_is_stated_by_topic_words(rows: list[dict]) -> None:
    for r in rows:
        text = r["input"].lower()
        stated = {c for c, pattern in CATEGORY_WORDS.items() if re.search(pattern, text)}
        assert stated == {json.loads(r["output"])["category"]}, r["input"]


def test_surface_forms_vary(rows: list[dict]) -> None:
    # Not string copying: most product mentions are not the id, and each label has many inputs.
    aliases = Counter(a for r in rows for aliases in datagen.PRODUCTS.values() for a in aliases if a in r["input"])
    assert len(aliases) >= 15
    openings = Counter(" ".join(r["input"].split()[:3]) for r in rows)
    assert len(openings) > 150


def test_bad_n() -> None:
    assert datagen.generate(0) == []
    with pytest.raises(ValueError, match="n must be"):
        datagen.generate(-1)


def test_cli_writes_both_files(tmp_path: Path) -> None:
    out, broken = tmp_path / "t.jsonl", tmp_path / "b.jsonl"
    assert datagen.main(["--n", "20", "--seed", "4", "--out", str(out), "--broken", str(broken)]) == 0
    assert out.read_bytes() == _jsonl_bytes(datagen.generate(20, 4))
    assert broken.read_text().count("\n") == len(datagen.broken_lines())
