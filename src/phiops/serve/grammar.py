"""``response_format`` ``json_object`` / ``json_schema``: a grammar-constrained decoder (xgrammar).

At each step the row's matcher says which tokens can continue a valid JSON text (of the schema,
for ``json_schema``); the sampler masks the rest out (``phiops.serve.sampling.pick``), so the
output can only be a prefix of valid JSON, and it is complete JSON unless it ran into
``max_tokens`` (``finish_reason: "length"``, as with OpenAI). Once the JSON is complete only an
end-of-turn token is allowed: the row ends with ``"stop"``.

Why xgrammar (0.2.9): maintained (MLC; vLLM's and SGLang's default structured-output backend),
installs from a manylinux wheel, runs on CPU, and compiles a JSON schema once per schema into
per-token masks (cost measured in ``bench/grammar_cost.py``). outlines-core was the fallback.

Whitespace between tokens is fixed (``any_whitespace=False``): a small model would otherwise
spend its tokens on spaces and newlines where the grammar allows them.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from phiops.serve.protocol import APIError, ResponseFormat

SCHEMA_CACHE = 64  # compiled schemas kept (a service sees few distinct schemas: a client's)
MAX_SCHEMA_CHARS = 32_000  # larger schemas are refused before compiling (compile time grows with them)


class RowGrammar:
    """One row's matcher, in the shape the engine asks for (``allowed``, ``accept``, ``finished``)."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import torch
        import xgrammar as xgr

        self._xgr, self._torch = xgr, torch
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> Any:
        """A bool ``[vocab]`` mask of the tokens that keep the output valid."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        words = self.bitmask[0]
        return ((words[:, None] >> self._bits) & 1).bool().flatten()[: self.vocab_size]

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    @property
    def finished(self) -> bool:
        return bool(self.matcher.is_terminated())


class Grammars:
    """Compiles response formats for one tokenizer; thread-safe, schemas cached.

    Args:
        tokenizer: the served model's tokenizer.
        vocab_size: the model's logits width (may exceed the tokenizer's vocabulary).
        eos_ids: the tokens that end a turn (allowed once the JSON is complete).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, fmt: ResponseFormat | None) -> Any:
        """The compiled grammar for a response format; None for text (no constraint).

        Raises:
            APIError: a 400 for a schema xgrammar cannot compile, or one too large.
        """
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            key = "json_object"
        else:
            schema = (fmt.json_schema.schema_ if fmt.json_schema else None) or {"type": "object"}
            key = json.dumps(schema, sort_keys=True)
            if len(key) > MAX_SCHEMA_CHARS:
                raise APIError(400, f"the JSON schema is over {MAX_SCHEMA_CHARS} characters",
                               param="response_format.json_schema.schema")
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            if key == "json_object":
                compiled = self.compiler.compile_builtin_json_grammar()
            else:
                compiled = self.compiler.compile_json_schema(key, any_whitespace=False, strict_mode=True)
        except Exception:  # the compiler's message may quote the schema: not echoed
            raise APIError(400, "the JSON schema could not be compiled into a grammar (unsupported or invalid "
                           "schema)", param="response_format.json_schema.schema") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > SCHEMA_CACHE:
                self._cache.popitem(last=False)
        return compiled

    def row(self, compiled: Any) -> RowGrammar | None:
        """A fresh matcher for one row (each choice of a request gets its own)."""
        return None if compiled is None else RowGrammar(compiled, self.vocab_size)
