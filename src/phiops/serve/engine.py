"""Continuous batching for one causal LM: concurrent requests share every forward pass.

One background thread owns the model. Each iteration it

1. admits waiting requests (up to ``max_batch_size`` rows in all): their prompts are prefilled
   together, left-padded, into a fresh KV cache that is then merged into the running batch's
   (both left-padded to the longer length, concatenated on the batch dimension); while rows
   decode, a prompt longer than ``prefill_chunk`` tokens is prefilled alone, in passes of at most
   that many, one per iteration (chunked prefill), and no other request is admitted until the
   admitted ones have joined;
2. runs one decode step for every running row: input ``[B, 1]``, a 2-D padding mask and
   per-row position ids over the shared ``DynamicCache`` (whose layers append in place,
   ``phiops.serve.batched``);
3. samples each row with its own settings (``phiops.serve.sampling``: greedy, or temperature /
   top-p / penalties from the row's own ``torch.Generator``, so a seeded request draws the same
   numbers whoever shares its batch), checks EOS / stop strings / length / its response-format
   grammar, and drops finished, failed or cancelled rows from the cache.

Isolation: a row whose sampling fails (no finite logit, a grammar with no way on) fails alone,
with an error event, and the batch continues; a prefill that fails fails the requests it was
prefilling, not the running batch. Only a failed decode pass (shared by every row) fails the
running rows, and the engine keeps serving. Every request submitted gets exactly one final event
(finished, failed, cancelled, or refused for waiting past its queue deadline).

On CUDA, for the llama-family models, the service gives the engine a ``paged`` decoder
(``phiops.serve.paged.PagedDecoder``): steps 1 and 2 then write each admitted row's prefill into
pages of a preallocated KV pool (nothing concatenated) and run the decode step as a CUDA graph per
batch-size bucket; admission counts free pages, and a running row that needs a page when none is
free preempts the newest rows, which resume later by recomputation (``Engine`` args). Text is
detokenized incrementally (``detokenize``) and the sampled tokens reach the host in one copy, while
the GPU already runs the next step (``_decode_paged``).

A request never waits for another to finish (iteration-level scheduling, as in Orca/vLLM),
only for the next step. When the engine is idle the first arrival waits at most
``max_wait_ms`` for company, so a burst prefills as one batch.

A request alone (the latency case) may instead decode through ``solo``, a
``phiops.serve.decode.GraphDecoder``: a static cache and one CUDA graph replay per token, several
times faster than an eager step at batch 1. When another request arrives, the solo row's cache
is copied out into the shared dynamic cache and both continue batched.

Why not transformers' own continuous batching (``init_continuous_batching``): on this 2-core CPU
it measured 108 output tokens/s for 32 requests of the embedded model against 190 tokens/s for
a plain padded ``generate`` of the same batch (its paged attention costs more Python per step
than it saves on a small model), and it has no per-request seed. Why not BentoML's adaptive
batching: it batches whole calls (a batch finishes with its longest request, new arrivals wait
for it) and needs a second service process for the mounted OpenAI routes to reach it; nor does
it stream tokens.

This module imports only torch and transformers (lazily, via the model passed in); it ships in
the bento inside the phiops wheel.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from phiops.serve.sampling import RowError, SamplingParams, TokenLogprob, logprobs_of, pick

log = logging.getLogger("bentoml.phiops.engine")
TRIM_EVERY_S = 5.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where there is one (Linux with glibc); None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


@dataclass
class Event:
    """What the engine reports for one request: new text, and at the end why it stopped."""

    text: str = ""
    # "stop" | "length" once finished, "cancelled" once cancelled; None while running
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    code: str | None = None  # with an error: "queue_timeout" (never started) or None (failed)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens new in this event
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first event only, when asked


@dataclass(eq=False)  # identity: two equal-looking requests are two rows
class Request:
    """One generation: prompt ids in, events out through ``emit`` (called on the engine thread).

    ``grammar``, when set, constrains the tokens: an object with ``allowed() -> bool [vocab]``,
    ``accept(token) -> bool`` and ``finished`` (``phiops.serve.grammar``).
    """

    prompt: list[int]
    max_new_tokens: int
    emit: Callable[[Event], None]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stops: list[str] = field(default_factory=list)
    prompt_logprobs: int | None = None  # echo: the prompt's own log-probabilities, top k
    grammar: Any = None
    queue_deadline: float | None = None  # perf_counter time; not admitted by then: refused
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-side state
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    generator: Any = None
    enqueued: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    error: str | None = None  # set when this row failed; it leaves at the next _advance
    logprobs: list[TokenLogprob] = field(default_factory=list)
    lp_sent: int = 0
    first_sent: bool = False
    prompt_lp: list[TokenLogprob | None] | None = None
    preempted: int = 0  # times its row was taken out to free KV pages (it resumes by recomputing)
    text: str = ""  # the tokens' text so far (``detokenize``)
    prefix_at: int = 0  # tokens[prefix_at:read_at]: the window decoded last, whose text is in `text`
    read_at: int = 0

    def ids(self) -> list[int]:
        """What a prefill of this request reads: its prompt and, once preempted, the tokens it already has."""
        return self.prompt + self.tokens

    def echo(self) -> bool:
        """Its prompt's log-probabilities are still to be computed (a prefill of its own, every position)."""
        return self.prompt_logprobs is not None and self.prompt_lp is None

    def __post_init__(self) -> None:
        self.sampling = self.sampling.clamped()

    def cancel(self) -> None:
        """Stop generating for this request (client gone, timeout); its row leaves the batch."""
        self.cancelled.set()


@dataclass
class Stats:
    """Counters read by the service's Prometheus metrics and by tests (plain ints: one writer)."""

    forward_passes: int = 0
    prefill_passes: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    failed: int = 0  # rows failed alone (sampling) or with their prefill/decode pass
    active: int = 0
    waiting: int = 0
    kv_tokens: int = 0  # KV-cache positions held (rows x cached length, padding included)
    row_seconds: float = 0.0  # moving average of admission-to-end time of a row (admission estimates)
    preempted: int = 0  # rows taken out of a full KV pool, to resume later (paged engine)
    kv_pages_free: int = 0  # paged engine: pages of its KV pool not held by a row


@dataclass(eq=False)
class _Chunked:
    """A group's prefill in flight (``Engine._prefill_work``): its left-padded inputs, the cache so
    far, the columns done, and (for a request echoing its prompt) every position's logits so far."""

    group: list[Request]
    lengths: list[int]  # each row's prompt tokens (right-aligned in the width)
    ids: Any
    mask: Any
    positions: Any
    cache: Any
    done: int = 0
    logits: list[Any] = field(default_factory=list)


class Engine:
    """The batching loop around one model; thread-safe ``submit``.

    Args:
        model: a loaded causal LM (eval mode) on ``device``.
        tokenizer: its tokenizer (decodes the streamed text).
        eos_ids: every token id that ends a turn.
        device: ``"cuda"`` or ``"cpu"``.
        max_batch_size: most rows decoded together.
        max_wait_ms: how long the first request into an idle engine waits for others to join
            its prefill (the latency a request may pay for batching).
        on_step: called after each forward pass with (phase, batch rows, new tokens), for metrics.
        solo: a ``phiops.serve.decode.GraphDecoder`` for a request that is alone (None: always batched).
        cudnn_sdpa: let PyTorch's SDPA pick its cuDNN backend in the batched forward passes on
            CUDA (off by default, see ``_attention``; on only to measure the old behaviour).
        paged: a ``phiops.serve.paged.PagedDecoder``: the running rows' KV cache is its page pool
            and their decode step its graphs (None: the dynamic cache and the model's own forward).
            Requests are then admitted by free pages (a full pool queues them; past their queue
            deadline they are refused, never out of memory), and when a running row needs a page
            that is not free, the newest rows are preempted: back to the front of the queue, their
            tokens kept, resumed by a prefill of prompt and tokens (the same tokens, seeded or greedy).
        prefill_chunk: while rows decode, an admitted prompt longer than this many tokens is
            prefilled alone, in passes of at most this many, one pass per step of the running rows;
            the shorter prompts admitted with it go together in one pass (0: every prefill whole).
        overlap: queue each paged or solo step before recording the previous one's tokens
            (``_decode_paged``, ``_decode_solo``); False records each step before the next (the
            benches' baseline).
    """

    def __init__(self, model: Any, tokenizer: Any, eos_ids: list[int], device: str, *,
                 max_batch_size: int = 32, max_wait_ms: float = 10.0,
                 on_step: Callable[[str, int, int], None] | None = None, solo: Any = None,
                 cudnn_sdpa: bool = False, paged: Any = None, prefill_chunk: int = 0, overlap: bool = True) -> None:
        import torch

        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.eos = set(eos_ids)
        self.pad_id = eos_ids[0]
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.on_step = on_step
        self.solo, self._solo_on = solo, False  # _solo_on: the one running row lives in solo's cache
        self.paged = paged
        if paged is not None and paged.max_rows < max_batch_size:
            raise ValueError(f"the paged decoder takes {paged.max_rows} rows, the engine batches {max_batch_size}")
        # Free pages kept back at admission, for running rows that cross into a new page (vLLM's
        # watermark, 1 % of the pool): fewer preemptions when the pool runs full. None for a pool
        # that holds a full batch of the longest rows: it cannot run short.
        full = paged is not None and paged.pages >= max_batch_size * paged.pages_for(paged.max_len)
        self._watermark = 0 if paged is None or full else max(1, paged.pages // 100)
        self._sdpa: list[Any] | None = None  # SDPA backends of the batched passes (None: PyTorch's choice)
        if str(device).startswith("cuda") and not cudnn_sdpa:
            from torch.nn.attention import SDPBackend

            # PyTorch (2.11, Hopper) ranks cuDNN attention first, and cuDNN builds an execution plan
            # per input shape: the batched cache grows a position a step, so every layer of every step
            # planned anew (54 ms of a 70 ms step on the host, for 0.95 ms of GPU work). One H200 run,
            # Phi-3-mini bf16 at 32 concurrent: 493 tok/s with cuDNN allowed, 1,415 without (2.9x; a
            # 33 ms step); W4A16 290 -> 615 (bench/README.md). Without it, a pass with no mask runs
            # flash, one with a padding mask (flash refuses masks) memory-efficient attention, MATH the rest.
            self._sdpa = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        self.prefill_chunk = max(0, int(prefill_chunk))
        self._groups: list[list[Request]] = []  # admitted, prefill not started (one pass each)
        self._chunked: _Chunked | None = None  # the prefill in flight
        self.stats = Stats()
        self._host_ids: tuple[Any, list[int] | None] = (None, None)  # _sample's tokens, and as read back
        # Paged engine and solo decoder: the last step's sampled tokens on their way to the host (into
        # ``_lag_host``, ``_lag_event`` marks the copy), not yet recorded (``_decode_paged``,
        # ``_decode_solo``): (rows then, the tokens on the device).
        self._lag: tuple[list[Request], Any] | None = None
        # (On CPU the same path runs, synchronously: the tests hold it to the engine's other paths.)
        cuda = str(device).startswith("cuda")
        lag_rows = 0  # the rows a lagged step can hold: the pool's, or the solo decoder's one
        if overlap:
            lag_rows = paged.max_rows if paged is not None else int(solo is not None)
        self._lag_host = torch.empty((2, lag_rows), dtype=torch.long, pin_memory=cuda) if lag_rows else None
        self._lag_event = torch.cuda.Event() if lag_rows and cuda else None
        self._queue: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._torch = torch
        # running batch: rows[i] is batch row i of cache / mask / positions / last token
        self.rows: list[Request] = []
        self.cache: Any = None
        self.mask: Any = None  # [B, T] 1 = real token
        self.positions: Any = None  # [B] position id of the next token
        self.last: Any = None  # [B] last sampled token
        self._trimmed, self._idle_trimmed = time.monotonic(), False
        self._thread = threading.Thread(target=self._loop, name="phiops-engine", daemon=True)
        self._thread.start()

    # ---- public -----------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        if self._stop.is_set() or not self._thread.is_alive():
            raise RuntimeError("the generation engine is not running")
        self._queue.put(request)
        self.stats.waiting = self._queue.qsize()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def close(self) -> bool:
        """Stop the loop (whatever still runs or waits gets an error event); True once its thread has ended."""
        self._stop.set()
        self._queue.put(None)  # type: ignore[arg-type]  # wakes the loop
        self._thread.join(timeout=30)
        return not self._thread.is_alive()

    # ---- loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch = self._torch
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    new = self._admit()
                    self._idle_trimmed = False
                    if self._stop.is_set():
                        break
                    if new:
                        self._prefill(new)
                    self._prefill_work()
                    if self.rows:
                        self._decode()
                    self._maybe_trim()
                except Exception as exc:  # a decode pass (OOM, kernel error): its rows fail, serving goes on
                    log.exception("generation step failed; failing %d running request(s)", len(self.rows))
                    self._fail(self.rows, f"generation failed: {type(exc).__name__}")
                    self._reset()
        self._fail(self.rows + self._prefilling(), "the engine stopped")
        self._chunked, self._groups = None, []
        self._reset()
        while True:  # whatever still waits is told, never left hanging
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                break
            if r is not None:
                self._fail([r], "the engine stopped")

    def _fail(self, rows: list[Request], message: str, code: str | None = None) -> None:
        for r in rows:
            self.stats.failed += 1
            r.emit(Event(error=message, code=code, completion_tokens=len(r.tokens)))

    def queue_wait_estimate(self) -> float:
        """Seconds a request submitted now would wait for a batch row (0 when one is free).

        Rows free at about ``max_batch_size / row_seconds`` a second (the moving average of how
        long a row stays); with no measurement yet it is 0, and the queue deadline bounds the wait.
        """
        ahead = len(self.rows) + self._queue.qsize() + 1 - self.max_batch_size
        if ahead <= 0:
            return 0.0
        return ahead * self.stats.row_seconds / self.max_batch_size

    def _maybe_trim(self) -> None:
        # The KV cache is re-allocated at every step with a new shape; glibc keeps the freed
        # blocks, and the server's RSS grew 11 % per 200 requests of the load bench (a stable
        # ~0.85 GB with trimming). Returning them costs ~1 ms: when idle, or every TRIM_EVERY_S.
        now = time.monotonic()
        if _TRIM is None or (self.rows and now - self._trimmed < TRIM_EVERY_S) or (not self.rows and self._idle_trimmed):
            return
        _TRIM(0)
        self._trimmed, self._idle_trimmed = now, not self.rows

    def _expire_waiting(self) -> None:
        """Refuse now the waiting requests past their queue deadline (or cancelled): not when a row frees."""
        now, gone = time.perf_counter(), []
        with self._queue.mutex:
            waiting = self._queue.queue
            for r in list(waiting):
                if r is not None and (r.cancelled.is_set() or (r.queue_deadline is not None and now > r.queue_deadline)):
                    waiting.remove(r)
                    gone.append(r)
        for r in gone:
            if r.cancelled.is_set():
                r.emit(Event(finish_reason="cancelled"))
            else:
                self._fail([r], "the request waited past this service's queue-wait budget", code="queue_timeout")

    def _admit(self) -> list[Request]:
        room = self.max_batch_size - len(self.rows) - len(self._prefilling())
        new: list[Request] = []
        if room <= 0 or self._chunked is not None or self._groups:  # (admitted again once prefilled)
            self._expire_waiting()
            self.stats.waiting = self._queue.qsize()
            return new
        if not self.rows:  # idle: block for the first request, then wait briefly for company
            first = self._queue.get()
            if first is None:
                return new
            new.append(first)
            deadline = time.perf_counter() + self.max_wait
            while len(new) < room:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if nxt is None:
                    return new
                new.append(nxt)
        while len(new) < room:  # whatever else is already waiting joins at this step
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                break
            new.append(nxt)
        now, admitted = time.perf_counter(), []
        if self.paged is not None:
            new = self._fitting(new)
        self.stats.waiting = self._queue.qsize()
        for r in new:
            if r.cancelled.is_set():
                r.emit(Event(finish_reason="cancelled", completion_tokens=len(r.tokens)))
            elif not r.admitted and r.queue_deadline is not None and now > r.queue_deadline:
                self._fail([r], "the request waited past this service's queue-wait budget", code="queue_timeout")
            else:
                r.admitted = r.admitted or now  # a resumed row keeps its first admission
                admitted.append(r)
        return admitted

    def _fitting(self, new: list[Request]) -> list[Request]:
        """Of ``new`` (in order), those whose prefill the free KV pages hold; the rest go back to the
        front of the queue, in order. A request that no row could ever hold fails now."""
        pool = self.paged
        free = pool.free_pages - self._watermark
        if self._solo_on:  # the solo row moves into the pool at the next prefill
            free -= pool.pages_for(self.solo.length)
        out: list[Request] = []
        for i, r in enumerate(new):
            if len(r.prompt) + r.max_new_tokens > pool.max_len:
                self._fail([r], f"prompt ({len(r.prompt)} tokens) and max_tokens ({r.max_new_tokens}) exceed the "
                                f"{pool.max_len} tokens a sequence may hold here")
                continue
            need = pool.pages_for(len(r.ids()))
            if need > free and (out or self.rows or self._solo_on):  # alone, it fits the empty pool
                # The rest wait for pages; those past their queue deadline (or cancelled) are
                # answered now (by _admit), not when pages free up.
                now = time.perf_counter()
                back = [x for x in new[i:] if not (x.cancelled.is_set() or (
                    not x.admitted and x.queue_deadline is not None and now > x.queue_deadline))]
                out.extend(x for x in new[i:] if all(x is not y for y in back))
                with self._queue.mutex:
                    self._queue.queue.extendleft(reversed(back))
                break
            free -= need
            out.append(r)
        return out

    def _seed(self, r: Request) -> None:
        if not r.sampling.greedy and r.generator is None:  # a resumed row keeps its generator's state
            r.generator = self._torch.Generator(device=self.device)
            # clamped: the seed is already within the generator's 64 bits
            r.generator.manual_seed(r.sampling.seed if r.sampling.seed is not None
                                    else int.from_bytes(_urandom(8), "little") >> 1)

    def _counted(self, phase: str, rows: int, prompt_tokens: int = 0) -> None:
        self.stats.forward_passes += 1
        if phase == "prefill":
            self.stats.prefill_passes += 1
            self.stats.prompt_tokens += prompt_tokens
        if self.on_step:
            self.on_step(phase, rows, rows)

    def _attention(self) -> Any:
        """The context of the engine's own forward passes: on CUDA, SDPA without cuDNN (see __init__).

        PyTorch keeps these switches process-wide, so they are held only around the engine's
        forward calls, on the engine's thread (the one running the model); the solo decoder and
        CPU runs are left as PyTorch chooses.
        """
        if self._sdpa is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self._sdpa)

    def _prefill(self, new: list[Request]) -> None:
        """Queue the admitted requests' prefill (``_prefill_work`` runs it), in groups of one pass each."""
        if self._solo_on:  # company has come: the solo row joins the shared cache first
            if self._lag is not None:  # its last token first (it may have ended there)
                self._drain()
            if self._solo_on:
                self._leave_solo()
        # A request asking for its prompt's log-probabilities needs logits at every position:
        # prefilled on its own, so the [T, vocab] logits are one row's, not the group's. While rows
        # decode, a prompt longer than ``prefill_chunk`` is prefilled on its own too, in chunks
        # (``_prefill_pass``), after the shorter prompts, which go in one pass.
        chunk = self.prefill_chunk if self.rows else 0
        long = [chunk and len(r.ids()) > chunk for r in new]
        plain = [r for r, is_long in zip(new, long) if not (r.echo() or is_long)]
        self._groups.extend([[r] for r in new if r.echo()] + ([plain] if plain else [])
                            + [[r] for r, is_long in zip(new, long) if is_long and not r.echo()])

    def _prefilling(self) -> list[Request]:
        """The admitted requests whose prefill has not finished (in flight first, then queued)."""
        return [r for g in ([self._chunked.group] if self._chunked else []) + self._groups for r in g]

    def _prefill_work(self) -> None:
        """Run the queued prefills: all of them while no row decodes, else one pass: a group of
        short prompts whole, or at most ``prefill_chunk`` tokens of a long prompt (chunked prefill,
        as Sarathi-Serve and vLLM schedule it), which then delays the running rows' next token by
        one chunk's pass, not by its whole prefill. A failure fails the requests of that group alone.

        Short prompts are not cut into columns: on CPU every pass pays the model's whole per-forward
        cost, and cutting the groups of a load of short prompts into passes of 512 tokens cost it
        7 % of its throughput (bench/results/serve_cpu_load_prefill_ab.json). Unlike vLLM's token
        budget, the short prompts of one admission are not capped in total: their pass is one
        stall, as a burst's prefill at an idle engine is."""
        budget = self.prefill_chunk if self.rows else 0
        while self._chunked is not None or self._groups:
            if self._chunked is None:
                group = self._groups.pop(0)
                try:
                    self._chunked = self._prefill_start(group)
                except Exception as exc:
                    self._prefill_failed(group, exc)
                if self._chunked is None:  # failed, or done at once (the solo decoder)
                    continue
            state = self._chunked
            try:
                done = self._prefill_pass(state, budget)
            except Exception as exc:
                self._chunked = None
                self._prefill_failed(state.group, exc)
                continue
            if done:
                self._chunked = None
            if budget:
                return

    def _prefill_failed(self, group: list[Request], exc: Exception) -> None:
        log.error("prefill failed; failing its %d request(s)", len(group), exc_info=exc)
        self._fail([r for r in group if all(r is not x for x in self.rows)], f"generation failed: {type(exc).__name__}")

    def _abort_prefill(self) -> None:
        """Put the unfinished prefills back at the front of the queue (their KV pages are wanted by
        running rows); they start over when admitted again, as a preempted row resumes."""
        back = self._prefilling()
        self._chunked, self._groups = None, []
        for r in back:
            r.preempted += 1
        self.stats.preempted += len(back)
        log.info("KV pool full: %d request(s) in prefill put back in the queue", len(back))
        with self._queue.mutex:
            self._queue.queue.extendleft(reversed(back))

    def _prefill_start(self, new: list[Request]) -> _Chunked | None:
        """The group's padded inputs and empty cache; None when the solo decoder prefilled it at once."""
        torch = self._torch
        from phiops.serve.batched import new_cache

        r = new[0]
        if (self.solo is not None and not self.rows and len(new) == 1 and not r.echo()
                and self.solo.fits(len(r.prompt) + r.max_new_tokens)):
            self._seed(r)
            logits = self.solo.prefill(r.ids())
            self._counted("prefill", 1, len(r.ids()))
            last = self._sample(logits, new)
            if self._advance(new, last):
                self.rows, self.last, self._solo_on = [r], last, True
            self._track()
            return None
        prompts = [r.ids() for r in new]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, (r, p) in enumerate(zip(new, prompts)):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
            self._seed(r)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return _Chunked(new, [len(p) for p in prompts], ids, mask, positions, new_cache())  # appends in place

    def _prefill_pass(self, st: _Chunked, budget: int) -> bool:
        """One forward pass over the group's next columns: a prompt alone, at most ``budget`` of its
        tokens (0: the rest); a group of several prompts, all (none is longer than the budget:
        ``_prefill``). True once the group is prefilled and its rows have joined the batch."""
        torch = self._torch
        new, width = st.group, st.ids.shape[1]
        c0 = st.done
        c1 = width if not budget or len(new) > 1 else min(width, c0 + budget)
        every = new[0].echo()  # a group of one (see _prefill)
        with self._attention():
            out = self.model(input_ids=st.ids[:, c0:c1], attention_mask=st.mask[:, :c1],
                             position_ids=st.positions[:, c0:c1], past_key_values=st.cache, use_cache=True,
                             logits_to_keep=0 if every else 1)
        self._counted("prefill", len(new), int(st.mask[:, c0:c1].sum()))
        st.cache, st.done = out.past_key_values, c1
        if every:
            st.logits.append(out.logits[0])
        if c1 < width:
            return False
        if every:
            new[0].prompt_lp = self._prompt_logprobs(torch.cat(st.logits), new[0])
        last = self._sample(out.logits[:, -1, :], new)
        keep = self._advance(new, last)  # a row may finish at its first token
        if not keep:
            return True
        cache, mask = st.cache, st.mask
        if self.paged is not None:
            self.paged.add([(layer.keys, layer.values) for layer in cache.layers], [st.lengths[i] for i in keep],
                           select=keep)
            self.rows.extend(new[i] for i in keep)
            kept = last[torch.tensor(keep, device=last.device)]
            self.last = kept if self.last is None else torch.cat([self.last, kept])
            self._track()
            return True
        positions = mask.sum(-1)
        if len(keep) < len(new):
            idx = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(idx)
            mask, positions, last = mask[idx], positions[idx], last[idx]
        self._merge([new[i] for i in keep], cache, mask, positions, last)
        self._track()
        return True

    def _prompt_logprobs(self, logits: Any, r: Request) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first)."""
        torch = self._torch
        lp = logits[:-1].float().nan_to_num(nan=float("-inf")).log_softmax(-1)
        target = torch.tensor(r.prompt[1:], device=lp.device)
        chosen = lp.gather(-1, target[:, None])[:, 0].tolist()
        k = int(r.prompt_logprobs or 0)
        tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if k > 0:
            values, ids = lp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return [None] + [TokenLogprob(t, c, top) for t, c, top in zip(r.prompt[1:], chosen, tops)]

    def _leave_solo(self) -> None:
        """Move the solo row into the batched state: its cache copied out, mask and position set."""
        n = self.solo.length
        if self.paged is not None:  # into pages of the pool (admission kept them free)
            self.paged.add([(layer.keys[:, :, :n], layer.values[:, :, :n]) for layer in self.solo.cache.layers], [n])
            self._solo_on = False
            return
        self.cache = self.solo.export()
        self.mask = self._torch.ones((1, n), dtype=self._torch.long, device=self.device)
        self.positions = self._torch.tensor([n], device=self.device)
        self._solo_on = False

    def _decode(self) -> None:
        torch = self._torch
        if self._solo_on:
            self._decode_solo()
            return
        if self.paged is not None:
            self._decode_paged()
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
        with self._attention():
            out = self.model(input_ids=self.last[:, None], attention_mask=self.mask,
                             position_ids=self.positions[:, None], past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.positions = self.positions + 1
        self._counted("decode", len(self.rows))
        self.last = self._sample(out.logits[:, -1, :], self.rows)
        self._keep(self._advance(self.rows, self.last))
        self._track()

    def _decode_paged(self) -> None:
        """One step of the running rows over the paged pool, overlapped with the host's work.

        The step is queued on the GPU first; while it runs, the host records the previous step's
        tokens (``_advance``: detokenizing, stop strings, events), which reached it in one copy, and
        drops the rows that ended there. A row that ended at the previous step was still in this
        step: its output is dropped and its pages freed, after the GPU's writes to them in stream
        order. This step's tokens are then sampled on the GPU and their copy to the host queued
        (``_lag``), to be recorded during the next step (vLLM's async scheduling does the same).
        Before a step that could not be queued blind (a row needs a page that is not free, so rows
        are preempted; a row will end for length; a row's grammar or log-probabilities need its
        token on the host now), the previous step is recorded first, as without overlap.
        """
        pool = self.paged
        # pages the prefill in flight will take when it joins (admission counted them free)
        held = sum(pool.pages_for(len(r.ids())) for r in self._prefilling())
        if (self._lag is not None and pool.pages_short(held)) or self._record_first():
            self._drain()
            if not self.rows:
                return
        while pool.pages_short(held):
            if held:  # the newest work first: the prefill not yet joined goes back to the queue
                self._abort_prefill()
                held = 0
            else:
                self._preempt()
        pool.grow()
        logits = pool.step(self.last)  # queued (CUDA): the host goes on below while it runs
        if self._lag is not None:
            lagged = len(self._lag[0])
            keep = self._drain(keep_rows=False) + list(range(lagged, len(self.rows)))  # rows added since stay
            if len(keep) < len(self.rows):
                logits = logits[self._torch.tensor(keep, device=logits.device)]
                self._keep(keep)
            if not self.rows:
                return
        self._sampled(logits)

    def _decode_solo(self) -> None:
        """One step of the lone row through the solo decoder, overlapped with the host as in
        ``_decode_paged``: the step (a graph replay) is queued first, then the previous step's token
        is recorded while it runs (Phi-3-mini on an H200, one run: bf16 452 tok/s against 437
        recording first, 1.03x; W4A16 709 against 644, 1.10x; bench/README.md). A step queued behind
        a token that ended the row is thrown away with the solo cache; one that could end it by
        length, or a row whose grammar or log-probabilities need the token now, records first."""
        if self._record_first():
            self._drain()
            if not self.rows:
                return
        logits = self.solo.step(self.last)  # queued (CUDA)
        if self._lag is not None and not self._drain(keep_rows=False):
            self._reset()  # the row ended at the lagged token: this step's output is not used
            return
        self._sampled(logits)

    def _record_first(self) -> bool:
        """The lagged step must be recorded before the next one is queued: a row's grammar or
        log-probabilities need its token on the host, or the lagged token may end a row by length."""
        return self._lag is not None and (not self._overlaps() or any(
            len(r.tokens) + 1 >= r.max_new_tokens for r in self._lag[0]))

    def _sampled(self, logits: Any) -> None:
        """The step's tokens: queued to the host, to be recorded during the next step (``_overlaps``),
        or recorded now."""
        self._counted("decode", len(self.rows))
        if self._overlaps():
            self.last = self._sample_async(logits, self.rows)
        else:
            self.last = self._sample(logits, self.rows)
            self._keep(self._advance(self.rows, self.last))
        self._track()

    def _overlaps(self) -> bool:
        """The step's tokens may reach the host later (no row needs them there before the next step)."""
        return self._lag_host is not None and all(r.grammar is None and r.sampling.logprobs is None for r in self.rows)

    def _sample_async(self, logits: Any, rows: list[Request]) -> Any:
        """``_sample`` without waiting for the tokens: their copy to the host (with the rows'
        finiteness, checked at ``_drain``) is queued, and the tokens stay on the device as the
        next step's input. A row that samples (``pick``) still reads its logits now."""
        torch = self._torch
        out = logits.argmax(-1)
        for i, r in enumerate(rows):
            p = r.sampling
            if p.greedy and not p.penalized:
                continue
            try:
                out[i] = pick(logits[i], p, r.generator, r.tokens)
            except Exception as exc:
                self._row_failed(r, exc)
                out[i] = self.pad_id
        self._lag_host[:, :len(rows)].copy_(torch.stack([out, torch.isfinite(logits).all(-1).to(out.dtype)]),
                                            non_blocking=True)
        if self._lag_event is not None:
            self._lag_event.record()
        self._lag = (list(rows), out)
        return out

    def _drain(self, keep_rows: bool = True) -> list[int]:
        """Record the lagged step's tokens (``_advance``); the indices of its rows still running.
        ``keep_rows``: also drop the others now (else the caller does, with the step in flight)."""
        rows, out = self._lag  # type: ignore[misc]
        self._lag = None
        if self._lag_event is not None:
            self._lag_event.synchronize()
        ids, finite = self._lag_host[:, :len(rows)].tolist()
        for i, r in enumerate(rows):
            if not finite[i] and r.error is None and r.sampling.greedy and not r.sampling.penalized:
                r.error = "the model produced no finite logits for this request"  # as sampling.sanitize says
        keep = self._advance(rows, out, ids)
        if keep_rows:
            self._keep(keep + list(range(len(rows), len(self.rows))))
            self._track()
        return keep

    # ---- batch bookkeeping --------------------------------------------------------------------

    def _merge(self, new: list[Request], cache: Any, mask: Any, positions: Any, last: Any) -> None:
        torch = self._torch
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.last = list(new), cache, mask, positions, last
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def left_pad(t: Any, dim: int) -> Any:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            old_layer.keys = torch.cat([left_pad(old_layer.keys, 2), left_pad(new_layer.keys, 2)], dim=0)
            old_layer.values = torch.cat([left_pad(old_layer.values, 2), left_pad(new_layer.values, 2)], dim=0)
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(mask, 1)], dim=0)
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, last])
        self.rows.extend(new)

    def _preempt(self) -> None:
        """Take the newest running row out of the pool, back to the front of the queue (paged engine)."""
        if len(self.rows) < 2:
            raise RuntimeError("the KV pool cannot hold one row")  # the pool holds at least one whole row
        r = self.rows[-1]
        self._keep(list(range(len(self.rows) - 1)))
        r.preempted += 1
        self.stats.preempted += 1
        log.info("KV pool full: a request with %d tokens preempted (resumes by recomputing)", len(r.ids()))
        with self._queue.mutex:
            self._queue.queue.appendleft(r)

    def _keep(self, keep: list[int]) -> None:
        torch = self._torch
        if not keep:
            self._reset()
            return
        if self._solo_on:  # one row, and it stays
            return
        if self.paged is not None:
            if len(keep) < len(self.rows):
                self.paged.keep(keep)
                self.last = self.last[torch.tensor(keep, device=self.last.device)]
                self.rows = [self.rows[i] for i in keep]
            return
        if len(keep) < len(self.rows):
            idx = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(idx)
            self.mask, self.positions, self.last = self.mask[idx], self.positions[idx], self.last[idx]
            self.rows = [self.rows[i] for i in keep]
        # Drop left columns no remaining row uses (a long prompt that has left the batch).
        lead = int((self.mask.cumsum(-1) == 0).sum(-1).min())
        if lead > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self.mask = self.mask[:, lead:]

    def _reset(self) -> None:
        self.rows, self.cache, self.mask, self.positions, self.last = [], None, None, None, None
        self._lag = None
        self._solo_on = False
        if self.paged is not None:
            self.paged.clear()
        self.stats.active = self.stats.kv_tokens = 0

    def _track(self) -> None:
        self.stats.active = len(self.rows)
        if self.paged is not None:
            self.stats.kv_pages_free = self.paged.free_pages
        if self._solo_on:
            self.stats.kv_tokens = int(self.solo.length)
        elif self.paged is not None:
            self.stats.kv_tokens = self.paged.kv_tokens()
        else:
            self.stats.kv_tokens = int(self.mask.numel()) if self.rows and self.mask is not None else 0

    # ---- sampling and stopping ----------------------------------------------------------------

    def _sample(self, logits: Any, rows: list[Request]) -> Any:
        """One token per row (``phiops.serve.sampling``); a row that cannot sample fails alone.

        Greedy rows take the batch's one argmax; it reaches the host with the batch's finiteness
        check in one copy (reading tokens row by row was a GPU sync each: ~0.5 ms of a 32-row step
        on an H200), kept for ``_advance`` (``_host_ids``). A row that samples adds its own.
        """
        torch = self._torch
        # In float32 (exact): on CPU, argmax and the check over bf16 logits took ~8 ms of a 32-row
        # step of the embedded model, ~3 ms this way. A finite sum means every logit is finite (a
        # NaN or an inf makes it NaN or inf); a row whose sum is not (an overflow too) goes through
        # ``pick``, which handles every case.
        scores = logits.float()
        out = scores.argmax(-1)
        ids, finite = torch.stack([out, scores.sum(-1).isfinite().to(out.dtype)]).tolist()
        for i, r in enumerate(rows):
            p = r.sampling
            if p.greedy and not p.penalized and r.grammar is None and finite[i]:
                continue
            try:
                allowed = r.grammar.allowed() if r.grammar is not None else None
                out[i] = pick(logits[i], p, r.generator, r.tokens, allowed)
                ids[i] = int(out[i])
            except Exception as exc:  # this row alone: the others keep their tokens
                self._row_failed(r, exc)
                out[i] = ids[i] = self.pad_id
        for i, r in enumerate(rows):
            p = r.sampling
            if r.error is not None or (r.grammar is None and p.logprobs is None):
                continue
            try:
                if r.grammar is not None and not r.grammar.accept(ids[i]):
                    raise RowError("the response format grammar refused the sampled token")
                if p.logprobs is not None:
                    r.logprobs.append(logprobs_of(logits[i], ids[i], p.logprobs))
            except Exception as exc:
                self._row_failed(r, exc)
                out[i] = ids[i] = self.pad_id
        self._host_ids = (out, ids)
        return out

    @staticmethod
    def _row_failed(r: Request, exc: Exception) -> None:
        if not isinstance(exc, RowError):
            log.exception("sampling failed for one request")
        r.error = str(exc) if isinstance(exc, RowError) else f"sampling failed: {type(exc).__name__}"

    def _advance(self, rows: list[Request], tokens: Any, ids: list[int] | None = None) -> list[int]:
        """Record one sampled token per row (``ids``: ``tokens`` as read back already), emit text;
        return the indices of rows still running."""
        keep: list[int] = []
        if ids is None:
            # The tokens _sample read back, if these are they (tests may wrap _sample); else one copy.
            held, ids = self._host_ids
            if held is not tokens:
                ids = tokens.tolist()
        for i, (r, tok) in enumerate(zip(rows, ids)):
            if r.cancelled.is_set():
                self._ended(r, Event(finish_reason="cancelled", completion_tokens=len(r.tokens)))
                continue
            if r.error is not None:
                self.stats.failed += 1
                self._ended(r, Event(error=r.error, completion_tokens=len(r.tokens)))
                continue
            self.stats.generated_tokens += 1
            finish = None
            if tok in self.eos:
                finish = "stop"
            else:
                r.tokens.append(tok)
                if r.grammar is not None and r.grammar.finished:
                    finish = "stop"  # the response format is complete
            seen = len(r.text)
            text = detokenize(self.tokenizer, r, final=finish is not None or len(r.tokens) >= r.max_new_tokens)
            if r.stops:
                # Text before `seen` was searched at earlier steps; a stop may start just before it.
                start = max(0, seen - max(len(s) for s in r.stops) + 1)
                cut = min((j for j in (text.find(s, start) for s in r.stops) if j >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
            if finish is None and len(r.tokens) >= r.max_new_tokens:
                finish = "length"
            if finish is None:
                # Hold back what could still become a stop string, and a half-decoded character.
                hold = max((len(s) for s in r.stops), default=1) - 1
                safe = len(text) - hold
                if text.endswith("\ufffd"):
                    safe = min(safe, len(text) - 1)
                if safe > r.sent or (not r.first_sent and r.prompt_logprobs is not None):
                    self._emit(r, Event(text=text[r.sent:safe], completion_tokens=len(r.tokens)))
                    r.sent = max(r.sent, safe)
                keep.append(i)
                continue
            n_out = len(r.tokens) + (1 if tok in self.eos else 0)
            self.stats.finished += 1
            self._ended(r, Event(text=text[r.sent:], finish_reason=finish, completion_tokens=n_out))
        return keep

    def _emit(self, r: Request, ev: Event) -> None:
        ev.logprobs, r.lp_sent = r.logprobs[r.lp_sent:], len(r.logprobs)
        if not r.first_sent:
            ev.prompt_logprobs, r.first_sent = r.prompt_lp, True
        r.emit(ev)

    def _ended(self, r: Request, ev: Event) -> None:
        """The row's final event; its lifetime feeds the admission estimate."""
        if r.admitted:
            took, avg = time.perf_counter() - r.admitted, self.stats.row_seconds
            self.stats.row_seconds = took if avg == 0 else 0.8 * avg + 0.2 * took
        self._emit(r, ev)


def detokenize(tokenizer: Any, r: Request, final: bool = False) -> str:
    """``r``'s text so far, decoding only its newest tokens (the incremental detokenizer of TGI and vLLM).

    A short window of tokens before the new ones is decoded with and without them, and the
    difference appended to ``r.text``; decoding from the window's start, not from the first token,
    keeps what a tokenizer does at a sequence's start (SentencePiece drops the leading space) the
    same on both sides. A window that ends inside a character (a multi-byte character split over
    tokens: U+FFFD at the end) waits for the next token, unless the row is ending (``final``).
    Decoding the whole text at every step cost O(length) per row and token: with the rest of the
    per-row work, 2.6 of the 8.2 ms of a 32-row Phi-3-mini step on an H200 (bench/README.md).
    """
    before = tokenizer.decode(r.tokens[r.prefix_at:r.read_at], skip_special_tokens=True)
    now = tokenizer.decode(r.tokens[r.prefix_at:], skip_special_tokens=True)
    if len(now) > len(before) and (final or not now.endswith("\ufffd")):
        r.text += now[len(before):]
        r.prefix_at, r.read_at = r.read_at, len(r.tokens)
    return r.text


def _urandom(n: int) -> bytes:
    import os

    return os.urandom(n)
