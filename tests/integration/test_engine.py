"""The batching engine's isolation, driven directly (no HTTP) on a tiny random Llama in float32.

- Extreme but accepted sampling values (the issue's ``top_p: 1e-300``, a seed of 2**70, a
  temperature of 1e-300) do not fail their own row, nor any row batched with it.
- A row that fails (here: its grammar raises) fails alone; its batch-mates' tokens are unchanged.
- Property (hypothesis): random valid sampling parameters, random arrivals and cancellations.
  Every request gets exactly one final event, a deterministic row (greedy, or seeded) gets the
  same tokens alone and batched, and nothing is left running.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from phiops import models
from phiops.serve.engine import Engine, Event, Request
from phiops.serve.sampling import SamplingParams

pytestmark = pytest.mark.integration
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TINY_ARCH = {"model_type": "llama", "vocab_size": 49152, "num_hidden_layers": 2, "hidden_size": 64,
             "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 2048}
PROMPTS = ["Hello there", "My router drops wifi every hour", "Hi", "Ticket 7: the laptop will not boot at all"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.tiny_random(TINY_ARCH, tmp_path_factory.mktemp("tiny") / "llama",
                              tokenizer_from=models.ensure_builtin())
    tok = AutoTokenizer.from_pretrained(Path(path))
    model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=torch.float32).eval()
    # EOS = an id that never comes, so each request runs to its length (comparable token counts).
    eng = Engine(model, tok, [49151], "cpu", max_batch_size=4, max_wait_ms=2)
    eng.tok = tok
    yield eng
    eng.close()


class Run:
    """One request's events, collected on the engine thread."""

    def __init__(self, engine: Engine, prompt: str, n: int, sampling: SamplingParams, grammar: Any = None,
                 cancel_after: int | None = None) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.cancel_after = cancel_after
        self.request = Request(prompt=engine.tok(prompt)["input_ids"], max_new_tokens=n, emit=self.emit,
                               sampling=sampling, grammar=grammar)

    def emit(self, ev: Event) -> None:
        self.events.append(ev)
        if self.cancel_after is not None and ev.completion_tokens >= self.cancel_after:
            self.request.cancel()
        if ev.finish_reason or ev.error:
            self.done.set()

    @property
    def final(self) -> Event:
        ends = [e for e in self.events if e.finish_reason or e.error]
        assert len(ends) == 1, f"{len(ends)} final events"
        return ends[0]


def _idle(engine: Engine) -> None:
    deadline = time.monotonic() + 10
    while engine.rows or engine._queue.qsize() or engine.stats.active:
        assert time.monotonic() < deadline, "rows left running"
        time.sleep(0.01)
    assert engine.alive()


def _alone(engine: Engine, prompt: str, n: int, sampling: SamplingParams) -> list[int]:
    run = Run(engine, prompt, n, sampling)
    engine.submit(run.request)
    assert run.done.wait(30)
    assert run.final.error is None, run.final.error
    _idle(engine)
    return run.request.tokens


POISON = [SamplingParams(temperature=1.0, top_p=1e-300), SamplingParams(temperature=1.0, seed=2**70),
          SamplingParams(temperature=1e-300), SamplingParams(temperature=1e-4, top_p=1e-30, seed=-1),
          SamplingParams(temperature=2.0, top_p=5e-324, seed=2**64 - 1, presence_penalty=2.0, frequency_penalty=-2.0,
                         logprobs=20)]


@pytest.mark.parametrize("poison", POISON, ids=lambda p: repr(p))
def test_extreme_sampling_values_hurt_no_row(engine: Engine, poison: SamplingParams) -> None:
    normal = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    want = _alone(engine, PROMPTS[1], 6, normal)
    runs = [Run(engine, PROMPTS[1], 6, normal), Run(engine, PROMPTS[0], 6, poison)]
    for r in runs:
        engine.submit(r.request)
    for r in runs:
        assert r.done.wait(30), "a request never ended"
        assert r.final.error is None and r.final.finish_reason == "length"
    assert runs[0].request.tokens == want
    _idle(engine)


class FailingGrammar:
    """Allows every token, then raises inside the sampler at the row's 3rd token."""

    def __init__(self) -> None:
        self.calls, self.finished = 0, False

    def allowed(self) -> Any:
        import torch

        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return torch.ones(49152, dtype=torch.bool)

    def accept(self, token: int) -> bool:
        return True


def test_a_failing_row_fails_alone(engine: Engine) -> None:
    normal = SamplingParams(temperature=0.0)
    want = _alone(engine, PROMPTS[3], 8, normal)
    runs = [Run(engine, PROMPTS[3], 8, normal), Run(engine, PROMPTS[0], 8, normal, grammar=FailingGrammar())]
    for r in runs:
        engine.submit(r.request)
    for r in runs:
        assert r.done.wait(30)
    assert runs[1].final.error == "sampling failed: RuntimeError"  # the type only, never the text
    assert runs[0].final.error is None and runs[0].request.tokens == want
    _idle(engine)
    assert _alone(engine, PROMPTS[0], 3, normal)  # and the engine serves on


sampling = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 2.0), st.sampled_from([1e-300, 1e-6, 2.0])),
    top_p=st.one_of(st.floats(5e-324, 1.0), st.sampled_from([1e-300, 1e-8, 1.0])),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.just(2**70)),
    presence_penalty=st.floats(-2.0, 2.0),
    frequency_penalty=st.floats(-2.0, 2.0),
    logprobs=st.one_of(st.none(), st.integers(0, 20)),
)
spec = st.tuples(sampling, st.sampled_from(PROMPTS), st.integers(1, 6),  # max tokens
                 st.floats(0.0, 0.02),  # arrival delay (s)
                 st.one_of(st.none(), st.integers(0, 5)))  # cancel after this many tokens


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(spec, min_size=1, max_size=6))
def test_random_concurrent_requests_are_isolated(engine: Engine, specs: list[Any]) -> None:
    runs = [Run(engine, prompt, n, p, cancel_after=cancel) for p, prompt, n, _, cancel in specs]
    timers = [threading.Timer(delay, engine.submit, (r.request,)) for r, (_, _, _, delay, _) in zip(runs, specs)]
    for t in timers:
        t.start()
    for t in timers:
        t.join()
    for r in runs:
        assert r.done.wait(60), "a request never ended"
        final = r.final  # exactly one final event
        assert final.error is None, final.error
        assert final.finish_reason in ("length", "stop", "cancelled")
    _idle(engine)
    for r, (p, prompt, n, _, cancel) in zip(runs, specs):
        c = p.clamped()
        if r.final.finish_reason != "cancelled" and (c.greedy or c.seed is not None):
            assert r.request.tokens == _alone(engine, prompt, n, p), "batched tokens differ from alone"


# ---- the engine against transformers' own greedy decoding --------------------------------------

# initializer_range 0.2: the default 0.02 gives a random model that repeats one token whatever the
# prompt, and a comparison of such outputs could not tell two decoders apart.
VARIED_ARCH = {**TINY_ARCH, "initializer_range": 0.2}
MORE_PROMPTS = [*PROMPTS, "Printer on the third floor jams on every duplex job since Monday", "VPN?"]


def _greedy_alone(model: Any, prompt: list[int], n: int, eos: int | None) -> list[int]:
    """transformers' ``generate``: one prompt, no padding, greedy; the EOS itself left out."""
    import torch

    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos if eos is not None else 49151, pad_token_id=49151,
                         temperature=None, top_p=None, top_k=None)
    new = out[0, len(prompt):].tolist()
    return new[:-1] if eos is not None and new and new[-1] == eos else new


def test_concurrent_greedy_rows_match_generate_token_for_token(engine: Engine) -> None:
    # What the evaluate stage relies on: its answers come from this engine, and model.generate is
    # the reference. Six prompts of different lengths and budgets through three batch rows, so
    # rows join mid-batch (when one leaves) and leave at different steps, by length or by EOS.
    model, tok = models.random_model(VARIED_ARCH, seed=0), engine.tok
    prompts = [tok(p)["input_ids"] for p in MORE_PROMPTS]
    budgets = [4, 10, 7, 10, 2, 9]
    free = [_greedy_alone(model, p, n, None) for p, n in zip(prompts, budgets)]
    assert len({tuple(t) for t in free}) > 1, "the model gives every prompt the same answer"
    # EOS: a token some rows emit mid-answer, others later or never, so the rows stop at different steps.
    firsts = lambda t: {row.index(t) if t in row else len(row) for row in free}  # noqa: E731
    eos = max({t for row in free for t in row[1:]}, key=lambda t: len(firsts(t)))
    want = [_greedy_alone(model, p, n, eos) for p, n in zip(prompts, budgets)]
    assert len({len(w) for w in want}) >= 4 and any(len(w) < n for w, n in zip(want, budgets))

    rows: list[int] = []
    eng = Engine(model, tok, [eos], "cpu", max_batch_size=3, max_wait_ms=20,
                 on_step=lambda phase, n, new: rows.append(n))
    eng.tok = tok
    try:
        runs = [Run(eng, p, n, SamplingParams()) for p, n in zip(MORE_PROMPTS, budgets)]
        for run in runs:
            eng.submit(run.request)
        for run in runs:
            assert run.done.wait(60), "a request never ended"
        assert [r.request.tokens for r in runs] == want
        assert [r.final.finish_reason for r in runs] == ["stop" if len(w) < n else "length" for w, n in zip(want, budgets)]
        assert max(rows) == 3 and eng.stats.prefill_passes >= 2  # a full batch, and later arrivals joined it
    finally:
        assert eng.close()


def test_cpu_passes_keep_pytorchs_attention_switches() -> None:
    # On CUDA the engine holds SDPA off cuDNN around its forward passes (issue 15,
    # tests/integration/test_engine_gpu.py); on CPU it must touch no switch, so CPU runs stay as they were.
    import torch

    def switches() -> tuple[bool, ...]:
        b = torch.backends.cuda
        return (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled())

    model, seen = models.random_model(TINY_ARCH, seed=0), []

    class Watched:
        def __getattr__(self, name: str) -> Any:
            return getattr(model, name)

        def __call__(self, **kw: Any) -> Any:
            seen.append(switches())
            return model(**kw)

    tok = models.word_tokenizer(TINY_ARCH["vocab_size"])
    eng = Engine(Watched(), tok, [49151], "cpu", max_batch_size=2, max_wait_ms=20)
    eng.tok = tok
    try:
        runs = [Run(eng, "w5 w6 w7", 3, SamplingParams()), Run(eng, "w8 w9", 3, SamplingParams())]
        for run in runs:
            eng.submit(run.request)
        for run in runs:
            assert run.done.wait(30) and run.final.error is None
    finally:
        assert eng.close()
    assert len(seen) >= 3 and set(seen) == {switches()}


def test_the_incremental_detokenizer_gives_the_whole_decode_at_every_step(engine: Engine) -> None:
    """Fed one token at a time (the embedded model's byte-level BPE), the engine's text equals the
    whole sequence decoded, at every step; characters of several bytes split over tokens come out
    whole, once complete."""
    from phiops.serve.engine import detokenize

    tok = engine.tok
    texts = ["Héllo wörld: 你好，世界 🎉🎉 done\n\n  spaced   out\tTAB", "Ticket 7: the laptop will not boot at all",
             "ＡＢＣ 😀😁 ǅ —– “quoted” naïve café", " leading space, trailing space "]
    split = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        r = Request(prompt=[1], max_new_tokens=len(ids), emit=print)
        for i, t in enumerate(ids):
            r.tokens.append(t)
            got = detokenize(tok, r, final=i == len(ids) - 1)
            whole = tok.decode(r.tokens, skip_special_tokens=True)
            if whole.endswith("\ufffd") and i < len(ids) - 1:  # inside a character: it waits
                assert whole.startswith(got) and "\ufffd" not in got
                split += 1
            else:
                assert got == whole
        assert r.text == text == tok.decode(ids)
    assert split > 0  # the texts do split characters over tokens
