"""The served model under load on CPU, against a one-at-a-time `model.generate` loop, in one run.

Command (about 11 minutes on the 2-core machine; without --soak-rounds about 8):

    python bench/serve_cpu_load.py --rounds 3 --soak-rounds 6 --out bench/results/serve_cpu_load.json

What it does, on the embedded default model (SmolLM2-135M-Instruct, `phiops model fetch`):

1. saves the model to a temporary BentoML store, builds the bento (`phiops.bento.build`) and serves
   it (`bentoml serve <tag>`, the production path: continuous batching, max_batch_size 32);
2. alternates rounds, so that other load on the machine hits both alike:
   baseline (the same prompts through a plain `model.generate` loop, one request at a time, in
   this process, float32 and bfloat16) -> service (32 concurrent clients, async httpx, each
   sending its next request as soon as the last one is answered) -> baseline -> service. The
   ratio is taken against the faster baseline dtype (float32 here: one row at a time, bf16 gains
   nothing), so the service's own dtype choice is not what the ratio measures;
3. records requests/s, output tokens/s, p50/p99 latency, errors, the load average, and the
   server's RSS (process tree): once loaded, after one uncounted warm-up round of the full load
   (the one-time growth), and after each counted round; `server_rss_growth_fraction` is the
   last counted round over after-warm-up. `--soak-rounds N` then runs N service-only rounds and
   records the RSS per process after each: whether memory levels off.

Every request is a support ticket (`phiops.datagen`, seed 7) through the chat template, greedy,
`max_tokens` 32: the same prompts, settings and stop tokens on both sides. The ratio of the
service's requests/s to the baseline's is the number to read; the goal is >= 8.

Also measured in this process on the same 32 prompts (`--engines`, on by default), to choose the
batching: this service's engine, transformers' continuous batching (`generate_batch`), and one
padded `model.generate` call of the whole batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from _common import drive_engine, machine, versions

CLIENTS = 32
MAX_TOKENS = 32


def _prompts(n: int) -> list[str]:
    from phiops import datagen

    return [f"{r['instruction']}\n\n{r['input']}" for r in datagen.generate(n, seed=7)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(latencies: list[float], tokens: int, errors: int, wall: float) -> dict[str, Any]:
    n = len(latencies) + errors
    return {
        "requests": n,
        "errors": errors,
        "error_rate": errors / n if n else 0.0,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 4),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(_pct(latencies, 0.50), 4) if latencies else None,
        "latency_p99_s": round(_pct(latencies, 0.99), 4) if latencies else None,
        "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
    }


# --------------------------------------------------------------------------------------------
# baseline: one at a time, plain generate
# --------------------------------------------------------------------------------------------


class Baseline:
    def __init__(self, path: Path, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch, self.dtype = torch, dtype
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        # The service's rule for stop tokens (service._eos_ids): generation_config's, then the tokenizer's.
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = list(dict.fromkeys([*eos, self.tok.eos_token_id]))

    def encode(self, prompt: str) -> list[int]:
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=False)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def run(self, prompts: list[str]) -> dict[str, Any]:
        torch = self.torch
        latencies, tokens = [], 0
        t0 = time.perf_counter()
        for p in prompts:
            t = time.perf_counter()
            ids = torch.tensor([self.encode(p)])
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                          do_sample=False, eos_token_id=self.eos, pad_token_id=self.eos[0])
            self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            tokens += int(out.shape[1] - ids.shape[1])
            latencies.append(time.perf_counter() - t)
        out = _summary(latencies, tokens, 0, time.perf_counter() - t0)
        out["dtype"] = self.dtype
        return out


# --------------------------------------------------------------------------------------------
# the service under load
# --------------------------------------------------------------------------------------------


async def _load(base: str, prompts: list[str], clients: int) -> dict[str, Any]:
    import httpx

    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    latencies: list[float] = []
    tokens, errors, statuses = 0, 0, {}

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while True:
            try:
                p = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"model": "phiops-model", "messages": [{"role": "user", "content": p}], "temperature": 0,
                    "max_tokens": MAX_TOKENS}
            t = time.perf_counter()
            try:
                res = await http.post("/v1/chat/completions", json=body)
                code = res.status_code
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            statuses[str(code)] = statuses.get(str(code), 0) + 1
            if code == 200:
                latencies.append(time.perf_counter() - t)
                tokens += res.json()["usage"]["completion_tokens"]
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    out = _summary(latencies, tokens, errors, wall)
    out["statuses"] = statuses
    out["clients"] = clients
    return out


def _rss_by_process(pid: int, settle_s: float = 2.0) -> dict[str, int]:
    """RSS of each process of the server's tree (by pid and the tail of its command line), read
    after `settle_s` idle: the engine returns freed heap to the OS when idle."""
    import psutil

    time.sleep(settle_s)
    proc = psutil.Process(pid)
    return {f"{p.pid} {' '.join(p.cmdline()[-3:])[-60:]}": p.memory_info().rss
            for p in [proc, *proc.children(recursive=True)] if p.is_running()}


def _tree_rss(pid: int) -> int:
    return sum(_rss_by_process(pid).values())


def _server_pid(port: int) -> int:
    """The `bentoml serve` process listening on `port` (the arbiter; its children are the workers)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "serve" in cmd and str(port) in cmd and any(c.endswith("bentoml") for c in cmd):
            return int(p.pid)
    raise RuntimeError(f"no bentoml serve process on port {port}")


# --------------------------------------------------------------------------------------------
# batching choices, in process
# --------------------------------------------------------------------------------------------


def _engines(base: Baseline, prompts: list[str]) -> dict[str, Any]:
    """Output tokens/s of three ways to batch the same 32 greedy requests."""
    import torch
    from phiops.serve.engine import Engine, Request
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    ids = [base.encode(p) for p in prompts]
    out: dict[str, Any] = {}

    eng = Engine(base.model, base.tok, base.eos, "cpu", max_batch_size=len(ids), max_wait_ms=10)
    wall, produced = drive_engine(eng, Request, ids, MAX_TOKENS)
    out["phiops_engine"] = {"wall_s": round(wall, 3), "output_tokens": produced,
                            "output_tokens_per_s": round(produced / wall, 2)}

    gc = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=base.eos, pad_token_id=base.eos[0])
    cbc = ContinuousBatchingConfig(block_size=32, num_blocks=256, max_batch_tokens=2048,
                                   max_requests_per_batch=len(ids))
    t0 = time.perf_counter()
    res = base.model.generate_batch(ids, generation_config=gc, continuous_batching_config=cbc)
    wall = time.perf_counter() - t0
    n = sum(len(r.generated_tokens) for r in res.values())
    out["transformers_generate_batch"] = {"wall_s": round(wall, 3), "output_tokens": n,
                                          "output_tokens_per_s": round(n / wall, 2)}
    base.model.set_attn_implementation("sdpa")  # generate_batch switched it to paged attention

    width = max(len(x) for x in ids)
    batch = torch.tensor([[base.eos[0]] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        gen = base.model.generate(input_ids=batch, attention_mask=mask, generation_config=gc)
    wall = time.perf_counter() - t0
    new = gen[:, width:]
    n = 0
    for row in new.tolist():  # up to and including the first stop token, as the others count
        stop = next((i for i, t in enumerate(row) if t in base.eos), None)
        n += len(row) if stop is None else stop + 1
    out["padded_generate_one_batch"] = {"wall_s": round(wall, 3), "output_tokens": n,
                                        "output_tokens_per_s": round(n / wall, 2),
                                        "note": "static: every row waits for the longest; new requests cannot join"}
    return out


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/serve_cpu_load.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-requests", type=int, default=24, help="per round")
    ap.add_argument("--service-requests", type=int, default=192, help="per round")
    ap.add_argument("--no-engines", action="store_true", help="skip the in-process batching comparison")
    ap.add_argument("--prefill-chunks", default=None,
                    help="serve.prefill_chunk_tokens values, comma-separated (e.g. 512,0): one server each, "
                         "their rounds alternating; the first is the summary's (default: the service's default only)")
    ap.add_argument("--soak-rounds", type=int, default=0,
                    help="after the measured rounds, this many more service-only rounds, recording the RSS after each")
    args = ap.parse_args(argv)

    import torch

    from phiops import bento, models
    from phiops.config import ServeCfg
    from phiops.serve import client

    home = Path(tempfile.mkdtemp(prefix="phiops-bench-bentoml-"))
    os.environ["BENTOML_HOME"] = str(home)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    path = models.ensure_builtin()
    prompts = _prompts(args.service_requests)
    result: dict[str, Any] = {
        "bench": "serve_cpu_load",
        "command": " ".join(["python bench/serve_cpu_load.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {**machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": versions(("torch", "transformers", "bentoml", "httpx")),
        "model": "SmolLM2-135M-Instruct (embedded, fp32)",
        "settings": {"clients": CLIENTS, "max_tokens": MAX_TOKENS, "temperature": 0, "max_batch_size": 32,
                     "max_batch_wait_ms": 10, "service_dtype": "auto (bfloat16 on AMX CPUs, else float32)"},
        "loadavg_before": os.getloadavg(),
    }
    tag = bento.save_model(path, "phiops-model", "bench", {"registry": {"version": "bench"}})
    bento_tag = bento.build(tag, "bench", service_dir=ROOT / "services", served_model_name="phiops-model",
                            limits=ServeCfg(max_new_tokens=MAX_TOKENS), lock_packages=False)
    baselines = [Baseline(path, "float32"), Baseline(path, "bfloat16")]
    for b in baselines:
        b.run(prompts[:1])  # warm-up
    rounds = []
    chunks = args.prefill_chunks.split(",") if args.prefill_chunks else [None]
    with contextlib.ExitStack() as stack:
        urls, pids, rss_loaded_by, rss_before_by = {}, {}, {}, {}
        for chunk in chunks:
            label = chunk or "default"
            if chunk is not None:  # read by the server at its start (ServeCfg from the environment)
                os.environ["PHIOPS_PREFILL_CHUNK_TOKENS"] = chunk
            port = client.free_port()
            urls[label] = stack.enter_context(client.serving(bento_tag, port=port, timeout=600))
            pids[label] = _server_pid(port)
            rss_loaded_by[label] = _tree_rss(pids[label])
        os.environ.pop("PHIOPS_PREFILL_CHUNK_TOKENS", None)
        for label, url in urls.items():
            # Warm-up: one full service round, not counted. The first load grows the server once
            # (allocator arenas, oneDNN kernels for each batch shape, Python caches): recorded as
            # `server_rss_warmup_growth_fraction`. "Flat" is judged after it, over the counted rounds.
            asyncio.run(_load(url, prompts, CLIENTS))
            rss_before_by[label] = _tree_rss(pids[label])
        first = next(iter(urls))  # the summary's setting; the soak runs on it
        for i in range(args.rounds):
            k = args.baseline_requests
            bs = {}
            for base in baselines:
                b = bs[base.dtype] = base.run(prompts[i * k:(i + 1) * k])
                print(f"round {i}: baseline {base.dtype} {b['requests_per_s']:.3f} req/s "
                      f"{b['output_tokens_per_s']:.1f} tok/s", flush=True)
            services, rss = {}, {}
            for label, url in urls.items():
                s = services[label] = asyncio.run(_load(url, prompts, CLIENTS))
                rss[label] = _tree_rss(pids[label])
                print(f"round {i}: service {label} {s['requests_per_s']:.3f} req/s {s['output_tokens_per_s']:.1f} "
                      f"tok/s p50 {s['latency_p50_s']}s p99 {s['latency_p99_s']}s errors {s['errors']}", flush=True)
            rounds.append({"baseline": bs, "service": services[first], "rss_server_bytes": rss[first],
                           **({"services": services, "rss_server_bytes_by_service": rss} if len(urls) > 1 else {}),
                           "loadavg": os.getloadavg()})
        url, pid = urls[first], pids[first]
        rss_loaded, rss_before = rss_loaded_by[first], rss_before_by[first]
        rss_after = rounds[-1]["rss_server_bytes"] if rounds else rss_before
        soak = []
        for i in range(args.soak_rounds):  # service only: does the RSS keep rising, or level off?
            s = asyncio.run(_load(url, prompts, CLIENTS))
            by_process = _rss_by_process(pid)
            soak.append({"rss_server_bytes": sum(by_process.values()), "rss_by_process": by_process,
                         "requests": s["requests"], "errors": s["errors"]})
            print(f"soak {i}: rss {soak[-1]['rss_server_bytes'] / 1e6:.1f} MB errors {s['errors']} "
                  f"{ {k: round(v / 1e6, 1) for k, v in soak[-1]['rss_by_process'].items()} }", flush=True)
    result["rounds"] = rounds
    if soak:
        result["soak"] = soak

    def rate(key: str, side: str, dtype: str | None = None) -> float:
        parts = [r[side][dtype] if dtype else r[side] for r in rounds]
        n = sum(p["requests"] - p["errors"] if key == "requests" else p[key] for p in parts)
        return n / sum(p["wall_s"] for p in parts)

    by_dtype = {d: rate("requests", "baseline", d) for d in ("float32", "bfloat16")}
    best = max(by_dtype, key=by_dtype.get)
    b_rps, s_rps = by_dtype[best], rate("requests", "service")
    b_tps, s_tps = rate("output_tokens", "baseline", best), rate("output_tokens", "service")
    result["summary"] = {
        "baseline_dtype": best,
        "baseline_requests_per_s_by_dtype": {d: round(v, 4) for d, v in by_dtype.items()},
        "baseline_requests_per_s": round(b_rps, 4),
        "service_requests_per_s": round(s_rps, 4),
        "ratio_requests_per_s": round(s_rps / b_rps, 2),
        "baseline_output_tokens_per_s": round(b_tps, 2),
        "service_output_tokens_per_s": round(s_tps, 2),
        "ratio_output_tokens_per_s": round(s_tps / b_tps, 2),
        "service_latency_p50_s": max(r["service"]["latency_p50_s"] for r in rounds),
        "service_latency_p99_s": max(r["service"]["latency_p99_s"] for r in rounds),
        "baseline_latency_p50_s": max(r["baseline"][best]["latency_p50_s"] for r in rounds),
        "service_errors": sum(r["service"]["errors"] for r in rounds),
        "server_rss_loaded_bytes": rss_loaded,
        "server_rss_warmup_growth_fraction": round(rss_before / rss_loaded - 1, 4),
        "server_rss_before_bytes": rss_before,
        "server_rss_after_bytes": rss_after,
        "server_rss_growth_fraction": round(rss_after / rss_before - 1, 4),
        **({"server_rss_soak_bytes": [r["rss_server_bytes"] for r in soak],
            "server_rss_soak_growth_fraction": round(soak[-1]["rss_server_bytes"] / rss_after - 1, 4),
            "soak_errors": sum(r["errors"] for r in soak)} if soak else {}),
        "goal": "service requests/s >= 8x baseline, no errors, memory flat",
    }
    if len(chunks) > 1:  # each setting against the same baseline rounds
        def setting(label: str) -> dict[str, Any]:
            runs = [r["services"][label] for r in rounds]
            rps = sum(x["requests"] - x["errors"] for x in runs) / sum(x["wall_s"] for x in runs)
            rss = [r["rss_server_bytes_by_service"][label] for r in rounds]
            return {"service_requests_per_s": round(rps, 4), "ratio_requests_per_s": round(rps / b_rps, 2),
                    "ratio_by_round": [round(x["requests_per_s"] / r["baseline"][best]["requests_per_s"], 2)
                                       for x, r in zip(runs, rounds)],
                    "latency_p50_s": max(x["latency_p50_s"] for x in runs),
                    "latency_p99_s": max(x["latency_p99_s"] for x in runs),
                    "errors": sum(x["errors"] for x in runs),
                    "server_rss_growth_fraction": round(rss[-1] / rss[0] - 1, 4)}

        result["summary"]["prefill_chunk_tokens"] = chunks[0]
        result["summary"]["by_prefill_chunk_tokens"] = {label: setting(label) for label in rounds[0]["services"]}
    if not args.no_engines:
        # In the service's dtype on this machine (bf16 with AMX, else fp32).
        served = "bfloat16" if torch.cpu._is_amx_tile_supported() else "float32"
        result["batching_choice"] = {"dtype": served,
                                     **_engines(next(b for b in baselines if b.dtype == served), prompts[:CLIENTS])}
    result["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    if "batching_choice" in result:
        print(json.dumps(result["batching_choice"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
