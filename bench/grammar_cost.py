"""What a ``response_format`` grammar costs: compile time, time per token, and end-to-end tok/s.

    python bench/grammar_cost.py --out bench/results/grammar_cost_cpu.json

The builtin model's tokenizer (SmolLM2, 49,152 tokens), xgrammar on CPU. Per token the engine asks
the row's matcher for its mask (``RowGrammar.allowed``: fill the bitmask, unpack it to a bool
vocabulary mask) and feeds it the sampled token (``accept``); both are timed here over a JSON
text of the ticket schema, token by token, against a decode step of the served tiny model
(which they come on top of). Compile: the first request with a new schema pays it; the cache
keeps 64 schemas.

End to end: the embedded SmolLM2-135M-Instruct through the service's serving layer
(``OpenAIServing``, in process, the dtype the service picks), the ticket prompt answered greedily
with and without ``response_format: json_schema``, alternating, in one run: completion tokens per
second of each and their ratio, and whether each answer parses as JSON.
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


PROMPT = ("Classify this support ticket as JSON with category, priority and summary: "
          "'My Nimbus router drops the wifi every hour since the firmware update.'")


def end_to_end(rounds: int, max_tokens: int) -> dict:
    """Greedy chat completions with and without the schema, alternating; tok/s of each."""
    import asyncio

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phiops.serve.checkpoint import eos_ids
    from phiops.serve.loader import Loaded, pick_dtype
    from phiops.serve.observability import Metrics
    from phiops.serve.openai_serving import OpenAIServing
    from phiops.serve.protocol import ChatCompletionRequest
    from phiops.serve.settings import Settings

    from phiops import models

    path = models.ensure_builtin()
    dtype = pick_dtype("auto", "cpu")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    loaded = Loaded(model=model, tokenizer=tok, eos_ids=eos_ids(model, tok), device="cpu", dtype=dtype, solo=None,
                    model_tag="smollm2:bench", created=0, lineage={})
    serving = OpenAIServing(loaded, Settings(model_tag="smollm2:bench", served_model_name="smollm2",
                                             max_new_tokens=max_tokens), Metrics())
    fmt = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET}}
    runs: dict[str, list[tuple[int, float, bool]]] = {"free": [], "json_schema": []}
    try:
        for i in range(rounds + 1):  # round 0 warms up (and compiles the schema): not counted
            for name in ("free", "json_schema"):
                body = ChatCompletionRequest(model="smollm2", messages=[{"role": "user", "content": PROMPT}],
                                             max_tokens=max_tokens, temperature=0,
                                             **({"response_format": fmt} if name == "json_schema" else {}))
                t0 = time.perf_counter()
                res = asyncio.run(serving.chat(body))
                dt = time.perf_counter() - t0
                text = res["choices"][0]["message"]["content"]
                try:
                    json.loads(text)
                    valid = True
                except ValueError:
                    valid = False
                if i:
                    runs[name].append((res["usage"]["completion_tokens"], dt, valid))
    finally:
        serving.close()
    out = {}
    for name, rs in runs.items():
        out[name] = {"completion_tokens": [r[0] for r in rs], "tok_per_s": round(sum(r[0] for r in rs) / sum(r[1] for r in rs), 2),
                     "valid_json": sum(r[2] for r in rs), "requests": len(rs)}
    out["json_schema_vs_free_tok_per_s"] = round(out["json_schema"]["tok_per_s"] / out["free"]["tok_per_s"], 3)
    out["dtype"] = dtype
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="end-to-end requests of each kind")
    ap.add_argument("--max-tokens", type=int, default=64)
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
        "end_to_end": end_to_end(args.rounds, args.max_tokens),
        "machine": machine(),
        "versions": versions(("torch", "transformers", "xgrammar")),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
