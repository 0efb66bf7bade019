"""W4A16 (GPTQ/AWQ) against the merged model on CPU: resident memory and decode speed (issue 17).

Command (about 10 minutes on the 2-core machine; models from the embedded demo):

    python bench/w4a16_cpu.py --models /tmp/fc-demo/models --out bench/results/w4a16_cpu.json

Each model loads through ``phiops.serve.loader.load_checkpoint``, as the service and the evaluate
stage load it, so GPTQ/AWQ layers run on PyTorch's int4 weight-only CPU kernel
(``aten._weight_int4pack_mm_for_cpu``). Two configurations, each in its own processes (the ISA
switches are read when torch loads):

- ``bf16``: ``serve.dtype: bfloat16``, what ``auto`` picks on this AMX CPU;
- ``fp32_emulated_avx2``: ``serve.dtype: float32`` with ``ATEN_CPU_CAPABILITY=avx2
  ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``: what ``auto`` picks on an AVX2-only CPU
  (AMD EPYC), approximated here. It is not that machine: its cores, caches and memory differ.

Memory: one fresh process per model and configuration loads it and runs one forward (the one
that made compressed-tensors decompress a W4A16 model before issue 17); it reports the bytes of
the weights it holds (params and buffers, ``get_memory_footprint``), the RSS that loading and
the forward added, that RSS again once settled (after a garbage collection and glibc's
``malloc_trim``, for every model alike), and the peak RSS over the imports' baseline (does
loading materialize full-precision weights on the way?).

Speed: one process per configuration holds all three models and drives each through
``phiops.serve.engine.Engine`` (the batched CPU path the service runs) in alternating rounds:
batch 1 (one request) and batch 16 (16 requests submitted at once), ``--new-tokens`` tokens
each from the same 32-token prompt; no EOS can end a row early (the engine is given an id the
models never produce as its EOS), so every model generates the same tokens count. tok/s =
generated tokens / wall time (prefill included; 32 prompt tokens against 64 generated).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench._common import drive_engine, machine, versions  # noqa: E402

CONFIGS = {
    "bf16": ("bfloat16", {}),
    "fp32_emulated_avx2": ("float32", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                       "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
}
VARIANTS = ("merged", "gptq", "awq")
PROMPT_TOKENS = 32
NO_EOS = 49151  # the last id of SmolLM2's vocabulary, which greedy decoding here never reaches


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(path: str, dtype: str) -> dict[str, Any]:
    """Load one model, run one forward; what it holds (this process alone)."""
    import gc

    import torch

    from phiops.serve.decode import weights_held
    from phiops.serve.engine import _TRIM
    from phiops.serve.loader import load_checkpoint

    torch.set_num_threads(2)
    # What every model's load imports, before the baseline: ~330 MB of RSS that is no model's.
    import compressed_tensors  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    AutoTokenizer.from_pretrained(path)  # the tokenizer's share (~20 MB) too
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
    base_rss, base_peak = _rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model, *_ = load_checkpoint(path, dtype, "cpu")
    loaded_rss = _rss()
    with torch.inference_mode():
        model(input_ids=torch.arange(1, 1 + PROMPT_TOKENS)[None])
    forward_rss = _rss()
    gc.collect()  # the same for every model: what a long-running service settles at
    if _TRIM is not None:
        _TRIM(0)
    return {"weights_bytes": int(model.get_memory_footprint()), "weights": weights_held(model),
            "rss_added_by_load_bytes": loaded_rss - base_rss, "rss_added_after_forward_bytes": forward_rss - base_rss,
            "rss_added_settled_bytes": _rss() - base_rss,
            "peak_rss_over_baseline_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_peak,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def speed_child(paths: dict[str, str], dtype: str, rounds: int, new_tokens: int, batches: list[int]) -> dict[str, Any]:
    """Alternating rounds of every model at every batch size; tok/s per round."""
    import torch

    from phiops.serve.engine import Engine, Request
    from phiops.serve.loader import load_checkpoint

    torch.set_num_threads(2)
    loaded = {name: load_checkpoint(p, dtype, "cpu")[:2] for name, p in paths.items()}
    prompt = list(range(100, 100 + PROMPT_TOKENS))

    def run(name: str, batch: int) -> float:
        model, tok = loaded[name]
        engine = Engine(model, tok, [NO_EOS], "cpu", max_batch_size=batch, max_wait_ms=50.0)
        wall, produced = drive_engine(engine, Request, [prompt] * batch, new_tokens)
        assert produced == batch * new_tokens, (name, batch, produced)
        return produced / wall

    for name in loaded:  # warm-up: kernel JIT, allocator
        for batch in batches:
            run(name, batch)
    out: dict[str, Any] = {str(b): {n: [] for n in loaded} for b in batches}
    order = list(loaded)
    for r in range(rounds):
        for batch in batches:
            for name in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
                out[str(batch)][name].append(round(run(name, batch), 2))
    return {"tok_s": out, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _child(kind: str, env: dict[str, str], *args: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(args)]
    proc = subprocess.run(cmd, env={**os.environ, **env, "TOKENIZERS_PARALLELISM": "false"},
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="/tmp/fc-demo/models", help="a folder with merged/, gptq/, awq/")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--parts", nargs="+", default=["memory", "speed"], choices=["memory", "speed"],
                    help="measure only these; the other part is kept from --out where it exists")
    ap.add_argument("--out", default=str(ROOT / "bench/results/w4a16_cpu.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("child_args", nargs="?", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        fn = {"memory": memory_child, "speed": speed_child}[a.child]
        print(json.dumps(fn(*json.loads(a.child_args))))
        return

    paths = {v: str(Path(a.models) / v) for v in VARIANTS}
    command = " ".join([Path(sys.executable).name, *sys.argv])
    partial = set(a.parts) != {"memory", "speed"} and Path(a.out).exists()
    # A partial run re-measures one part and keeps the rest (settings included) from the last full one.
    result: dict[str, Any] = json.loads(Path(a.out).read_text()) if partial else {
        "machine": machine(), "versions": versions(("torch", "transformers", "compressed-tensors")),
        "commands": [],
        "note": "fp32_emulated_avx2 is this AMX CPU with AVX2-only switches, not an AVX2-only machine",
        "models": {v: {"path": p, "file_bytes": sum(f.stat().st_size for f in Path(p).glob("*.safetensors"))}
                   for v, p in paths.items()},
        "settings": {"rounds": a.rounds, "new_tokens": a.new_tokens, "prompt_tokens": PROMPT_TOKENS,
                     "batches": a.batches, "threads": 2},
        "configs": {},
    }
    result.setdefault("commands", []).append({"command": command, "parts": a.parts})
    for cname in a.configs:
        dtype, env = CONFIGS[cname]
        t0 = time.perf_counter()
        old = result["configs"].get(cname, {})
        mem = ({v: _child("memory", env, p, dtype) for v, p in paths.items()} if "memory" in a.parts
               else old["memory"])
        speed = (_child("speed", env, paths, dtype, a.rounds, a.new_tokens, a.batches) if "speed" in a.parts
                 else old["speed"])
        merged = mem["merged"]["weights_bytes"]
        summary: dict[str, Any] = {}
        for v in ("gptq", "awq"):
            summary[v] = {
                "weights_ratio_vs_merged": round(mem[v]["weights_bytes"] / merged, 3),
                "rss_settled_ratio_vs_merged": round(mem[v]["rss_added_settled_bytes"]
                                                     / mem["merged"]["rss_added_settled_bytes"], 3),
                **{f"tok_s_ratio_vs_merged_batch{b}": round(_median(speed["tok_s"][str(b)][v])
                                                           / _median(speed["tok_s"][str(b)]["merged"]), 3)
                   for b in result["settings"]["batches"]},
            }
        result["configs"][cname] = {"dtype": dtype, "env": env, "memory": mem, "speed": speed, "summary": summary,
                                    "seconds": round(time.perf_counter() - t0, 1)}
        print(cname, json.dumps(summary), flush=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")  # after each configuration: a partial run still counts
    print("wrote", a.out)


if __name__ == "__main__":
    main()
