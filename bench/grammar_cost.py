"""What a ``response_format`` grammar costs the engine: compile time, and time per decoded token.

    PYTHONPATH=src python bench/grammar_cost.py --out bench/results/grammar_cost_cpu.json

The builtin model's tokenizer (SmolLM2, 49,152 tokens), xgrammar on CPU. Per token the engine asks
the row's matcher for its mask (``RowGrammar.allowed``: fill the bitmask, unpack it to a bool
vocabulary mask) and feeds it the sampled token (``accept``); both are timed here over a JSON
text of the ticket schema, token by token, against a decode step of the served tiny model
(which they come on top of). Compile: the first request with a new schema pays it; the cache
keeps 64 schemas.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import machine, versions

TICKET = {"type": "object", "properties": {
    "category": {"enum": ["hardware", "network", "account", "billing"]},
    "priority": {"enum": ["low", "medium", "high"]},
    "summary": {"type": "string", "maxLength": 120}},
    "required": ["category", "priority", "summary"], "additionalProperties": False}
SAMPLE = {"category": "network", "priority": "high", "summary": "Nimbus router drops wifi every hour"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from phiops import models
    from phiops.serve.grammar import Grammars
    from phiops.serve.protocol import ResponseFormat

    tok = AutoTokenizer.from_pretrained(models.ensure_builtin())
    t0 = time.perf_counter()
    grammars = Grammars(tok, len(tok), [tok.eos_token_id])
    setup_s = time.perf_counter() - t0
    fmt = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "t", "schema": TICKET}})
    compile_s = []
    for _ in range(3):
        grammars._cache.clear()
        t0 = time.perf_counter()
        compiled = grammars.compile(fmt)
        compile_s.append(time.perf_counter() - t0)
    ids = tok(json.dumps(SAMPLE), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    per_token = []
    for _ in range(args.repeats):
        row = grammars.row(compiled)
        t0 = time.perf_counter()
        for t in ids:
            mask = row.allowed()
            assert bool(mask[t]), "the sample is not valid under the schema"
            assert row.accept(t)
        per_token.append((time.perf_counter() - t0) / len(ids))
        assert row.finished
    result = {
        "tokenizer_setup_s": round(setup_s, 4),
        "schema_compile_s": [round(x, 4) for x in compile_s],
        "tokens_per_text": len(ids),
        "mask_and_accept_ms_per_token_median": round(statistics.median(per_token) * 1e3, 4),
        "mask_and_accept_ms_per_token_min": round(min(per_token) * 1e3, 4),
        "machine": machine(),
        "versions": versions(("torch", "transformers", "xgrammar")),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
