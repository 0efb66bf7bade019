"""Chunked prefill on CPU: what a long prompt's arrival does to the rows already decoding.

    python bench/chunked_prefill_cpu.py --out bench/results/chunked_prefill_cpu.json   # ~2 min, 2 cores

The embedded default's shape (SmolLM2-135M's config.json, ``SMOLLM2_135M``) with random weights,
float32, the service's engine on CPU (dynamic cache). Four requests (32-token prompts, 96 tokens
out) decode; when the first has 16 tokens, a request with a ``--long``-token prompt (1,024: the
service's ``max_prompt_tokens``) arrives. For each ``serve.prefill_chunk_tokens`` setting, in
alternating rounds: the four rows' largest gap between two tokens (the stall the arrival causes)
and their inter-token p50 / p99 over the whole run, the long request's time to first token, and
the wall time. 0 is the behaviour before chunked prefill (the whole prompt in one pass).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import machine, versions

# SmolLM2-135M-Instruct's config.json (the embedded default; its preset names the checkpoint, not a shape)
SMOLLM2_135M = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}


def one_run(model: Any, chunk: int, long_len: int, vocab: int) -> dict[str, Any]:
    import torch

    from phiops.models import word_tokenizer
    from phiops.serve.engine import Engine, Request

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (32,), generator=g).tolist() for _ in range(4)]
    long_prompt = torch.randint(3, vocab, (long_len,), generator=g).tolist()
    engine = Engine(model, word_tokenizer(vocab), [0], "cpu", max_batch_size=8, max_wait_ms=5, prefill_chunk=chunk)
    times: list[list[float]] = [[] for _ in range(5)]
    done = [threading.Event() for _ in range(5)]
    sent: dict[str, float] = {}

    def emitter(i: int) -> Any:
        def emit(ev: Any) -> None:
            now = time.perf_counter()
            times[i].extend([now] * max(1, ev.completion_tokens - len(times[i])))
            if i == 0 and ev.completion_tokens >= 16 and "long" not in sent:
                sent["long"] = now
                engine.submit(requests[4])
            if ev.finish_reason or ev.error:
                done[i].set()
        return emit

    requests = [Request(prompt=p, max_new_tokens=96, emit=emitter(i)) for i, p in enumerate(prompts)]
    requests.append(Request(prompt=long_prompt, max_new_tokens=8, emit=emitter(4)))
    t0 = time.perf_counter()
    for r in requests[:4]:
        engine.submit(r)
    for d in done:
        d.wait(600)
    wall = time.perf_counter() - t0
    engine.close()
    gaps = [b - a for ts in times[:4] for a, b in zip(ts, ts[1:])]
    gaps.sort()
    return {"prefill_chunk_tokens": chunk, "wall_s": round(wall, 3),
            "running_rows_max_gap_ms": round(max(gaps) * 1000, 1),
            "running_rows_itl_p50_ms": round(statistics.median(gaps) * 1000, 2),
            "running_rows_itl_p99_ms": round(gaps[int(0.99 * (len(gaps) - 1))] * 1000, 1),
            "long_ttft_ms": round((times[4][0] - sent["long"]) * 1000, 1),
            "prefill_passes": engine.stats.prefill_passes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--long", type=int, default=1024, help="tokens of the prompt that arrives")
    ap.add_argument("--chunks", default="0,256,512")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    from phiops import models

    arch = SMOLLM2_135M
    model = models.random_model(arch, dtype="float32")
    chunks = [int(c) for c in args.chunks.split(",")]
    result: dict[str, Any] = {"bench": "chunked_prefill_cpu", "command": " ".join(
        ["python", "bench/chunked_prefill_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "versions": versions(("torch", "transformers")), "long_prompt_tokens": args.long,
        "runs": []}
    with torch.inference_mode():
        one_run(model, chunks[-1], 64, arch["vocab_size"])  # warm-up
    for _ in range(args.rounds):  # alternating: the settings see the same machine state
        for c in chunks:
            run = one_run(model, c, args.long, arch["vocab_size"])
            print(json.dumps(run), flush=True)
            result["runs"].append(run)
    med: dict[str, Any] = {}
    for c in chunks:
        rs = [r for r in result["runs"] if r["prefill_chunk_tokens"] == c]
        med[str(c)] = {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0] if k != "prefill_chunk_tokens"}
    result["median"] = med
    base = med[str(chunks[0])]["running_rows_max_gap_ms"]
    result["max_gap_ratio_vs_first"] = {c: round(base / m["running_rows_max_gap_ms"], 2) for c, m in med.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(med, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
