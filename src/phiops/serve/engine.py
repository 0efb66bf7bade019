"""Continuous batching for one causal LM: concurrent requests share every forward pass.

One background thread owns the model. Each iteration it

1. admits waiting requests (up to ``max_batch_size`` rows in all): their prompts are prefilled
   together, left-padded, into a fresh KV cache that is then merged into the running batch's
   (both left-padded to the longer length, concatenated on the batch dimension);
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
detokenized incrementally (``detokenize``) and the sampled tokens reach the host in one copy.

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
    """

    def __init__(self, model: Any, tokenizer: Any, eos_ids: list[int], device: str, *,
                 max_batch_size: int = 32, max_wait_ms: float = 10.0,
                 on_step: Callable[[str, int, int], None] | None = None, solo: Any = None,
                 cudnn_sdpa: bool = False, paged: Any = None) -> None:
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
        self.stats = Stats()
        self._host_ids: tuple[Any, list[int] | None] = (None, None)  # _sample's tokens, and as read back
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
                    if self.rows:
                        self._decode()
                    self._maybe_trim()
                except Exception as exc:  # a decode pass (OOM, kernel error): its rows fail, serving goes on
                    log.exception("generation step failed; failing %d running request(s)", len(self.rows))
                    self._fail(self.rows, f"generation failed: {type(exc).__name__}")
                    self._reset()
        self._fail(self.rows, "the engine stopped")
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
        room = self.max_batch_size - len(self.rows)
        new: list[Request] = []
        if room <= 0:
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
        """Prefill the admitted requests; a failure fails the requests of that pass alone."""
        if self._solo_on:  # company has come: the solo row joins the shared cache first
            self._leave_solo()
        # A request asking for its prompt's log-probabilities needs logits at every position:
        # prefilled on its own, so the [T, vocab] logits are one row's, not the group's.
        echo = [[r] for r in new if r.echo()]
        plain = [r for r in new if not r.echo()]
        for group in echo + ([plain] if plain else []):
            try:
                self._prefill_group(group)
            except Exception as exc:
                log.exception("prefill failed; failing its %d request(s)", len(group))
                self._fail([r for r in group if all(r is not x for x in self.rows)], f"generation failed: {type(exc).__name__}")

    def _prefill_group(self, new: list[Request]) -> None:
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
            return
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
        cache = new_cache()  # appends in place (phiops.serve.batched)
        every = new[0].echo()  # a group of one (see _prefill)
        with self._attention():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=0 if every else 1)
        self._counted("prefill", len(new), int(mask.sum()))
        if every:
            new[0].prompt_lp = self._prompt_logprobs(out.logits[0], new[0])
        last = self._sample(out.logits[:, -1, :], new)
        keep = self._advance(new, last)  # a row may finish at its first token
        if not keep:
            return
        if self.paged is not None:
            cache = out.past_key_values
            self.paged.add([(layer.keys, layer.values) for layer in cache.layers], [len(prompts[i]) for i in keep],
                           select=keep)
            self.rows.extend(new[i] for i in keep)
            kept = last[torch.tensor(keep, device=last.device)]
            self.last = kept if self.last is None else torch.cat([self.last, kept])
            self._track()
            return
        cache, positions = out.past_key_values, mask.sum(-1)
        if len(keep) < len(new):
            idx = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(idx)
            mask, positions, last = mask[idx], positions[idx], last[idx]
        self._merge([new[i] for i in keep], cache, mask, positions, last)
        self._track()

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
            logits = self.solo.step(self.last)
            self._counted("decode", 1)
            self.last = self._sample(logits, self.rows)
            if not self._advance(self.rows, self.last):
                self._reset()
            self._track()
            return
        if self.paged is not None:
            while self.paged.pages_short():
                self._preempt()
            self.paged.grow()
            logits = self.paged.step(self.last)
            self._counted("decode", len(self.rows))
            self.last = self._sample(logits, self.rows)
            self._keep(self._advance(self.rows, self.last))
            self._track()
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
        out = logits.argmax(-1)
        ids, finite = torch.stack([out, torch.isfinite(logits).all(-1).to(out.dtype)]).tolist()
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

    def _advance(self, rows: list[Request], tokens: Any) -> list[int]:
        """Record one sampled token per row, emit text; return the indices of rows still running."""
        keep: list[int] = []
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
