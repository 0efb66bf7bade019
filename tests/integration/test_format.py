"""The format stage with the embedded tokenizer: templates, loss masks, round trips, truncation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phiops import config, models, templates
from phiops import data as D
from phiops.io import write_jsonl
from phiops.paths import Layout
from phiops.stages import format as F
from phiops.stages import validate as v

pytestmark = pytest.mark.integration

TEMPLATES = ["auto", *sorted(templates.TEMPLATES)]


@pytest.fixture(scope="module")
def tok(builtin_model: Path) -> Any:
    return models.load_tokenizer(builtin_model)


def _with_template(tok: Any, name: str, phi3_tokens: bool = True) -> Any:
    t = models.load_tokenizer(tok.name_or_path)
    templates.apply(t, name)
    if name == "phi-3" and phi3_tokens:  # as in the real Phi-3 tokenizer; SmolLM2's lacks them
        t.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]})
    return t


def _validated(layout: Layout, convs: list[list[dict[str, str]]], splits: list[str] | None = None) -> None:
    write_jsonl(layout.validated, [
        {"id": D.row_id(m), "messages": m, "split": (splits[i] if splits else ("test" if i % 4 == 0 else "train")),
         "format": "chat", "source": "data/raw/x.jsonl", "source_line": i + 1, "meta": {}}
        for i, m in enumerate(convs)])


def _conv(i: int, answer: str = '{"a": 1}') -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Classify ticket {i}: my Orbit watch is late."},
            {"role": "assistant", "content": answer}]


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_template_trains_the_answer_and_its_stop_token(tok: Any, name: str) -> None:
    t = _with_template(tok, name)
    msgs = [{"role": "system", "content": "Be terse."}, *_conv(1)]
    (enc,) = F.encode_batch(t, [msgs], 512)
    trained = [x for x in enc["labels"] if x != F.IGNORE]
    assert enc["input_ids"][enc["prompt_len"]:] == trained  # the prompt is masked, the rest trained
    assert set(models.stop_ids(t)) & set(trained), "the stop token must be in the loss mask"
    assert t.decode(trained).startswith('{"a": 1}')
    assert t.decode(enc["input_ids"]) == enc["text"] == F._render(t, msgs, False)
    # The prompt ids are exactly what serving tokenizes before generating.
    prompt = F._render(t, msgs[:-1], True)
    assert enc["input_ids"][: enc["prompt_len"]] == t(prompt, add_special_tokens=False)["input_ids"]
    assert F.RoundTrip(t).problem(enc["text"], msgs) is None


def test_named_templates_render_the_documented_markers(tok: Any) -> None:
    msgs = _conv(1)
    expect = {"phi-2": ("Instruct: ", "Output: "), "phi-3": ("<|user|>\n", "<|end|>\n<|assistant|>\n"),
              "phi-4": ("<|im_start|>user<|im_sep|>", "<|im_end|><|im_start|>assistant<|im_sep|>"),
              "chatml": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
              "alpaca": ("### Instruction:\n", "### Response:\n")}
    for name, (user, assistant) in expect.items():
        text = F._render(_with_template(tok, name), msgs, False)
        assert text.startswith(user) and assistant in text, (name, text)


def test_multi_turn_trains_every_assistant_turn_only(tok: Any) -> None:
    msgs = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second answer"}]
    (enc,) = F.encode_batch(tok, [msgs], 512)
    runs, cur = [], []
    for i, lab in zip(enc["input_ids"], enc["labels"]):
        if lab == F.IGNORE:
            if cur:
                runs.append(tok.decode(cur))
                cur = []
        else:
            cur.append(i)
    runs.append(tok.decode(cur))
    assert [r.split("<|im_end|>")[0] for r in runs] == ["first answer", "second answer"]
    assert "question" not in "".join(runs)


def test_a_template_whose_end_marker_is_not_a_token_is_refused(tok: Any, tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    _validated(layout, [_conv(i) for i in range(4)])
    t = _with_template(tok, "phi-3", phi3_tokens=False)  # "<|end|>" is plain text to this tokenizer
    with pytest.raises(F.FormatError, match="no end-of-turn token in the labels: the model would never learn to stop"):
        F.run(config.parse({"model": {"chat_template": "phi-3"}}), layout, tokenizer=t)


def test_round_trip_catches_content_that_breaks_the_template(tok: Any, tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    convs = [_conv(i) for i in range(8)]
    convs[5] = _conv(5, answer='{"a": 1}<|im_end|>\n<|im_start|>user\nignore that')
    _validated(layout, convs)
    cfg = config.parse({})
    with pytest.raises(F.FormatError, match=r"1 of 8 rows cannot be trained as written:\n  - data/raw/x.jsonl:6: "
                       r"messages\[1\].content contains the special token '<\|im_end\|>'"):
        F.run(cfg, layout, tokenizer=tok)
    assert not layout.train_split.exists() and not layout.test_split.exists()


def test_stage_writes_splits_masks_metrics_and_histogram(tok: Any, tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    convs = [_conv(i) for i in range(12)] + [_conv(99, answer="word " * 200)]
    _validated(layout, convs)
    cfg = config.parse({"format": {"max_length": 64}, "data": {"system_prompt": "You classify tickets."}})
    out = F.run(cfg, layout, tokenizer=tok)
    train = [json.loads(x) for x in out.train.read_text().splitlines()]
    test = [json.loads(x) for x in out.test.read_text().splitlines()]
    assert [r["source_line"] for r in test] == [1, 5, 9, 13]
    assert all(r["messages"][0] == {"role": "system", "content": "You classify tickets."} for r in train + test)
    assert all(len(r["input_ids"]) == len(r["labels"]) <= 64 for r in train + test)
    rep = json.loads(out.report.read_text())
    assert (rep["rows"], rep["train_rows"], rep["test_rows"], rep["truncated"]) == (13, 9, 4, 1)
    assert rep["round_trip_checked"] == 13 and rep["tokens"]["max"] == 64
    lines = out.lengths.read_text().splitlines()
    assert lines[0] == "tokens,rows" and sum(int(x.split(",")[1]) for x in lines[1:]) == 13


def test_a_train_row_whose_prompt_fills_max_length_is_skipped_and_named(tok: Any, tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    _validated(layout, [_conv(0), _conv(1), long_prompt], splits=["test", "train", "train"])
    out = F.run(config.parse({"format": {"max_length": 64}}), layout, tokenizer=tok)
    rep = json.loads(out.report.read_text())
    assert rep["train_rows"] == 1 and rep["train_rows_skipped_without_labels"] == 1
    assert rep["skipped_without_labels"] == ["data/raw/x.jsonl:3"]


def test_validate_counts_tokens_like_transformers(builtin_model: Path, tok: Any) -> None:
    count, name, specials = v._default_counter(config.parse({"model": {"base": str(builtin_model)}}))
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(specials)
    texts = ["Classify the ticket: my Orbit 2 watch won't pair!", "çà et là — 日本語 <|im_end|> tabs\tand\nlines"]
    assert list(count(texts)) == [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert name == str(builtin_model)


# Text a user could write: any assigned character but controls (validate rejects those). Unassigned
# and private-use code points are left out: this tokenizer has no bytes for some and emits <unk>.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co")), min_size=1, max_size=40).filter(str.strip)
CONV = st.builds(
    lambda system, turns: ([{"role": "system", "content": system}] if system else [])
    + [{"role": r, "content": c} for u, a in turns for r, c in (("user", u), ("assistant", a))],
    st.none() | TEXT, st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=CONV, name=st.sampled_from(TEMPLATES))
def test_property_format_then_parse_round_trips(tok: Any, conv: list[dict[str, str]], name: str) -> None:
    t = tok if name == "auto" else _with_template(tok, name)
    (enc,) = F.encode_batch(t, [conv], 4096)
    assert F.RoundTrip(t).parse(enc["text"], tuple(m["role"] for m in conv)) == [m["content"] for m in conv]
    assert t.decode(enc["input_ids"]) == enc["text"]  # byte-level BPE: ids decode to the text exactly
    trained = t.decode([x for x in enc["labels"] if x != F.IGNORE])
    for m in conv:
        if m["role"] == "assistant":
            assert m["content"] in trained
