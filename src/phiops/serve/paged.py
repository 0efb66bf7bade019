"""The batched engine's KV cache as a paged pool, and its decode step as one CUDA graph per batch size.

The engine (``phiops.serve.engine``) decoded its running rows through transformers' eager forward
over a ``DynamicCache``: every arrival concatenated its cache into the batch's, every step launched
a few hundred kernels from Python, and nothing bounded the cache's memory. On one H200 the 32-row
step of Phi-3-mini took 33 ms, with the GPU busy 18 % of it (bench/README.md). ``PagedDecoder``
replaces that state on CUDA, for the llama-family models ``decode.FusedDecoder`` covers:

- **The pool.** Per layer, keys and values ``[pages + 1, kv heads, PAGE, head_dim]``, allocated once
  from a memory budget (``pages_for_budget``); the last page is scratch for padding rows. A row
  holds a list of pages (its page table), one more each time its length crosses a page boundary
  (``grow``); a row that leaves gives them back (``keep``). Arrivals are written into their own
  pages (``add``), so nothing already cached moves, and memory is bounded: the engine admits a
  request only when the free pages hold its prompt (``phiops.serve.engine``), and when a running
  row needs a page that is not there it preempts the newest rows, which resume later by
  recomputation (as vLLM's scheduler does).
- **The step.** Embedding, per layer RMSNorm, the fused q/k/v matmul, rotary + cache write +
  attention over the page table (``kernels.Attention(page=...)``, one Triton kernel, flash-decoding
  splits), o (its residual add in the GEMM), RMSNorm, gate/up, SiLU gating, down (residual
  likewise), and the LM head: dense weights through cuBLAS, W4A16 ones through
  ``kernels.matmul_w4`` on the packed weights; the norms and the gating are one Triton kernel each
  (``kernels.rms_norm``, ``kernels.silu_mul``). Everything reads its inputs from
  fixed buffers (tokens, positions, page tables), so for each batch-size bucket (1, 2, 4, ... up
  to the most rows) the step is captured once as a CUDA graph and replayed; a batch of ``n`` rows
  runs the smallest bucket that holds it, padded with rows that write to the scratch page.

On CPU (the tests, under Triton's interpreter) the same step runs eagerly. Prefill still runs the
model's own forward (``Engine._prefill_pass``, in chunks while rows decode); its keys and values are
then scattered into the rows' pages.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from phiops.serve.decode import _fused_matrix, capture, fused_unsupported, layer_matrices, rotary_tables, undispatch

log = logging.getLogger("bentoml.phiops.paged")

PAGE = 32  # positions a page holds: the attention kernel's block (kernels.Attention.BLOCK_T)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def page_bytes(model: Any, page: int = PAGE) -> int:
    """Bytes one page of keys and values takes over all the model's layers."""
    cfg = model.config.get_text_config(decoder=True)
    head_dim = model.model.layers[0].self_attn.head_dim
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * page * head_dim * model.dtype.itemsize


def pages_for_budget(model: Any, budget_bytes: int, max_rows: int, max_len: int, page: int = PAGE) -> int:
    """Pages that fit ``budget_bytes``, capped at what ``max_rows`` rows of ``max_len`` tokens can use."""
    return min(budget_bytes // page_bytes(model, page), max_rows * cdiv(max_len, page))


class PagedDecoder:
    """Batched decode over a paged KV pool; rows are kept in the caller's order.

    Args:
        model: a loaded llama-family causal LM (eval mode) on ``device`` (``fused_unsupported``).
        device: ``"cuda"`` (graphs) or ``"cpu"`` (eager; Triton's interpreter for the attention).
        pages: pages in the pool (``pages_for_budget``), not counting the scratch page.
        max_len: the most tokens one row may hold (prompt and generated); at most the model's
            sliding window, if it has one (the kernel attends to the whole row).
        max_rows: the most rows decoded together (the largest bucket).
        graphs: capture each bucket as a CUDA graph (default: on CUDA).
    """

    def __init__(self, model: Any, device: str, *, pages: int, max_len: int, max_rows: int, page: int = PAGE,
                 graphs: bool | None = None) -> None:
        from phiops.serve import kernels as K
        from phiops.serve.decode import sliding_window

        reason = fused_unsupported(model)
        if reason:
            raise ValueError(f"PagedDecoder does not support this model: {reason}")
        window = sliding_window(model)
        if window is not None and max_len > window:
            raise ValueError(f"max_len {max_len} exceeds the model's sliding window {window}")
        if pages < cdiv(max_len, page):
            raise ValueError(f"{pages} pages of {page} cannot hold one row of {max_len} tokens")
        undispatch(model, device)
        self._K, self.device, self.page = K, device, page
        self.table_width = cdiv(max_len, page)
        self.max_len, self.max_rows, self.pages = self.table_width * page, max_rows, pages
        cfg = model.config.get_text_config(decoder=True)
        inner = model.model
        attn0 = inner.layers[0].self_attn
        dtype, self.dtype = model.dtype, model.dtype
        self.hq, self.hkv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, attn0.head_dim
        shape = (pages + 1, self.hkv, page, self.head_dim)  # page `pages`: scratch
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in inner.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in inner.layers]
        self._cos, self._sin, rot = rotary_tables(model, self.max_len, device)
        self.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < max_rows] + [max_rows]
        self._attn = {b: K.Attention(heads=self.hq, kv_heads=self.hkv, head_dim=self.head_dim, rotary_dim=rot,
                                     max_len=self.max_len, scaling=float(attn0.scaling), device=device, rows=b,
                                     page=page) for b in self.buckets}
        self._layers, self._lm_head = layer_matrices(model), _fused_matrix((model.lm_head,))
        self._embed = inner.embed_tokens.weight.data
        self._norm, self._norm_eps = inner.norm.weight.data, float(inner.norm.variance_epsilon)
        self._inter = inner.layers[0].mlp.down_proj.in_features
        new = lambda n: torch.zeros((max_rows, n), dtype=dtype, device=device)
        self._x, self._h = new(cfg.hidden_size), new(cfg.hidden_size)  # residual stream, normed input
        self._qkv, self._ao = new((self.hq + 2 * self.hkv) * self.head_dim), new(self.hq * self.head_dim)
        self._gu, self._act = new(2 * self._inter), new(self._inter)
        self._logits = new(model.lm_head.out_features)
        # the step's inputs: written before each replay
        self._tok = torch.zeros((max_rows,), dtype=torch.long, device=device)
        self._pos = torch.zeros((max_rows,), dtype=torch.int32, device=device)
        self._table = torch.full((max_rows, self.table_width), pages, dtype=torch.int32, device=device)
        cuda = str(device).startswith("cuda")
        self._host_table = torch.full((max_rows, self.table_width), pages, dtype=torch.int32, pin_memory=cuda)
        self._host_pos = torch.zeros((max_rows,), dtype=torch.int32, pin_memory=cuda)
        # The last step's copies of the two host buffers above are asynchronous: whatever writes
        # them again waits for this event first (``_inputs_free``), since the engine may change the
        # rows (``keep``, ``grow``) while a step is queued behind the one running.
        self._copied = torch.cuda.Event() if cuda else None
        self._graphs: dict[int, Any] = {}
        self._pool: Any = None  # the graphs' shared memory pool, made at the first capture
        self._use_graphs = cuda if graphs is None else graphs
        # rows: their page tables and lengths (tokens in the cache), in the engine's row order
        self.tables: list[list[int]] = []
        self.lengths: list[int] = []
        self._free = list(range(pages - 1, -1, -1))  # a stack: low page ids first

    # ---- the pool ---------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return cdiv(tokens, self.page)

    def kv_tokens(self) -> int:
        """Positions held in pages (whole pages, as allocated)."""
        return (self.pages - len(self._free)) * self.page

    def pages_short(self, held: int = 0) -> int:
        """Pages the next step needs (rows whose next position starts a new page) beyond the free
        ones, of which ``held`` are promised elsewhere (a prefill in flight)."""
        need = sum(1 for n, t in zip(self.lengths, self.tables) if n == len(t) * self.page)
        return max(0, need + held - len(self._free))

    def _inputs_free(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

    def grow(self) -> None:
        """Give each row whose next position starts a new page that page (``pages_short()`` must be 0)."""
        self._inputs_free()
        for i, (n, t) in enumerate(zip(self.lengths, self.tables)):
            if n == len(t) * self.page:
                if n >= self.max_len:
                    raise ValueError(f"row {i} holds {n} tokens, the most a row may ({self.max_len})")
                page = self._free.pop()
                t.append(page)
                self._host_table[i, len(t) - 1] = page

    def add(self, layers: list[tuple[Any, Any]], lengths: list[int], select: list[int] | None = None) -> None:
        """Append rows whose keys and values are ``layers[l] = (k, v)``, each ``[n, kv heads, W, head_dim]``
        with row ``i``'s ``lengths[i]`` tokens right-aligned (a left-padded prefill's cache); with
        ``select``, the new rows are those rows of ``k`` and ``v`` (``lengths`` is then per selected row)."""
        need = sum(self.pages_for(n) for n in lengths)
        if need > len(self._free):
            raise RuntimeError(f"{need} pages needed, {len(self._free)} free")
        if self.rows + len(lengths) > self.max_rows:
            raise RuntimeError(f"{self.rows} + {len(lengths)} rows exceed {self.max_rows}")
        if any(n > self.max_len or n < 1 for n in lengths):
            raise ValueError(f"row lengths {lengths}: each 1..{self.max_len}")
        width = layers[0][0].shape[2]
        tables = [[self._free.pop() for _ in range(self.pages_for(n))] for n in lengths]
        try:
            src_row, src_col, dst_page, dst_off = [], [], [], []
            for i, (n, table) in enumerate(zip(lengths, tables)):
                t = torch.arange(n)
                src_row.append(torch.full((n,), select[i] if select is not None else i))
                src_col.append(width - n + t)
                dst_page.append(torch.tensor(table)[t // self.page])
                dst_off.append(t % self.page)
            dev = self.k[0].device
            src_row_t, src_col_t, dst_page_t, dst_off_t = (torch.cat(x).to(dev) for x in
                                                           (src_row, src_col, dst_page, dst_off))
            for (k, v), kp, vp in zip(layers, self.k, self.v):
                kp[dst_page_t, :, dst_off_t] = k[src_row_t, :, src_col_t].to(self.dtype)
                vp[dst_page_t, :, dst_off_t] = v[src_row_t, :, src_col_t].to(self.dtype)
        except BaseException:  # nothing added: the pages go back, the rows stay as they were
            for table in reversed(tables):
                self._free.extend(reversed(table))
            raise
        self._inputs_free()
        for n, table in zip(lengths, tables):
            self._host_table[self.rows, :len(table)] = torch.tensor(table, dtype=torch.int32)
            self.tables.append(table)
            self.lengths.append(n)

    def keep(self, idx: list[int]) -> None:
        """Keep rows ``idx`` (in that order, as the engine's new row list); the others' pages are freed."""
        self._inputs_free()
        kept = set(idx)
        for i, t in enumerate(self.tables):
            if i not in kept:
                self._free.extend(reversed(t))
        old = self.rows
        self.tables = [self.tables[i] for i in idx]
        self.lengths = [self.lengths[i] for i in idx]
        if idx != list(range(len(idx))):
            self._host_table[:len(idx)] = self._host_table[torch.tensor(idx, dtype=torch.long)]
        self._host_table[len(idx):old] = self.pages

    def clear(self) -> None:
        self.keep([])

    # ---- the step ---------------------------------------------------------------------------------

    def _mm(self, w: Any, a: Any, out: Any, residual: bool = False) -> Any:
        """``out = a @ W.T`` (``residual``: ``out += a @ W.T``, for dense weights in the one GEMM)."""
        if isinstance(w, torch.Tensor):
            return out.addmm_(a, w.t()) if residual else torch.mm(a, w.t(), out=out)
        if residual:
            return out.add_(self._K.matmul_w4(*w, a, torch.empty_like(out)))
        return self._K.matmul_w4(*w, a, out)

    def _forward(self, b: int) -> Any:
        """One decode step of ``b`` rows from the input buffers; the logits land in ``_logits[:b]``."""
        K = self._K
        x, h, qkv, ao, gu, act = (t[:b] for t in (self._x, self._h, self._qkv, self._ao, self._gu, self._act))
        attn, pos, table = self._attn[b], self._pos[:b], self._table[:b]
        torch.index_select(self._embed, 0, self._tok[:b], out=x)
        for (w_qkv, w_o, w_gu, w_down, ln1, ln2, eps), kc, vc in zip(self._layers, self.k, self.v):
            self._mm(w_qkv, K.rms_norm(x, ln1, eps, h), qkv)
            attn(qkv, kc, vc, pos, self._cos, self._sin, ao, table)
            self._mm(w_o, ao, x, residual=True)
            self._mm(w_gu, K.rms_norm(x, ln2, eps, h), gu)
            self._mm(w_down, K.silu_mul(gu, act), x, residual=True)
        return self._mm(self._lm_head, K.rms_norm(x, self._norm, self._norm_eps, h), self._logits[:b])

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def step(self, tokens: Any) -> Any:
        """Append one token per row (``tokens``: ``[rows]`` on the device) and return ``[rows, vocab]`` logits.

        The logits live in a buffer the next step overwrites. Call ``grow`` first. On CUDA this only
        queues the step: the host goes on while the GPU runs it (the engine's overlap).
        """
        n = self.rows
        if tokens.shape[0] != n or n == 0:
            raise ValueError(f"{tokens.shape[0]} tokens for {n} rows")
        b = self.bucket(n)
        self._inputs_free()
        self._host_pos[:n] = torch.tensor(self.lengths, dtype=torch.int32)
        self._host_pos[n:b] = 0
        self._pos[:b].copy_(self._host_pos[:b], non_blocking=True)
        self._table[:b].copy_(self._host_table[:b], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self._tok[:n].copy_(tokens)
        self._tok[n:b] = 0
        if not self._use_graphs:
            self._forward(b)
        else:
            if b not in self._graphs:
                self._capture(b)
            self._graphs[b].replay()
        self.lengths = [x + 1 for x in self.lengths]
        return self._logits[:n]

    def warm(self) -> None:
        """Capture every bucket's graph now (largest first, so they share one memory pool), not at a
        first step under load."""
        if self._use_graphs:
            for b in reversed(self.buckets):
                if b not in self._graphs:
                    self._capture(b)

    def _capture(self, b: int) -> None:
        # The warm-up and the capture write keys and values for the rows' next positions (or the
        # scratch page): harmless, the real step writes the same positions again.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles and tunes the kernels outside the capture
                self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with capture(graph, pool=self._pool):
            self._forward(b)
        self._graphs[b] = graph
        log.info("batched decode step captured as a CUDA graph for %d rows", b)
