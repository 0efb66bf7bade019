"""The batching engine's memory under served-like load, in one process: does it level off?

Command (about 5 minutes a run on the 2-core machine):

    python bench/engine_memory_cpu.py --rounds 6 --out bench/results/engine_memory_cpu.json
    python bench/engine_memory_cpu.py --rounds 5 --kernel-cache-capacity 1024 \
        --out bench/results/engine_memory_cpu_uncapped.json

The embedded model (bf16 on AMX CPUs, as the service picks) in `phiops_engine.Engine`, driven as
the load bench's HTTP clients drive the service: 32 closed-loop clients, each submitting its next
support-ticket prompt (chat template, `max_tokens` 32, greedy) a random 0-20 ms "round trip"
after its last one ended, 192 requests a round. Prefills then group a varying number of rows of
varying width, a new matmul shape almost every time, as in serving (with no jitter, or a whole
round submitted at once, the same groups recur every round and hide what new shapes cost).

After each round, 1 s idle: the RSS, and glibc's in-use heap bytes (`mallinfo2().uordblks`:
what is allocated and not freed, unlike RSS unaffected by pages freed but not yet returned).

`--kernel-cache-capacity` sets both kernel caches of bf16 matmuls (oneDNN's primitive cache and
PyTorch's ideep cache) before torch loads: 256 is what phiops.serve.loader.cap_kernel_caches sets, 1024 is
PyTorch's default for both.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CLIENTS = 32
MAX_TOKENS = 32


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _memory() -> dict[str, int]:
    time.sleep(1.0)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rss_bytes": rss, "heap_in_use_bytes": libc.mallinfo2().uordblks}


def _round(engine: Any, request_cls: Any, prompts: list[list[int]], rng: random.Random) -> dict[str, Any]:
    """All prompts through `engine` by CLIENTS closed-loop clients; returns requests/s."""
    todo, ended, lock = list(prompts), queue.Queue(), threading.Lock()

    def submit() -> None:
        with lock:
            if not todo:
                return
            prompt = todo.pop()

        def emit(ev: Any) -> None:
            if ev.finish_reason or ev.error:
                ended.put(ev.error)

        engine.submit(request_cls(prompt=prompt, max_new_tokens=MAX_TOKENS, emit=emit))

    t0 = time.perf_counter()
    prefills = engine.stats.prefill_passes
    for _ in range(CLIENTS):
        submit()
    errors = 0
    for _ in prompts:
        errors += ended.get() is not None
        # This client's next request, after a random round trip as over HTTP: without it the
        # same rows group into the same prefills every round, and no new shape ever appears.
        threading.Timer(rng.uniform(0.0, 0.02), submit).start()
    wall = time.perf_counter() - t0
    return {"requests": len(prompts), "errors": errors, "wall_s": round(wall, 3),
            "requests_per_s": round(len(prompts) / wall, 3), "prefills": engine.stats.prefill_passes - prefills}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/engine_memory_cpu.json")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=192, help="per round")
    ap.add_argument("--kernel-cache-capacity", type=int, default=256)
    args = ap.parse_args(argv)
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ[var] = str(args.kernel_cache_capacity)

    import torch
    from _common import machine, versions
    from phiops.serve.engine import Engine, Request
    from serve_cpu_load import Baseline, _prompts

    from phiops import models

    dtype = "bfloat16" if torch.cpu._is_amx_tile_supported() else "float32"
    base = Baseline(models.ensure_builtin(), dtype)
    prompts = [base.encode(p) for p in _prompts(args.requests)]
    engine = Engine(base.model, base.tok, base.eos, "cpu", max_batch_size=CLIENTS, max_wait_ms=10)
    result: dict[str, Any] = {
        "bench": "engine_memory_cpu",
        "command": " ".join(["python bench/engine_memory_cpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {**machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": versions(("torch", "transformers")),
        "settings": {"clients": CLIENTS, "max_tokens": MAX_TOKENS, "dtype": dtype,
                     "kernel_cache_capacity": args.kernel_cache_capacity},
        "loaded": _memory(),
        "rounds": [],
    }
    rng = random.Random(7)
    try:
        for i in range(args.rounds):
            r = {**_round(engine, Request, prompts, rng), **_memory()}
            result["rounds"].append(r)
            print(f"round {i}: {r['requests_per_s']} req/s, {r['prefills']} prefills, errors {r['errors']}, "
                  f"RSS {r['rss_bytes'] / 1e6:.1f} MB, heap in use {r['heap_in_use_bytes'] / 1e6:.1f} MB", flush=True)
    finally:
        engine.close()
    heap = [r["heap_in_use_bytes"] for r in result["rounds"]]
    if len(heap) >= 3:  # round 0 holds the one-time growth; the slope is taken from round 1 on
        result["summary"] = {
            "heap_in_use_after_first_round_bytes": heap[0],
            "heap_in_use_last_bytes": heap[-1],
            "heap_growth_per_round_after_round_1_bytes": round((heap[-1] - heap[1]) / (len(heap) - 2)),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(result.get("summary", {}), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
